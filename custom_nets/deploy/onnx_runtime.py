"""
ONNX Runtime on CPU for exported bundles: a session, a forward that takes and returns torch tensors
(for parity checks and the latency benchmark), and an export-and-load helper for a live network.

The bundle's ONNX file comes from MONAI's own exporter with a fixed input shape (the bundle's
preprocessing resizes every image to it)::

    python -m monai.bundle onnx_export --net_id network_def --filepath models/model.onnx \\
        --ckpt_file models/model.pt --config_file configs/inference.json --input_shape "[1, 1, 256, 256]"

``onnxruntime`` is an optional dependency (``pip install custom_nets[onnx]``); every function here
raises ``ImportError`` naming that extra when it is missing.

Example::

    forward = OnnxRuntimeForward("models/model.onnx", threads=2)
    logits = forward(torch.rand(1, 1, 256, 256))  # torch.Tensor, (1, 2, 256, 256)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from monai.networks.utils import convert_to_onnx
from monai.utils import optional_import
from torch import nn

from custom_nets.checkpoints import load_checkpoint
from custom_nets.deploy.onnx_network import OnnxNetwork

__all__ = ["ONNX_EXTRA_HINT", "OnnxRuntimeForward", "onnxruntime_forward_for"]

ONNX_EXTRA_HINT = "onnxruntime is not installed: pip install 'custom_nets[onnx]' (onnx, onnxruntime, onnxscript)"


def _onnxruntime():
    ort, has_ort = optional_import("onnxruntime")
    if not has_ort:
        raise ImportError(ONNX_EXTRA_HINT)
    return ort


class OnnxRuntimeForward(OnnxNetwork):
    """
    :class:`~custom_nets.deploy.onnx_network.OnnxNetwork` (a CPU ONNX Runtime session called like a network)
    whose errors name this project's extra and export command.

    Args:
        onnx_path: the ``.onnx`` file.
        threads: intra-op threads of the session (``None``: ONNX Runtime's default, all cores).
        allow_spinning: let idle worker threads spin between operators (off: see ``OnnxNetwork``).
    """

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None, allow_spinning: bool = False) -> None:
        _onnxruntime()
        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX file not found; export it with `python -m monai.bundle onnx_export`")
        super().__init__(path, threads=threads, allow_spinning=allow_spinning)


def onnxruntime_forward_for(
    model: nn.Module, example: torch.Tensor, threads: int | None = None, workdir: str | os.PathLike | None = None
) -> OnnxRuntimeForward:
    """
    Export ``model`` (eval mode, CPU) to ONNX for the shape of ``example`` with MONAI's
    ``convert_to_onnx`` (the exporter behind ``monai.bundle onnx_export``) and open it in ONNX Runtime.

    Args:
        model: the eager network.
        example: an input of the shape to serve (batch included); the graph is fixed to that shape.
        threads: intra-op threads of the session.
        workdir: where the ``.onnx`` file goes (default: a temporary folder removed at exit of the call;
            the session keeps the model in memory).
    """
    _onnxruntime()
    model = model.eval().cpu()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "model.onnx"
        convert_to_onnx(model, inputs=[example.detach().cpu()], filename=str(path), verify=False)
        return OnnxRuntimeForward(path, threads=threads)


def onnx_parity(
    bundle_dir: str | os.PathLike,
    onnx_file: str = "models/model.onnx",
    ckpt_file: str = "models/model.pt",
    config_file: str = "configs/inference.json",
    seed: int = 0,
) -> dict[str, float]:
    """
    Compare ONNX Runtime with the eager ``network_def`` of the bundle on one random input of the ONNX
    file's shape: the largest absolute logit difference and the share of pixels whose arg-max class agrees.

    Paths are relative to ``bundle_dir`` unless absolute. Needs ``custom_nets`` (the eager network).
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_dir)
    parser = ConfigParser()
    parser.read_config(str(root / config_file))
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(load_checkpoint(root / ckpt_file))
    forward = OnnxRuntimeForward(root / onnx_file)
    shape = [d if isinstance(d, int) else 1 for d in forward.input_shape]
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        eager = net.eval()(x)
    onnx_out = forward(x)
    return {
        "max_abs_diff": float((onnx_out - eager).abs().max()),
        "argmax_agreement": float((onnx_out.argmax(1) == eager.argmax(1)).float().mean()),
    }
