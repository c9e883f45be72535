"""Input checks and pretrained-encoder loading shared by the networks of ``custom_nets`` (checkpoints: :mod:`custom_nets.checkpoints`)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from custom_nets.checkpoints import load_checkpoint
# Plain re-export, kept because bundles already exported and in users' hands (and MONAI Label research
# bundles copied from ours) name "$custom_nets.networks.utils.load_weights(...)" in their configs; new code and
# configs use custom_nets.checkpoints.
from custom_nets.checkpoints import load_weights  # noqa: F401
from custom_nets.errors import InputError

__all__ = ["check_input", "load_pretrained_encoder"]


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
