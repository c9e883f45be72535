"""
Command line of :mod:`custom_nets.deploy`::

    python -m custom_nets.deploy handoff BUNDLE_DIR OUTPUT_DIR [--extra_configs "['configs/layout.json']"] [--int8 true|false]
    python -m custom_nets.deploy onnx_parity BUNDLE_DIR [--onnx_file models/model.onnx]
    python -m custom_nets.deploy quantize BUNDLE_DIR --calibration_dir IMAGES [--num_inputs 64] [--image_size 256]

``handoff`` prints the hand-off folder; ``quantize`` writes ``models/model_int8.onnx`` (the fast CPU
path, :mod:`custom_nets.deploy.quantize`) and prints its agreement with fp32; ``onnx_parity`` prints the largest logit difference and the
arg-max agreement and exits non-zero when they miss ``--atol`` / ``--min_agreement``. Errors are one line.
"""

from __future__ import annotations

import sys

import fire

from custom_nets.deploy.handoff import HandoffError, export_handoff
from custom_nets.deploy.onnx_runtime import onnx_parity
from custom_nets.errors import InputError


def handoff(bundle_dir: str, output_dir: str, extra_configs: tuple[str, ...] | str = (), int8: bool | None = None) -> str:
    """
    Write the MONAI-only hand-off bundle of ``bundle_dir`` to ``output_dir`` (``--extra_configs configs/x.json``).
    The INT8 model goes with it when it was made from the bundle's ``model.pt`` (``--int8 true``: required).
    """
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    extra = (extra_configs,) if isinstance(extra_configs, str) else tuple(extra_configs)
    return str(export_handoff(bundle_dir, output_dir, extra, int8=int8))


def parity(bundle_dir: str, onnx_file: str = "models/model.onnx", atol: float = 1e-3, min_agreement: float = 0.999,
           **kwargs) -> dict:  # fmt: skip
    """ONNX Runtime vs eager on one random input; exit status 1 beyond ``atol`` or under ``min_agreement``."""
    result = onnx_parity(bundle_dir, onnx_file=onnx_file, **kwargs)
    if result["max_abs_diff"] > atol or result["argmax_agreement"] < min_agreement:
        sys.exit(f"{onnx_file}: ONNX Runtime differs from the eager network: {result}")
    return result


def quantize(bundle_dir: str, calibration_dir: str, output: str = "models/model_int8.onnx",
             ckpt_file: str = "models/model.pt", extra_configs: tuple[str, ...] | str = (), num_inputs: int = 64,
             min_dice: float = 0.98, **overrides) -> dict:  # fmt: skip
    """
    INT8 QDQ ONNX model of ``bundle_dir`` calibrated on ``num_inputs`` inputs from ``calibration_dir``;
    other ``--key value`` pairs override the inference config as on the bundle command line (``--image_size 384``).
    Nothing is written when the INT8 masks agree with fp32 under ``--min_dice`` on the calibration inputs.
    """
    import logging

    from custom_nets.deploy.quantize import quantize_bundle

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("custom_nets").setLevel(logging.INFO)  # ours; the exporters' INFO lines are noise here
    extra = (extra_configs,) if isinstance(extra_configs, str) else tuple(extra_configs)
    return quantize_bundle(
        bundle_dir, calibration_dir, output, ckpt_file, extra_configs=extra, num_inputs=num_inputs, overrides=overrides,
        min_dice=min_dice,
    )


def main() -> None:
    try:
        fire.Fire({"handoff": handoff, "onnx_parity": parity, "quantize": quantize})
    except (HandoffError, InputError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
