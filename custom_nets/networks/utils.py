"""Checks and weight loading shared by the networks of ``custom_nets``, and the project's one checkpoint reader."""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch
from torch import nn

from custom_nets.errors import InputError, describe_error

__all__ = ["CheckpointNotFoundError", "check_input", "load_checkpoint", "load_weights", "load_pretrained_encoder"]


def check_input(x: torch.Tensor, in_channels: int, spatial_dims: int, divisor: int = 32) -> None:
    """
    Raise a ``ValueError`` that names the problem when ``x`` is not a valid network input.

    Called at the top of ``forward`` so that a wrong input fails with a clear message instead of a
    shape error deep inside the model. Scriptable.

    Args:
        x: input batch, ``(B, C, *spatial)``.
        in_channels: channels the network was built for.
        spatial_dims: spatial dimensions the network was built for.
        divisor: every spatial side must be a multiple of this (the total stride of the encoder).
    """
    if torch.jit.is_tracing():  # a trace fixes the input shape; checking it would only add warnings
        return
    if x.dim() != spatial_dims + 2:
        raise ValueError(
            f"expected a {spatial_dims + 2}D input (batch, channel, {spatial_dims} spatial dims), "
            f"got shape {list(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} input channel(s), got {x.shape[1]} (input shape {list(x.shape)})")
    for side in x.shape[2:]:
        if side % divisor != 0:
            raise ValueError(
                f"every spatial side must be a multiple of {divisor}, got size {list(x.shape[2:])}; "
                f"pad or resize the input (e.g. monai.transforms.DivisiblePad(k={divisor}))"
            )


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

        "$custom_nets.networks.utils.load_weights(@network, @ckpt_path, @device)"
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


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    obj: Any = load_checkpoint(path, description="pretrained weights")
    for key in ("state_dict", "model", "network"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"pretrained weights {os.fspath(path)} do not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Fit ImageNet's RGB stem to ``in_channels`` by averaging over RGB and repeating, keeping activations' scale."""
    if weight.shape[1] == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, *([1] * (weight.dim() - 2))) * (weight.shape[1] / in_channels)


def load_pretrained_encoder(encoder: nn.Module, path: str | os.PathLike, first_conv: str = "conv1.weight") -> None:
    """
    Load a torchvision-style ResNet state dict (e.g. ImageNet weights saved from torchvision) into ``encoder``.

    The classifier (``fc.*``) is ignored and the first convolution is adapted to the encoder's input
    channels. Anything else that does not match raises a ``ValueError`` naming the file and the keys.

    Args:
        encoder: a module whose keys follow torchvision's ResNet names (``ResNetEncoder``).
        path: local file written by ``torch.save(state_dict)``; nothing is downloaded.
        first_conv: key of the stem convolution that is adapted to the input channels.
    """
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("fc.")}
    own = encoder.state_dict()
    if first_conv in state and first_conv in own:
        state[first_conv] = _adapt_first_conv(state[first_conv], own[first_conv].shape[1])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k} {list(state[k].shape)} != {list(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {wrong_shape[:3]}")
    if problems:
        raise ValueError(f"pretrained weights {os.fspath(path)} do not fit the ResNet encoder: " + "; ".join(problems))
    encoder.load_state_dict(state)
