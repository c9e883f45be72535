"""Per-N-iteration progress line (epoch, iteration, loss, learning rate, elapsed time, ETA) as an Ignite handler."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from monai.utils import IgniteInfo, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import(
        "ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine", as_type="decorator"
    )

__all__ = ["ProgressLogger", "format_duration"]


def format_duration(seconds: float) -> str:
    """``3725.4`` -> ``'1:02:05'``; ``'?'`` for a negative or non-finite value."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _loss_value(output: Any) -> float | None:
    """The loss from a MONAI trainer's output (a list of per-item dicts, or one dict) or a plain tensor/number."""
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if isinstance(output, dict):
        output = output.get("loss")
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return float(output.item())
    if isinstance(output, (int, float)):
        return float(output)
    return None


class ProgressLogger:
    """
    Ignite handler that logs one line every ``interval`` iterations and at the end of every epoch::

        epoch 3/50 iter 40/125 (290/6250, 4.6%) loss 0.2143 lr 0.000976 elapsed 0:01:12 ETA 0:24:41

    The ETA is the wall time per iteration so far (validation and checkpointing included, so it
    does not undershoot) times the iterations left; a resumed run counts from where it resumed.
    Only rank 0 logs in a distributed run.

    In a bundle's ``train#handlers``::

        {"_target_": "custom_nets.tracking.ProgressLogger", "interval": 20}

    Args:
        interval: log every ``interval`` iterations (>= 1); the last iteration of each epoch is always logged.
        name: logger name; ``None`` uses ``engine.logger``.

    Raises:
        ValueError: ``interval`` < 1.

    Example::

        from ignite.engine import Engine
        trainer = Engine(lambda engine, batch: 0.5)
        ProgressLogger(interval=10).attach(trainer)
        trainer.run(range(100), max_epochs=2)
    """

    def __init__(self, interval: int = 20, name: str | None = None) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval = int(interval)
        self._name = name
        self.logger = logging.getLogger(name)
        self._start_time = 0.0
        self._start_iteration = 0

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: the Ignite trainer.
        """
        if self._name is None:
            self.logger = engine.logger
        if not engine.has_event_handler(self.started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def started(self, engine: Engine) -> None:
        self._start_time = time.perf_counter()
        self._start_iteration = engine.state.iteration

    def iteration_completed(self, engine: Engine) -> None:
        state = engine.state
        epoch_length = state.epoch_length or 0
        in_epoch = (state.iteration - 1) % epoch_length + 1 if epoch_length else state.iteration
        if in_epoch % self.interval and in_epoch != epoch_length:
            return
        if idist.get_rank() > 0:
            return
        self.logger.info(self.progress_line(engine, in_epoch))

    def progress_line(self, engine: Engine, in_epoch: int) -> str:
        """The progress line for the current state of ``engine``."""
        state = engine.state
        total = (state.max_epochs or 0) * (state.epoch_length or 0)
        elapsed = time.perf_counter() - self._start_time
        done = state.iteration - self._start_iteration
        eta = elapsed / done * (total - state.iteration) if done > 0 and total else float("nan")
        line = f"epoch {state.epoch}/{state.max_epochs} iter {in_epoch}/{state.epoch_length}"
        if total:
            line += f" ({state.iteration}/{total}, {100.0 * state.iteration / total:.1f}%)"
        loss = _loss_value(state.output)
        if loss is not None:
            line += f" loss {loss:.4f}"
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None:
            line += f" lr {optimizer.param_groups[0]['lr']:.3g}"
        return f"{line} elapsed {format_duration(elapsed)} ETA {format_duration(eta)}"
