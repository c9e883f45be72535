"""
The fast inference path: the precision and runtime a bundle's network runs in, chosen for the machine.

=========  =============================================================  ======================================
precision  engine                                                         needs
=========  =============================================================  ======================================
``fp32``   PyTorch eager, ``channels_last`` weights and input (oneDNN)    nothing
``bf16``   ``torch.autocast`` bfloat16 + ``channels_last`` (oneDNN)       CPU with AMX-BF16 or AVX512-BF16, or CUDA
``fp16``   ``torch.autocast("cuda")``                                     CUDA
``int8``   ONNX Runtime, INT8 QDQ model from ``custom_nets.deploy         CPU, ``onnxruntime`` (extra ``[fast]``),
           quantize`` (static post-training quantization)                 the ``.onnx`` file
``auto``   CUDA: fp16. CPU: int8 when its model file and onnxruntime      never fails
           are there, else bf16 on a CPU with native bf16, else fp32
=========  =============================================================  ======================================

Without native bf16 instructions oneDNN emulates bf16 and runs slower than fp32, so ``auto`` keeps
fp32 there. oneDNN's own ``ONEDNN_MAX_CPU_ISA`` setting (e.g. ``AVX2``) caps what counts as native,
which is also how to rehearse a CPU without AMX on one that has it. :func:`fast_network` logs one line
saying which path it took and why; a requested path the machine cannot run raises
:class:`PrecisionUnavailableError`, one line naming the mode and what is missing.

Example (an ``inference.json``)::

    "precision": "auto",
    "int8_model": "$@bundle_root + '/models/model_int8.onnx'",
    "fast_network": "$custom_nets.engines.fast_path.fast_network(@network, @precision, @device, @int8_model, @ckpt_path)"
"""

from __future__ import annotations

import logging
import os
import platform
from contextlib import nullcontext
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from custom_nets.errors import InputError

__all__ = [
    "PRECISIONS",
    "AUTO_ORDER",
    "PrecisionUnavailableError",
    "PrecisionChoice",
    "cpu_info",
    "native_bf16",
    "bf16_problem",
    "int8_made_from",
    "choose_precision",
    "FastForward",
    "fast_network",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
#: What ``auto`` tries on a CPU, best first (the fetal bundle's order: int8 is the fastest there).
AUTO_ORDER = ("int8", "bf16", "fp32")

#: ``/proc/cpuinfo`` flags that decide the CPU paths (and are recorded beside every benchmark figure).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")

# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) below which bf16 is emulated, i.e. slower than fp32.
_ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


class PrecisionUnavailableError(InputError):
    """A requested precision this machine or install cannot run; the message names the mode and what is missing."""


class PrecisionChoice(NamedTuple):
    """The path :func:`choose_precision` took: ``precision`` and one line saying why."""

    precision: str
    reason: str


def cpu_info() -> dict:
    """
    The CPU model, the ISA flags of :data:`ISA_FLAGS` it has (Linux ``/proc/cpuinfo``; elsewhere
    only what PyTorch reports), PyTorch's dispatch level and ``ONEDNN_MAX_CPU_ISA`` when set.

    Example::

        cpu_info()  # {'model': 'AMD EPYC', 'flags': ['avx2'], 'torch_capability': 'AVX2', 'onednn_max_isa': None}
    """
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: fall back to PyTorch's own reading of the ISA
        capability = torch.backends.cpu.get_cpu_capability()
        flags = {"avx2"} if capability.startswith("AVX") else set()
        flags |= {"avx512f"} if capability.startswith("AVX512") else set()
    return {
        "model": model,
        "flags": [f for f in ISA_FLAGS if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
    }


def native_bf16(info: dict | None = None) -> str | None:
    """The instruction set that runs bf16 natively on this CPU (``"AMX-BF16"``, ``"AVX512-BF16"``) or None."""
    info = info or cpu_info()
    cap = (info.get("onednn_max_isa") or "").upper()
    if cap in _ONEDNN_CAPS_WITHOUT_BF16:
        return None
    flags = set(info["flags"])
    if "amx_bf16" in flags and (not cap or cap.startswith("AVX512_CORE_AMX") or cap == "ALL"):
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def bf16_problem(device: str | torch.device = "cpu", info: dict | None = None) -> str | None:
    """
    Why bf16 cannot run natively on ``device``, or None when it can: a CUDA device without bf16, or a
    CPU without AMX-BF16/AVX512-BF16 (under oneDNN's ``ONEDNN_MAX_CPU_ISA`` cap when set). Shared by
    inference (:func:`choose_precision`) and training (``training_precision``).

    Example::

        bf16_problem("cpu")  # 'this CPU (AMD EPYC) has no native bf16 (AMX-BF16 or AVX512-BF16)'
    """
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else f"{torch.cuda.get_device_name(device)} has no bf16"
    info = info or cpu_info()
    if native_bf16(info):
        return None
    problem = f"this CPU ({info['model']}) has no native bf16 (AMX-BF16 or AVX512-BF16)"
    return problem + (f" under ONEDNN_MAX_CPU_ISA={info['onednn_max_isa']}" if info.get("onednn_max_isa") else "")


def _onnxruntime_missing() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install 'custom_nets[fast]')"
    return None


def int8_source_checkpoint(int8_model: str | os.PathLike) -> str | None:
    """The SHA-256 of the ``model.pt`` an INT8 model was made from (recorded by ``custom_nets.deploy quantize``)."""
    import onnx

    model = onnx.load(os.fspath(int8_model), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == "custom_nets.source_checkpoint_sha256"), None)


def int8_made_from(int8_model: str | os.PathLike, checkpoint: str | os.PathLike) -> bool:
    """Whether ``int8_model`` was made from this ``checkpoint``: the SHA-256 it records equals the file's."""
    from custom_nets.deploy.quantize import sha256_of

    return int8_source_checkpoint(int8_model) == sha256_of(checkpoint)


def _int8_problem(
    int8_model: str | os.PathLike | None, device: torch.device, checkpoint: str | os.PathLike | None = None
) -> str | None:
    """Why the INT8 path cannot run here, or None when it can."""
    if device.type != "cpu":
        return f"the INT8 ONNX model runs on the CPU, not on {device}"
    missing = _onnxruntime_missing()
    if missing:
        return missing
    if not int8_model:
        return "no INT8 model configured (int8_model)"
    if not Path(int8_model).is_file():
        return f"{int8_model} not found; make it with `python -m custom_nets.deploy quantize <bundle> --calibration_dir <images>`"
    if checkpoint and Path(checkpoint).is_file() and not int8_made_from(int8_model, checkpoint):
        return f"{int8_model} was not made from {checkpoint} (retrained since?); re-run `custom_nets.deploy quantize`"
    return None


def choose_precision(
    requested: str = "auto",
    device: str | torch.device = "cpu",
    int8_model: str | os.PathLike | None = None,
    info: dict | None = None,
    checkpoint: str | os.PathLike | None = None,
    auto_order: Sequence[str] = AUTO_ORDER,
) -> PrecisionChoice:
    """
    The precision to run: ``requested`` if this machine can run it, the best available one for ``auto``.

    Args:
        requested: one of :data:`PRECISIONS`.
        device: the network's device.
        int8_model: the INT8 ONNX file (a bundle's ``models/model_int8.onnx``).
        info: :func:`cpu_info` (read from this machine when None).
        checkpoint: the ``model.pt`` in use; an INT8 model made from another one is not used.
        auto_order: the CPU precisions ``auto`` tries, best first (a bundle whose memory bound int8
            misses puts bf16 first); fp32 is the last resort either way.

    Raises:
        PrecisionUnavailableError: ``requested`` is unknown or cannot run here (``auto`` never raises).

    Example::

        choose_precision("auto", "cpu", "models/model_int8.onnx")
        # PrecisionChoice(precision='int8', reason='INT8 model models/model_int8.onnx on ONNX Runtime (CPU: AVX2, no VNNI)')
    """
    requested = str(requested).strip().lower()
    if requested not in PRECISIONS:
        raise PrecisionUnavailableError(f"precision {requested!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type != "cuda":
        info = info or cpu_info()
    bf16 = bf16_problem(device, info)
    fp16_problem = None if device.type == "cuda" else "fp16 runs on CUDA only; use bf16, int8 or fp32 on the CPU"
    # hashing model.pt and reading the INT8 model's metadata only when the INT8 path is in question
    int8_problem = _int8_problem(int8_model, device, checkpoint) if requested in ("int8", "auto") else None
    problems = {"fp32": None, "bf16": bf16, "fp16": fp16_problem, "int8": int8_problem}
    if requested != "auto":
        if problems[requested]:
            raise PrecisionUnavailableError(f"precision {requested} cannot run here: {problems[requested]}")
        return PrecisionChoice(requested, "requested")
    if device.type == "cuda":
        return PrecisionChoice("fp16", f"CUDA device {torch.cuda.get_device_name(device)}: fp16 autocast")
    flags = set(info["flags"])
    int8_isa = "AMX-INT8" if "amx_int8" in flags else "VNNI" if flags & {"avx512_vnni", "avx_vnni"} else "AVX2, no VNNI"
    unknown = [p for p in auto_order if p not in ("int8", "bf16", "fp32")]
    if unknown:
        raise PrecisionUnavailableError(f"auto_order may hold int8, bf16 and fp32 only, got {', '.join(map(repr, unknown))}")
    passed: list[str] = []  # why the precisions before the chosen one were passed over
    for precision in [*auto_order, "fp32"]:
        if precision == "int8":
            if int8_problem is None:
                return PrecisionChoice("int8", "; ".join([f"INT8 model {int8_model} on ONNX Runtime (CPU: {int8_isa})", *passed]))
            passed.append(f"no INT8 model ({int8_problem})")
        elif precision == "bf16":
            if bf16 is None:
                return PrecisionChoice("bf16", "; ".join([f"CPU has {native_bf16(info)}", *passed]))
            passed.append(bf16)
        else:
            return PrecisionChoice("fp32", "; ".join(passed) or "first in auto_order")
    raise AssertionError("unreachable: fp32 ends the order")


class FastForward(nn.Module):
    """
    ``network`` run in ``precision``: a drop-in network for MONAI inferers (float32 tensor in, float32 out).

    For ``fp32``/``bf16`` on the CPU the weights are converted to ``channels_last`` in place (oneDNN's
    fast layout) and each input is given that layout; ``bf16``/``fp16`` run under ``torch.autocast``;
    ``int8`` runs ``int8_model`` in ONNX Runtime and ignores ``network``.

    Args:
        network: the eager network with its weights loaded (unused for ``int8``).
        precision: ``fp32``, ``bf16``, ``fp16`` or ``int8`` (see :func:`choose_precision`).
        device: the network's device.
        int8_model: the INT8 ONNX file, for ``int8``.
        threads: ONNX Runtime intra-op threads (default: PyTorch's thread count).

    Example::

        forward = FastForward(net.eval(), "bf16")
        logits = forward(torch.rand(1, 1, 256, 256))  # float32
    """

    def __init__(
        self,
        network: nn.Module | None,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        int8_model: str | os.PathLike | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.precision = precision
        self.device = torch.device(device)
        self.session = None
        if precision == "int8":
            from custom_nets.deploy.onnx_runtime import OnnxRuntimeForward

            self.session = OnnxRuntimeForward(int8_model, threads=threads or torch.get_num_threads())
            self.network = None
            return
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        self.network = network.eval()

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.as_subclass(torch.Tensor)  # MetaTensor bookkeeping on every layer costs more than small layers
        if self.session is not None:
            fixed = self.session.input_shape[1:]
            if any(isinstance(d, int) and d != s for d, s in zip(fixed, x.shape[1:])):
                shape = "x".join(str(d) for d in fixed)
                raise InputError(
                    f"{self.session.path}: the INT8 model takes inputs of {shape}, got {'x'.join(map(str, x.shape[1:]))}; "
                    "re-run `custom_nets.deploy quantize` with the same image size as this inference"
                )
            return self.session(x).to(x.device)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self._autocast():
            return self.network(x).float().contiguous()


def fast_network(
    network: nn.Module | None,
    precision: str = "auto",
    device: str | torch.device = "cpu",
    int8_model: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    threads: int | None = None,
    auto_order: Sequence[str] = AUTO_ORDER,
) -> FastForward:
    """
    :func:`choose_precision` then :class:`FastForward`, logging one line with the path taken and why.

    Example::

        net = fast_network(net, "auto", "cpu", "models/model_int8.onnx")
        # INFO inference path: fp32 (PyTorch, channels_last): this CPU (AMD EPYC) has no native bf16 ...
    """
    choice = choose_precision(precision, device, int8_model, checkpoint=checkpoint, auto_order=auto_order)
    engine = {
        "fp32": "PyTorch, channels_last" if torch.device(device).type == "cpu" else "PyTorch",
        "bf16": "PyTorch autocast bfloat16, channels_last",
        "fp16": "PyTorch CUDA autocast float16",
        "int8": "ONNX Runtime, INT8 QDQ",
    }[choice.precision]
    logger.info(f"inference path: {choice.precision} ({engine}): {choice.reason}")
    return FastForward(network, choice.precision, device, int8_model, threads)
