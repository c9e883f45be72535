"""Aggregation of the features of every encoder stage on one grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm
from monai.networks.layers.utils import get_norm_layer
from torch import nn

__all__ = ["FeatureAggregation"]


class FeatureAggregation(nn.Module):
    """
    Feature aggregation layer (docs/design.md, "The network").

    Every encoder stage is projected by a 1x1 convolution to ``out_channels`` (at its own resolution, where
    it is cheapest), resized to the grid of ``target`` and summed; the sum is normalised. The caller adds the
    result to a decoder input (the residual connection of the paper).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each encoder stage, finest first.
        out_channels: channels of the aggregated map.
        norm: normalisation applied to the sum: a MONAI factory name or ``(name, {args})``.

    Example::

        >>> agg = FeatureAggregation(2, in_channels=(64, 128, 256), out_channels=128)
        >>> feats = [torch.randn(1, 64, 32, 32), torch.randn(1, 128, 16, 16), torch.randn(1, 256, 8, 8)]
        >>> agg(feats, target=feats[1]).shape
        torch.Size([1, 128, 16, 16])
    """

    def __init__(
        self, spatial_dims: int, in_channels: Sequence[int], out_channels: int, norm: str | tuple = Norm.BATCH
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.interpolation = "bilinear" if spatial_dims == 2 else "trilinear"
        self.projections = nn.ModuleList([conv(c, out_channels, kernel_size=1, bias=False) for c in in_channels])
        self.norm = get_norm_layer(norm, spatial_dims, out_channels)

    def forward(self, features: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        grid = target.shape[2:]
        merged = torch.zeros(1, dtype=target.dtype, device=target.device)
        for i, projection in enumerate(self.projections):
            projected = projection(features[i])
            if projected.shape[2:] != grid:
                projected = F.interpolate(projected, size=grid, mode=self.interpolation, align_corners=False)
            merged = merged + projected
        return self.norm(merged)
