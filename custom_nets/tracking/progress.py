"""
Progress of long loops: a tqdm bar (rate, ETA) when standard error is a terminal, sparse plain lines
otherwise (a CI log, a file): :class:`LoopProgress` for any loop over a known number of items (e.g.
:class:`custom_nets.engines.folder_inference.FolderInference`), :class:`ProgressLogger` for an Ignite trainer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Any

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

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
logging_redirect_tqdm, _ = optional_import("tqdm.contrib.logging", name="logging_redirect_tqdm")

__all__ = ["LoopProgress", "ProgressLogger", "format_duration", "is_terminal"]


def is_terminal(stream: IO | None = None) -> bool:
    """
    Whether ``stream`` (default: ``sys.stderr``, where tqdm draws) is an interactive terminal and tqdm is
    installed, i.e. whether a progress bar is worth drawing. In a bundle config:
    ``"progress": "$custom_nets.tracking.is_terminal()"`` (e.g. ``CacheDataset``'s ``progress``).
    """
    stream = sys.stderr if stream is None else stream
    try:
        # a pseudo-terminal without a size (0 columns, e.g. `script` run from a job) shows no tqdm bar at all
        return bool(has_tqdm and stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0)
    except (AttributeError, ValueError, OSError):  # no isatty or fileno, a closed stream
        return False


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


def _console_loggers() -> list[logging.Logger]:
    """The root logger and every logger with handlers of its own (MONAI's ``StatsHandler`` has one)."""
    own = [x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger) and x.handlers]
    return [logging.getLogger(), *own]


def _rank() -> int:
    return idist.get_rank() if idist.get_world_size() > 1 else 0


class LoopProgress:
    """
    Progress of a loop over ``total`` items. With a bar (default: when standard error is a terminal) a
    tqdm bar shows the count, the rate and the ETA, and log records of console handlers are printed above
    it instead of through it; without one, a plain line is logged each time another ``percent_step`` %
    of the items is done (and at the end)::

        inference: 40/400 (10%) 3.21 image/s elapsed 0:00:12 ETA 0:01:52

    Only rank 0 of a distributed run shows progress. Use it as a context manager (or call :meth:`close`).

    Args:
        total: number of items.
        desc: what the loop does (the bar's label and the lines' prefix).
        unit: name of one item, in the rate.
        bar: draw a tqdm bar (``True``), log lines (``False``), or choose by :func:`is_terminal` (``None``).
        logger: logger of the plain lines (default: this module's).
        percent_step: without a bar, log a line every ``percent_step`` % of ``total``.
        initial: items already done (a resumed loop), counted in the position but not in the rate.

    Raises:
        ValueError: ``percent_step`` not in (0, 100].

    Example::

        with LoopProgress(len(paths), "inference", unit="image") as progress:
            for path in paths:
                ...
                progress.update()
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        unit: str = "it",
        bar: bool | None = None,
        logger: logging.Logger | None = None,
        percent_step: float = 10.0,
        initial: int = 0,
    ) -> None:
        if not 0 < percent_step <= 100:
            raise ValueError(f"percent_step must be in (0, 100], got {percent_step}")
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.logger = logger or logging.getLogger(__name__)
        self.percent_step = float(percent_step)
        self.done = self._initial = int(initial)
        self._next_line = self._line_after(self.done)
        self._start = time.perf_counter()
        self._active = _rank() == 0
        self.bar = None
        self._redirect: contextlib.AbstractContextManager | None = None
        if self._active and (is_terminal() if bar is None else bar and has_tqdm):
            self._redirect = logging_redirect_tqdm(loggers=_console_loggers())
            self._redirect.__enter__()
            self.bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, dynamic_ncols=True)

    def _line_after(self, done: int) -> int:
        """The count at which the next plain line is due."""
        step = max(1, math.ceil(self.total * self.percent_step / 100.0))
        return min(self.total, (done // step + 1) * step)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more items done; ``postfix`` (e.g. ``loss=0.21``) is shown beside the bar."""
        self.done += n
        if not self._active:
            return
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.done >= self._next_line:
            self.logger.info(self.line())
            self._next_line = self._line_after(self.done)

    def line(self) -> str:
        """The plain progress line for the count so far."""
        elapsed = time.perf_counter() - self._start
        counted = self.done - self._initial
        rate = counted / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - self.done) / rate if counted > 0 and rate > 0 else float("nan")
        percent = 100.0 * self.done / self.total if self.total else 100.0
        prefix = f"{self.desc}: " if self.desc else ""
        return (
            f"{prefix}{self.done}/{self.total} ({percent:.0f}%) {rate:.3g} {self.unit}/s "
            f"elapsed {format_duration(elapsed)} ETA {format_duration(eta)}"
        )

    def close(self) -> None:
        """Close the bar and give the console log handlers back (idempotent)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def __enter__(self) -> LoopProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ProgressLogger:
    """
    Ignite handler that logs one line every ``interval`` iterations and at the end of every epoch::

        epoch 3/50 iter 40/125 (290/6250, 4.6%) loss 0.2143 lr 0.000976 elapsed 0:01:12 ETA 0:24:41

    The ETA is the wall time per iteration so far (validation and checkpointing included, so it
    does not undershoot) times the iterations left; a resumed run counts from where it resumed.
    Only rank 0 logs in a distributed run.

    With a bar (default: when standard error is a terminal, :func:`is_terminal`), a tqdm bar over all
    the iterations of the run shows the rate, the ETA, the epoch, loss and learning rate, and only the
    end-of-epoch line is logged (above the bar); in a CI log or a file the lines above are all there is.
    A run that stops on an exception leaves console log records going through tqdm until the process ends.

    In a bundle's ``train#handlers``::

        {"_target_": "custom_nets.tracking.ProgressLogger", "interval": 20}

    Args:
        interval: log every ``interval`` iterations (>= 1); the last iteration of each epoch is always logged.
        name: logger name; ``None`` uses ``engine.logger``.
        bar: draw a tqdm bar (``True``), log lines only (``False``), or choose by :func:`is_terminal` (``None``).

    Raises:
        ValueError: ``interval`` < 1.

    Example::

        from ignite.engine import Engine
        trainer = Engine(lambda engine, batch: 0.5)
        ProgressLogger(interval=10).attach(trainer)
        trainer.run(range(100), max_epochs=2)
    """

    def __init__(self, interval: int = 20, name: str | None = None, bar: bool | None = None) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval = int(interval)
        self._name = name
        self.logger = logging.getLogger(name)
        self.bar = bar
        self._progress: LoopProgress | None = None
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
            engine.add_event_handler(Events.COMPLETED, self.close)
            engine.add_event_handler(Events.TERMINATE, self.close)

    def started(self, engine: Engine) -> None:
        self._start_time = time.perf_counter()
        self._start_iteration = engine.state.iteration
        self.close()
        state = engine.state
        wanted = is_terminal() if self.bar is None else self.bar
        if wanted and _rank() == 0 and state.max_epochs and state.epoch_length:
            total = state.max_epochs * state.epoch_length
            self._progress = LoopProgress(total, "training", bar=True, initial=state.iteration)
            if self._progress.bar is None:  # no tqdm: the lines it is
                self._progress = None

    def iteration_completed(self, engine: Engine) -> None:
        state = engine.state
        epoch_length = state.epoch_length or 0
        in_epoch = (state.iteration - 1) % epoch_length + 1 if epoch_length else state.iteration
        if self._progress is not None:
            loss = _loss_value(state.output)
            postfix = {"epoch": f"{state.epoch}/{state.max_epochs}", **({"loss": f"{loss:.4f}"} if loss is not None else {})}
            self._progress.update(1, **postfix)
            if in_epoch != epoch_length:  # the bar shows the iterations; the epoch's end is logged above it
                return
        elif in_epoch % self.interval and in_epoch != epoch_length:
            return
        if idist.get_rank() > 0:
            return
        self.logger.info(self.progress_line(engine, in_epoch))

    def close(self, engine: Engine | None = None) -> None:
        """Close the bar, if any (at the end of the run)."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None

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
