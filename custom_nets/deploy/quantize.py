"""
INT8 model of a trained bundle for the fast CPU path: post-training static quantization with ONNX Runtime.

The network is exported to ONNX with MONAI's ``convert_to_onnx`` (dynamic batch, so slice inference can
batch slices), calibrated on real images run through the bundle's own ``preprocessing`` and ``inferer``
(the calibration tensors are exactly what the network sees at inference, for 2D images and for the
slices of volumes alike), and quantized by ONNX Runtime into a QDQ model: INT8 per-channel weights
(7-bit range, exact on CPUs without VNNI), UINT8 activations, MinMax ranges. The result runs with ``onnxruntime`` alone (no ``custom_nets``), next
to ``model.ts``; ``inference.json`` uses it with ``--precision int8`` (or ``auto``).

Command::

    python -m custom_nets.deploy quantize bundles/fetal_head_us_segmentation \\
        --calibration_dir /data/hc18/training_set --num_inputs 64

It prints the agreement of the INT8 model with the fp32 network on the calibration inputs; the
held-out parity is checked by ``benchmarks/latency.py --parity_dir``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

from custom_nets.checkpoints import load_checkpoint
from custom_nets.errors import InputError

__all__ = ["INT8_MODEL", "QuantizationError", "calibration_inputs", "export_onnx", "quantize_bundle", "sha256_of"]

logger = logging.getLogger(__name__)

#: Where the INT8 model goes in a bundle (``inference.json``'s ``int8_model``).
INT8_MODEL = "models/model_int8.onnx"
INPUT_NAME, OUTPUT_NAME = "image", "pred"


class QuantizationError(InputError):
    """An INT8 model too far from its fp32 network to be used; the message names the checkpoint and the figure."""


def _bundle_parser(bundle_dir: Path, config_file: str, extra_configs: Sequence[str], overrides: dict) -> ConfigParser:
    files = [bundle_dir / config_file, *(bundle_dir / c for c in extra_configs)]
    for f in files:
        if not f.is_file():
            raise InputError(f"{f}: config not found")
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser["bundle_root"] = str(bundle_dir)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def calibration_inputs(parser: ConfigParser, network: torch.nn.Module, num_inputs: int) -> list[torch.Tensor]:
    """
    Up to ``num_inputs`` network inputs ``(1, C, H, W)`` from the bundle's ``runner#inputs`` (its input
    folder), each case through ``preprocessing`` and ``inferer`` as at inference. Cases are taken evenly
    over the folder; a volume gives evenly spaced slices. Unreadable cases are skipped with a warning.
    """
    items = parser.get_parsed_content("runner#inputs")
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    cases = [items[i] for i in np.unique(np.linspace(0, len(items) - 1, min(num_inputs, len(items))).round().astype(int))]
    per_case = -(-num_inputs // len(cases))
    collected: list[torch.Tensor] = []
    for item in cases:
        item = dict(item) if isinstance(item, dict) else {"image": os.fspath(item)}
        seen: list[torch.Tensor] = []

        def record(x: torch.Tensor) -> torch.Tensor:
            x = x.as_subclass(torch.Tensor).detach().float()
            seen.extend(x.split(1))
            with torch.no_grad():  # the inferer needs an output of the right shape; one sample's is enough
                # copied, not a view: SliceInferer's sliding window writes into the output in place
                return network(x[:1]).expand(x.shape[0], -1, *([-1] * (x.ndim - 2))).contiguous()

        try:
            image = preprocessing(item)["image"]
            with torch.no_grad():
                inferer(torch.as_tensor(image)[None].float(), record)
        except Exception as e:  # a broken calibration case is left out, not fatal
            logger.warning(f"calibration: skipped {item.get('image')}: {type(e).__name__}: {e}")
            continue
        picks = np.unique(np.linspace(0, len(seen) - 1, min(per_case, len(seen))).round().astype(int))
        collected.extend(seen[i] for i in picks)
    if not collected:
        raise InputError("calibration: no usable input in the calibration folder")
    return collected[:num_inputs]


def export_onnx(network: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike) -> None:
    """Export ``network`` (eval, CPU) to ONNX at ``path`` with MONAI's exporter, batch size dynamic."""
    from monai.networks.utils import convert_to_onnx

    # torch.export specialises a dimension of size 1: a batch-1 example would bake batch 1 into the
    # decoder's Resize sizes, and SliceInferer's batches of slices would then fail in ONNX Runtime
    example = example.expand(2, *example.shape[1:]) if example.shape[0] == 1 else example
    convert_to_onnx(
        network.eval().cpu(), inputs=[example], filename=str(path), input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, verify=False,
    )  # fmt: skip


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _agreement(session, network: torch.nn.Module, inputs: list[torch.Tensor]) -> dict[str, float]:
    """Arg-max agreement and the foreground Dice of INT8 vs fp32 masks, worst and mean over ``inputs``."""
    agreements, dices = [], []
    for x in inputs:
        with torch.no_grad():
            reference = network(x).argmax(1)
        quantized = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0]).argmax(1)
        agreements.append(float((reference == quantized).float().mean()))
        a, b = reference > 0, quantized > 0
        total = int(a.sum() + b.sum())
        dices.append(1.0 if total == 0 else 2.0 * int((a & b).sum()) / total)
    return {
        "argmax_agreement_mean": float(np.mean(agreements)),
        "argmax_agreement_min": float(np.min(agreements)),
        "foreground_dice_mean": float(np.mean(dices)),
        "foreground_dice_min": float(np.min(dices)),
    }


def quantize_bundle(
    bundle_dir: str | os.PathLike,
    calibration_dir: str | os.PathLike,
    output: str = INT8_MODEL,
    ckpt_file: str = "models/model.pt",
    config_file: str = "configs/inference.json",
    extra_configs: Sequence[str] = (),
    num_inputs: int = 64,
    overrides: dict | None = None,
    min_dice: float = 0.98,
) -> dict:
    """
    Write the INT8 QDQ ONNX model of a trained bundle, calibrated on ``calibration_dir``.

    Args:
        bundle_dir: the bundle folder (``configs/``, ``models/model.pt``).
        calibration_dir: images (or cases) in the layout of the bundle's ``--input_dir``; training images.
        output: the INT8 model, relative to ``bundle_dir`` unless absolute (written atomically).
        ckpt_file: the trained weights, relative to ``bundle_dir`` unless absolute.
        config_file: the inference config that defines ``network_def``, ``preprocessing``, ``inferer``.
        extra_configs: overrides merged after ``config_file`` (e.g. a data-layout config).
        num_inputs: number of calibration inputs (2D images or slices). 64: on the HC18 test split, a
            fetal model calibrated on 32 images had 2 of 27 head circumferences 0.3-0.39 mm off fp32, on 64 none.
        overrides: config values set as on the bundle command line (e.g. ``{"image_size": 384}``): the
            INT8 model is fixed to the network input size the bundle's preprocessing produces.
        min_dice: the least mean foreground Dice between INT8 and fp32 masks on the calibration inputs;
            below it nothing is written (a silently wrong fast path is worse than none).

    Returns:
        the output path, the number of calibration inputs, and the INT8 vs fp32 agreement on them.

    Raises:
        InputError: a missing config, checkpoint or calibration folder; ``ImportError`` without onnxruntime.
        QuantizationError: the INT8 masks agree with fp32 less than ``min_dice``.
    """
    from custom_nets.deploy.onnx_runtime import _onnxruntime

    ort = _onnxruntime()
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    bundle = Path(bundle_dir).resolve()
    out = Path(output) if Path(output).is_absolute() else bundle / output
    ckpt = Path(ckpt_file) if Path(ckpt_file).is_absolute() else bundle / ckpt_file
    if not Path(calibration_dir).is_dir():
        raise InputError(f"{calibration_dir}: calibration folder not found")
    parser = _bundle_parser(bundle, config_file, extra_configs, {**(overrides or {}), "input_dir": os.fspath(calibration_dir)})
    network = parser.get_parsed_content("network_def").cpu().eval()
    network.load_state_dict(load_checkpoint(ckpt, map_location="cpu"))
    inputs = calibration_inputs(parser, network, int(num_inputs))
    logger.info(f"calibration: {len(inputs)} input(s) of shape {list(inputs[0].shape)} from {calibration_dir}")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._next = iter(inputs)

        def get_next(self):
            x = next(self._next, None)
            return None if x is None else {INPUT_NAME: x.numpy()}

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quantize.", dir=out.parent) as tmp:
        fp32, prepared, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        export_onnx(network, inputs[0], fp32)
        quant_pre_process(str(fp32), str(prepared))
        # 7-bit weights (reduce_range): on x86 CPUs without VNNI, ONNX Runtime's u8s8 kernels add pairs of
        # products in saturating 16-bit lanes; with full 8-bit weights a trained AdaptiveCENet then lost half
        # its mask (Dice 0.54 against fp32 on an AVX2 EPYC), with 7 bits it keeps 0.998, on every CPU
        quantize_static(
            str(prepared), str(quantized), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
        model = onnx.load(str(quantized))
        provenance = {
            "custom_nets.source_checkpoint_sha256": sha256_of(ckpt),
            "custom_nets.calibration_inputs": str(len(inputs)),
            "custom_nets.quantization": "ONNX Runtime static QDQ, per-channel INT8 weights, UINT8 activations, MinMax",
        }
        for key, value in provenance.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(quantized))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
        agreement = _agreement(session, network, inputs)
        if agreement["foreground_dice_mean"] < min_dice:
            raise QuantizationError(
                f"{ckpt}: the INT8 model's masks agree with fp32 at Dice {agreement['foreground_dice_mean']:.3f} "
                f"(< {min_dice}) on the calibration inputs; not written"
            )
        os.replace(quantized, out)
    logger.info(f"INT8 model: {out}")
    return {"int8_model": str(out), "calibration_inputs": len(inputs), **agreement}
