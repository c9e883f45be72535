"""
The precision/runtime modes of ``benchmarks/latency.py``'s model-only table, built from a benchmark network.

=============  =======================================================================================
mode           what runs
=============  =======================================================================================
``fp32-eager`` the network as it is (plain eager PyTorch, float32): the baseline
``fp32``       :class:`~custom_nets.engines.fast_path.FastForward` fp32: ``channels_last`` weights and input
``bf16``       ``FastForward`` bf16: CPU autocast bfloat16 + ``channels_last``; on a CPU without native
               bf16 (AMX-BF16 / AVX512-BF16) oneDNN emulates it: the row is labelled ``emulated``
``int8``       ``FastForward`` int8: ONNX Runtime on an INT8 QDQ model made by
               :func:`custom_nets.deploy.quantize.quantize_bundle` from this network, calibrated on real
               HC18 images run through the fetal bundle's own preprocessing at the benchmarked size
=============  =======================================================================================

The int8 model of a network that is not the bundle's (CENet, UNet ...) is made by the same function with
the bundle's ``network_def`` replaced by that network: calibration and export are the bundle's own path.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from custom_nets.engines.fast_path import FastForward, cpu_info, native_bf16

__all__ = ["FAST_MODES", "FETAL_BUNDLE", "bf16_is_emulated", "describe_isa", "fast_forward", "int8_forward"]

#: Modes built here (``fp32-eager`` is the network itself).
FAST_MODES = ("fp32", "bf16", "int8")
FETAL_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "fetal_head_us_segmentation"


def bf16_is_emulated(info: dict | None = None) -> bool:
    """True on a CPU where oneDNN has no native bf16 (no AMX-BF16 / AVX512-BF16, or capped by ONEDNN_MAX_CPU_ISA)."""
    return native_bf16(info or cpu_info()) is None


def describe_isa(info: dict) -> str:
    """One line on the ISA that decides the fast paths, e.g. ``"avx2; native bf16: none (emulated); int8: AVX2, no VNNI"``."""
    flags = set(info["flags"])
    int8 = "AMX-INT8" if "amx_int8" in flags else "VNNI" if flags & {"avx512_vnni", "avx_vnni"} else "AVX2, no VNNI"
    bf16 = native_bf16(info) or "none (emulated)"
    cap = f"; ONEDNN_MAX_CPU_ISA={info['onednn_max_isa']}" if info.get("onednn_max_isa") else ""
    return f"{' '.join(info['flags']) or 'no AVX2'}; native bf16: {bf16}; int8: {int8}; torch dispatch {info['torch_capability']}{cap}"


def fast_forward(model: nn.Module, precision: str) -> FastForward:
    """``FastForward`` fp32/bf16 of a copy of ``model``: it converts the weights to channels_last in place,
    and the fp32-eager and TorchScript rows must keep the original layout."""
    return FastForward(copy.deepcopy(model).cpu(), precision, "cpu")


def int8_forward(
    model: nn.Module,
    network_def: dict,
    size: int,
    calibration_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    num_inputs: int = 8,
    threads: int | None = None,
) -> tuple[FastForward, dict]:
    """
    The INT8 ``FastForward`` of ``model`` at ``size`` x ``size``, and what the quantizer reported.

    ``model``'s weights are saved as a ``model.pt`` in ``workdir`` and quantized with the fetal bundle's
    ``quantize_bundle`` (``network_def`` replaced by ``network_def``, ``image_size`` by ``size``), so the
    calibration inputs are ``num_inputs`` real images of ``calibration_dir`` preprocessed like the bundle.

    Raises:
        ImportError: onnxruntime is missing (the message names the extra).
        InputError: no usable calibration image.
    """
    from custom_nets.deploy.quantize import quantize_bundle

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt, out = workdir / "model.pt", workdir / f"model_int8_{size}.onnx"
    torch.save(model.state_dict(), ckpt)
    report = quantize_bundle(
        FETAL_BUNDLE, calibration_dir, output=str(out), ckpt_file=str(ckpt), num_inputs=num_inputs,
        overrides={"image_size": size, "network_def": network_def, "device": "$torch.device('cpu')"},
        min_dice=0.0,  # random weights, timed only: their INT8 agreement is reported, not a reason to stop
    )  # fmt: skip
    return FastForward(None, "int8", "cpu", out, threads=threads), report
