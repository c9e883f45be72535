"""
An ONNX Runtime session as a ``torch.nn.Module``, so that MONAI's inferers and engines can run an ONNX model
(the INT8 QDQ model of :mod:`custom_nets.deploy.quantize`) where they expect a network.

This file imports nothing from ``custom_nets``: the hand-off bundle (:mod:`custom_nets.deploy.handoff`)
ships it unchanged as ``scripts/onnx_network.py``, the Model Zoo's place for a bundle's own code, so a
site with MONAI and ``onnxruntime`` alone runs the INT8 model from a config::

    "network_def": {"_target_": "scripts.onnx_network.OnnxNetwork", "onnx_path": "$@bundle_root + '/models/model_int8.onnx'"}

Example::

    net = OnnxNetwork("models/model_int8.onnx", threads=2)
    logits = net(torch.rand(1, 1, 256, 256))  # float32 tensor on the input's device
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["OnnxNetwork"]


class OnnxNetwork(nn.Module):
    """
    A CPU ``onnxruntime.InferenceSession`` called like a network: a float tensor in, the model's first
    output as a float32 tensor on the input's device out. It has no parameters; ``eval()``/``train()`` change
    nothing (an exported graph has no training mode).

    Args:
        onnx_path: the ``.onnx`` file.
        threads: intra-op threads of the session (``None``: ONNX Runtime's default, all cores).
        allow_spinning: let idle worker threads spin between operators. Off by default: when reading and
            writing threads share the cores with the session, spinning workers take their time
            (INT8 HC18 inference on 2 cores: 6.6 images/s spinning, 9.3-11.5 not).

    Raises:
        ImportError: ``onnxruntime`` is not installed.
        FileNotFoundError: ``onnx_path`` is not a file.
    """

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None, allow_spinning: bool = False) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(f"{onnx_path}: running an ONNX model needs onnxruntime: pip install onnxruntime") from e
        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX file not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        if not allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = list(self.session.get_inputs()[0].shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0]).to(x.device)
