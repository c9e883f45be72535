"""
Checkpoint files: the project's one place that reads and writes them.

- :func:`load_checkpoint` reads any ``.pt``/``.pth`` with ``weights_only=True`` (a file from elsewhere cannot
  run code) and turns every failure into one line naming the file;
- :func:`load_weights` puts a checkpoint into a network, with one line when it does not fit (bundle configs'
  ``initialize``: ``"$custom_nets.checkpoints.load_weights(@network, @ckpt_path, @device)"``);
- :func:`save_checkpoint` writes one atomically (:func:`custom_nets.atomic_write.atomic_path`), so a kill
  leaves the previous file whole or the new one, never half a file.

Users: the bundle configs (``inference.json``, ``evaluate.json``), MONAI's best-model saver
(:mod:`custom_nets.handlers.atomic_checkpoint_saver`), the resumable training checkpoint
(:mod:`custom_nets.handlers.training_checkpoint`), ensembles, ONNX export and quantization, pretrained
encoder weights (:func:`custom_nets.networks.utils.load_pretrained_encoder`) and the benchmarks.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from custom_nets.atomic_write import atomic_path
from custom_nets.errors import InputError, describe_error

__all__ = ["CheckpointNotFoundError", "load_checkpoint", "load_weights", "save_checkpoint"]


class CheckpointNotFoundError(InputError, FileNotFoundError):
    """A checkpoint path that does not exist: an :class:`InputError` that ``except FileNotFoundError`` also catches."""


# "Unsupported global: GLOBAL numpy._core...." / "unsupported GLOBAL posix.system whose module ..." in torch's refusal
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+)")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    mmap: bool = False,
    description: str = "checkpoint",
) -> dict[str, Any]:
    """
    Read a file written by ``torch.save`` with ``weights_only=True``, so that a checkpoint from elsewhere
    cannot run code when it is loaded, and turn every failure into one line that names the file.

    This is the project's one place that reads checkpoints: bundle configs (``inference.json``,
    ``evaluate.json``), the resumable training checkpoint, pretrained encoder weights and the ONNX
    parity check all go through it.

    Args:
        path: the ``.pt``/``.pth`` file.
        map_location: where tensors are put (as ``torch.load``'s ``map_location``).
        mmap: memory-map the file instead of reading it all (zip-format checkpoints only).
        description: what the file is, for messages (``"checkpoint"``, ``"pretrained weights"``).

    Returns:
        the saved dictionary (a state dict, or a dict of state dicts).

    Raises:
        CheckpointNotFoundError: no such file.
        InputError: ``"cannot read <description> <path>: <problem>"`` for a file holding Python objects
            that weights-only loading refuses (e.g. ``os.system`` in a crafted pickle: nothing is run),
            an empty, truncated or corrupt file, a file that is not a PyTorch checkpoint, or one that
            holds something else than a dictionary.

    Example::

        network.load_state_dict(load_checkpoint("models/model.pt", map_location=device))
    """
    path = os.fspath(path)
    prefix = f"cannot read {description} {path}"
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{prefix}: file not found")
    if not os.path.isfile(path):
        raise InputError(f"{prefix}: not a file")
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if not head:
        raise InputError(f"{prefix}: the file is empty")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused:
            raise InputError(
                f"{prefix}: refused, it holds Python objects (e.g. {refused.group(1)}) that weights_only loading does "
                "not run; if you trust its source, allow them with torch.serialization.add_safe_globals "
                "or re-save it as a dict of tensors"
            ) from e
        detail = _UNPICKLER_DETAIL.search(str(e))
        reason = f"the weights-only unpickler stopped at: {detail.group(1).strip()}" if detail else describe_error(e)
        raise InputError(f"{prefix}: not a PyTorch checkpoint ({reason})") from e
    except Exception as e:  # torch raises RuntimeError, OSError, EOFError, KeyError... for damaged files
        problem = "truncated or corrupt" if head == _ZIP_MAGIC else "not a PyTorch checkpoint"
        raise InputError(f"{prefix}: {problem} ({describe_error(e)})") from e
    if not isinstance(content, dict):
        raise InputError(f"{prefix}: holds a {type(content).__name__}, not a dict (a state dict or a checkpoint)")
    return content


def load_weights(
    network: nn.Module, path: str | os.PathLike, map_location: str | torch.device | None = "cpu"
) -> nn.Module:
    """
    :func:`load_checkpoint` into ``network``, with one line when the weights do not fit it (a model trained
    with another ``--network_def``, other channels or classes): the checkpoint, the network class, and the
    first missing, unexpected and mismatching tensors, instead of ``load_state_dict``'s page-long error.

    Raises:
        InputError: the file cannot be read (:func:`load_checkpoint`), or its tensors do not fit ``network``.

    Example (a bundle config's ``initialize``)::

        "$custom_nets.checkpoints.load_weights(@network, @ckpt_path, @device)"
    """
    state = load_checkpoint(path, map_location=map_location)
    target = getattr(network, "module", network)  # DistributedDataParallel: the weights are the inner network's
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {list(state[k].shape)} in the file, {list(own[k].shape)} in the network"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    problems = [
        f"{len(found)} {what}, first {found[0]}"
        for what, found in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched))
        if found
    ]
    if problems:
        raise InputError(
            f"checkpoint {os.fspath(path)} does not fit the configured network {type(target).__name__}: "
            f"tensors {'; '.join(problems)}; was it trained with another --network_def, channel or class count?"
        )
    target.load_state_dict(state)
    return network


def save_checkpoint(content: Mapping[str, Any], path: str | os.PathLike) -> None:
    """
    ``torch.save(content, path)`` through :func:`custom_nets.atomic_write.atomic_path`: the file is replaced in
    one step, so readers (and a run resumed after a kill) see the previous file whole or the new one.
    Temporary files a kill left behind are cleared with :func:`custom_nets.atomic_write.remove_leftovers`.
    """
    with atomic_path(path) as tmp:
        torch.save(content, tmp)
