"""
Command line of :mod:`custom_nets.deploy`::

    python -m custom_nets.deploy handoff BUNDLE_DIR OUTPUT_DIR [--extra_configs "['configs/layout.json']"]
    python -m custom_nets.deploy onnx_parity BUNDLE_DIR [--onnx_file models/model.onnx]

``handoff`` prints the hand-off folder; ``onnx_parity`` prints the largest logit difference and the
arg-max agreement and exits non-zero when they miss ``--atol`` / ``--min_agreement``. Errors are one line.
"""

from __future__ import annotations

import sys

import fire

from custom_nets.deploy.handoff import HandoffError, export_handoff
from custom_nets.deploy.onnx_runtime import onnx_parity


def handoff(bundle_dir: str, output_dir: str, extra_configs: tuple[str, ...] | str = ()) -> str:
    """Write the MONAI-only hand-off bundle of ``bundle_dir`` to ``output_dir`` (``--extra_configs configs/x.json``)."""
    extra = (extra_configs,) if isinstance(extra_configs, str) else tuple(extra_configs)
    return str(export_handoff(bundle_dir, output_dir, extra))


def parity(bundle_dir: str, onnx_file: str = "models/model.onnx", atol: float = 1e-3, min_agreement: float = 0.999,
           **kwargs) -> dict:  # fmt: skip
    """ONNX Runtime vs eager on one random input; exit status 1 beyond ``atol`` or under ``min_agreement``."""
    result = onnx_parity(bundle_dir, onnx_file=onnx_file, **kwargs)
    if result["max_abs_diff"] > atol or result["argmax_agreement"] < min_agreement:
        sys.exit(f"{onnx_file}: ONNX Runtime differs from the eager network: {result}")
    return result


def main() -> None:
    try:
        fire.Fire({"handoff": handoff, "onnx_parity": parity})
    except (HandoffError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
