"""
Training precision: the autocast dtype and memory layout a bundle's ``SupervisedTrainer`` trains in,
chosen for the machine from the same CPU detection as the fast inference path (:mod:`.fast_path`).

===================  ============================================================  ==================================
``train_precision``  engine                                                        needs
===================  ============================================================  ==================================
``fp32``             MONAI ``SupervisedTrainer`` as it is                          nothing
``bf16`` on a CPU    :class:`PrecisionInferer`: the forward pass under             AMX-BF16 or AVX512-BF16
                     ``torch.autocast("cpu", bfloat16)``; loss, backward and the   (:func:`.fast_path.native_bf16`)
                     optimizer step stay float32, so no GradScaler
``bf16`` on CUDA     MONAI's ``amp`` with ``amp_kwargs={"dtype": bfloat16}``       a GPU with bf16
``fp16``             MONAI's ``amp`` (``torch.autocast("cuda")`` + GradScaler)     CUDA
``auto``             CUDA: fp16 (MONAI's AMP, as before). CPU: bf16 with native    never fails
                     bf16, else fp32
===================  ============================================================  ==================================

Why an inferer: MONAI 1.6.1's ``SupervisedTrainer._iteration`` enters ``torch.autocast("cuda")`` and a
CUDA ``GradScaler`` only; with ``amp=True`` on a CPU both disable themselves and training stays fp32.
The trainer calls its ``inferer`` for the forward pass, so wrapping that inferer adds CPU autocast and
keeps MONAI's own iteration (events, gradient accumulation, handlers, DDP). Validation keeps its own
inferer: its metrics, and the choice of ``model.pt``, stay float32 on a CPU (``evaluate.json`` too).

``channels_last`` (NHWC) weights and input, which let oneDNN pick its NHWC convolution kernels for the whole
network, is on for CPU bf16 training (oneDNN's AMX/AVX512-BF16 kernels are NHWC; bf16 + channels_last is
the fast inference path measured on an AMX Xeon). In fp32 it stays off: on an AVX2-only EPYC the real
bundle trainer was not faster with it (``benchmarks/training_speed.py``, batch 2 and 4 at 256x256: CPU
seconds per iteration 7.3 against 6.8, wall time within noise; a bare network + loss + Adam loop hinted
at a gain, so ``--train_channels_last true`` is there to try it). On CUDA it is off (not measured).
:class:`PrecisionInferer` converts the weights in place at the first iteration (a one-channel input alone
is NCHW and NHWC at once, so the weights decide); checkpoints load into either layout.

Without native bf16 instructions oneDNN emulates bf16 and trains slower than fp32, so ``auto`` keeps
fp32 there and an explicit ``bf16`` is refused with one line naming the mode and what is missing.
``ONEDNN_MAX_CPU_ISA=AVX2`` rehearses such a CPU on one with AMX.

Example (a bundle's ``train.json``)::

    "train_precision": "auto",
    "train_channels_last": "auto",
    "training_precision": "$custom_nets.engines.training_precision.choose_training_precision(@train_precision, @device, @train_channels_last)",
    "train#trainer#amp": "$@training_precision.amp",
    "train#trainer#amp_kwargs": "$@training_precision.amp_kwargs",
    "train#inferer": {"_target_": "custom_nets.engines.training_precision.PrecisionInferer",
                      "training_precision": "@training_precision", "inferer": {"_target_": "SimpleInferer"}}

Then ``python -m monai.bundle run training --config_file configs/train.json --train_precision fp32``.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from monai.inferers import Inferer, SimpleInferer
from monai.utils import IgniteInfo, min_version, optional_import

from custom_nets.engines.fast_path import PrecisionUnavailableError, bf16_problem, cpu_info, native_bf16

idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")

__all__ = ["TRAIN_PRECISIONS", "TrainingPrecision", "choose_training_precision", "PrecisionInferer"]

logger = logging.getLogger(__name__)

TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainingPrecision:
    """
    How a bundle trains, as chosen by :func:`choose_training_precision`.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16``.
        device_type: ``cpu`` or ``cuda``.
        channels_last: train with ``channels_last`` (NHWC) weights and input.
        reason: one line saying why.

    Example::

        TrainingPrecision("fp32", "cpu", False, "this CPU has no native bf16").amp  # False
    """

    precision: str
    device_type: str
    channels_last: bool
    reason: str
    cpu_autocast: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpu_autocast", self.device_type == "cpu" and self.precision == "bf16")

    @property
    def amp(self) -> bool:
        """The ``amp`` of MONAI's trainer and evaluator: its CUDA autocast + GradScaler path."""
        return self.device_type == "cuda" and self.precision in ("fp16", "bf16")

    @property
    def amp_kwargs(self) -> dict:
        """The ``amp_kwargs`` of MONAI's trainer and evaluator (``torch.autocast("cuda", **amp_kwargs)``)."""
        return {"dtype": torch.bfloat16} if self.amp and self.precision == "bf16" else {}

    def describe(self) -> str:
        """The log line: ``training precision: bf16 (CPU autocast bfloat16, channels_last): CPU has AMX-BF16``."""
        engine = {
            "fp32": "float32",
            "bf16": "CPU autocast bfloat16" if self.cpu_autocast else "MONAI AMP, CUDA autocast bfloat16",
            "fp16": "MONAI AMP, CUDA autocast float16 + GradScaler",
        }[self.precision]
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"training precision: {self.precision} ({engine}, {layout}): {self.reason}"


def _as_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """``value`` as one of ``choices`` (booleans from the CLI become ``"true"``/``"false"``)."""
    text = str(value).strip().lower()
    if text not in choices:
        raise PrecisionUnavailableError(f"{name} {value!r} is unknown; choose one of {', '.join(choices)}")
    return text


def _channels_last_helps(precision: str, device_type: str) -> tuple[bool, str]:
    """Whether NHWC weights and input speed up a training iteration here (see the module docstring), and why."""
    if device_type != "cpu":
        return False, "not measured on CUDA"
    if precision == "bf16":
        return True, "oneDNN's bf16 kernels are NHWC"
    return False, "no fp32 training gain measured"


def choose_training_precision(
    requested: str = "auto",
    device: str | torch.device = "cpu",
    channels_last: str | bool = "auto",
    info: dict | None = None,
    log: bool = True,
) -> TrainingPrecision:
    """
    The precision to train in: ``requested`` if this machine can run it, the fastest safe one for ``auto``;
    logs one line (rank 0) saying what was chosen and why.

    Args:
        requested: one of :data:`TRAIN_PRECISIONS`.
        device: the training device.
        channels_last: ``auto`` (where it was measured to help), ``true`` or ``false``.
        info: :func:`.fast_path.cpu_info` (read from this machine when None).
        log: log the choice.

    Raises:
        PrecisionUnavailableError: ``requested`` is unknown or cannot run here (``auto`` never raises).

    Example::

        choose_training_precision("auto", "cpu")
        # TrainingPrecision(precision='fp32', device_type='cpu', channels_last=False,
        #                   reason='this CPU (AMD EPYC) has no native bf16 (AMX-BF16 or AVX512-BF16); ...')
    """
    requested = _as_choice(requested, "train_precision", TRAIN_PRECISIONS)
    channels_last = _as_choice(channels_last, "train_channels_last", ("auto", "true", "false"))
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        problems = {"fp32": None, "fp16": None, "bf16": bf16_problem(device)}
        auto = ("fp16", f"CUDA device {name}: MONAI's mixed precision (float16 + GradScaler)")
    else:
        info = info or cpu_info()
        isa = native_bf16(info)
        problems = {"fp32": None, "bf16": bf16_problem(device, info), "fp16": "fp16 training runs on CUDA only"}
        # emulated bf16 trains slower than fp32, so auto keeps fp32 without native instructions
        auto = ("bf16", f"CPU has {isa}") if isa else ("fp32", f"{problems['bf16']}, bf16 would be emulated and slower")
    if requested == "auto":
        precision, reason = auto
    elif problems[requested]:
        raise PrecisionUnavailableError(
            f"train_precision {requested} cannot run here: {problems[requested]}; use --train_precision fp32 or auto"
        )
    else:
        precision, reason = requested, "requested"
    if channels_last == "auto":
        use_cl, why = _channels_last_helps(precision, device.type)
        reason += f"; channels_last {'on' if use_cl else 'off'} ({why})"
    else:
        use_cl = channels_last == "true"
    choice = TrainingPrecision(precision, device.type, use_cl, reason)
    # torchrun's RANK too: the choice may be made before the process group is up
    if log and idist.get_rank() == 0 and os.environ.get("RANK", "0") == "0":
        logger.info(choice.describe())
    return choice


class PrecisionInferer(Inferer):
    """
    A MONAI inferer that runs ``inferer`` in a :class:`TrainingPrecision`: with ``channels_last`` it
    converts the network's weights in place at the first call (the parameters stay the same objects, so
    the optimizer keeps them) and gives it NHWC input; for CPU bf16 the forward pass runs under
    ``torch.autocast("cpu", bfloat16)`` and returns float32, so that the loss and the backward pass of
    MONAI's ``SupervisedTrainer`` stay float32. CUDA autocast is left to MONAI's own ``amp``.

    Args:
        training_precision: the choice of :func:`choose_training_precision`.
        inferer: the inferer to run (default ``SimpleInferer``).

    Example::

        choice = choose_training_precision("auto", "cpu")
        trainer = SupervisedTrainer(..., inferer=PrecisionInferer(choice), amp=choice.amp, amp_kwargs=choice.amp_kwargs)
    """

    def __init__(self, training_precision: TrainingPrecision, inferer: Inferer | None = None) -> None:
        super().__init__()
        self.training_precision = training_precision
        self.inferer = inferer or SimpleInferer()
        self._converted: set[int] = set()

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        choice = self.training_precision
        if choice.channels_last and inputs.ndim == 4:
            # the weights decide: an input with one channel is NCHW and NHWC at once
            if isinstance(network, torch.nn.Module) and id(network) not in self._converted:
                network.to(memory_format=torch.channels_last)
                self._converted.add(id(network))
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if choice.cpu_autocast else nullcontext()
        with autocast:
            outputs = self.inferer(inputs, network, *args, **kwargs)
        if choice.cpu_autocast and isinstance(outputs, torch.Tensor):
            outputs = outputs.float()
        return outputs
