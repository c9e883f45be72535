"""
Fold ensembling and flip test-time augmentation: the mean of the softmax probabilities of several
networks and of flipped copies of the input, as nnU-Net predicts with its cross-validation models.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from custom_nets.checkpoints import load_checkpoint
from custom_nets.flags import as_flag

__all__ = ["ProbabilityAverage", "probability_average"]

logger = logging.getLogger(__name__)


class ProbabilityAverage(nn.Module):
    """
    The mean softmax probability of ``networks`` over the input and its flips, returned as
    log-probabilities: a bundle's post-processing (softmax, then arg-max or threshold) then works on
    the mean probabilities unchanged, since ``softmax(log p) = p`` when ``p`` sums to one.

    Args:
        networks: networks (or fast-path wrappers) that give logits ``(B, C, ...)``.
        flip_dims: spatial flips to add, as tensor dims of the batched input (e.g. ``[(3,)]`` mirrors
            the width of a 2D image); the identity is always included.

    Example::

        average = ProbabilityAverage([net_fold0, net_fold1], flip_dims=[(3,)])
        torch.softmax(average(x), 1)  # the mean of 4 softmax outputs
    """

    def __init__(self, networks: Sequence[nn.Module], flip_dims: Sequence[Sequence[int]] = ()) -> None:
        super().__init__()
        if not networks:
            raise ValueError("ProbabilityAverage needs at least one network")
        self.networks = nn.ModuleList(networks)
        self.flip_dims = [tuple(int(d) for d in dims) for dims in flip_dims]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        count = 0
        for network in self.networks:
            for dims in [()] + self.flip_dims:
                logits = network(x.flip(dims) if dims else x).float()
                probabilities = torch.softmax(logits, dim=1)
                probabilities = probabilities.flip(dims) if dims else probabilities
                total = probabilities if total is None else total + probabilities
                count += 1
        return torch.log((total / count).clamp_min(torch.finfo(torch.float32).tiny))


def probability_average(
    primary: nn.Module,
    template: nn.Module,
    checkpoints: Sequence[str | os.PathLike] = (),
    tta: bool | str = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """
    ``primary`` alone, or, with ``checkpoints`` or ``tta``, a :class:`ProbabilityAverage` of ``primary``
    and one copy of ``template`` per checkpoint (weights loaded with ``weights_only=True``), over the
    input and its left-right mirror when ``tta`` is on. What ``--ensemble`` and ``--tta`` of a bundle's
    ``inference.json``/``evaluate.json`` build.

    Args:
        primary: the bundle's network (or its fast path) with the bundle's checkpoint loaded.
        template: an eager network of the same architecture, copied for each extra checkpoint.
        checkpoints: more checkpoints of the same architecture to average with ``primary`` (e.g. the
            other folds of a cross-validation).
        tta: add the mirror along the last (width) axis; ``"true"``/``"false"`` strings are accepted
            from the command line.
        device: where the copies run.
    """
    tta = as_flag(tta, "tta")
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    if not checkpoints and not tta:
        return primary
    members = [primary]
    for path in checkpoints:
        member = copy.deepcopy(template)
        member.load_state_dict(load_checkpoint(path, map_location=device))
        members.append(member.to(device).eval())
    logger.info(f"prediction: mean probability of {len(members)} network(s){' and their left-right mirror' if tta else ''}")
    return ProbabilityAverage(members, flip_dims=[(-1,)] if tta else [])
