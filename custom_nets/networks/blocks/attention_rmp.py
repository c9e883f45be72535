"""Residual multi-kernel pooling with a learned attention over the pooling scales."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Pool
from torch import nn

__all__ = ["AttentionRMP"]


class AttentionRMP(nn.Module):
    """
    Attention RMP (docs/design.md, "The network"), CE-Net's residual multi-kernel pooling plus scale attention.

    The input is max-pooled with kernel = stride = each of ``pool_sizes``; every pooled map goes through its
    own 1x1 convolution to one channel and is upsampled back to the input grid. A small MLP on the globally
    pooled input gives a softmax weight per scale, and the weighted maps are concatenated with the input,
    so the output has ``in_channels + len(pool_sizes)`` channels.

    Pool sizes are clamped to the feature map, so small bottlenecks (inputs below 192 px, where CE-Net's
    RMP fails) work.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input.
        pool_sizes: kernel (= stride) of each max pooling.
        attention_hidden: hidden width of the scale-attention MLP.

    Example::

        >>> rmp = AttentionRMP(spatial_dims=2, in_channels=512)
        >>> rmp(torch.randn(1, 512, 2, 2)).shape
        torch.Size([1, 516, 2, 2])
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, pool_sizes: Sequence[int] = (2, 3, 5, 6), attention_hidden: int = 32
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"AttentionRMP supports 2 or 3 spatial dims, got {spatial_dims}.")
        conv = Conv[Conv.CONV, spatial_dims]
        self.spatial_dims = spatial_dims
        self.pool_sizes = [int(p) for p in pool_sizes]
        self.interpolation = "bilinear" if spatial_dims == 2 else "trilinear"
        self.out_channels = in_channels + len(self.pool_sizes)
        self.scale_convs = nn.ModuleList([conv(in_channels, 1, kernel_size=1) for _ in self.pool_sizes])
        self.global_pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.scale_attention = nn.Sequential(
            nn.Linear(in_channels, attention_hidden), Act[Act.RELU](), nn.Linear(attention_hidden, len(self.pool_sizes))
        )

    def _max_pool(self, x: torch.Tensor, size: int) -> torch.Tensor:
        if self.spatial_dims == 2:
            return F.max_pool2d(x, kernel_size=size, stride=size)
        return F.max_pool3d(x, kernel_size=size, stride=size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.shape[2:]
        smallest_side = min(grid)
        # (B, scales): uniform attention gives every scale the weight 1.
        attention = torch.softmax(self.scale_attention(torch.flatten(self.global_pool(x), 1)), dim=1)
        attention = attention * len(self.pool_sizes)
        scales: list[torch.Tensor] = []
        for i, scale_conv in enumerate(self.scale_convs):
            pooled = self._max_pool(x, min(self.pool_sizes[i], smallest_side))
            upsampled = F.interpolate(scale_conv(pooled), size=grid, mode=self.interpolation, align_corners=False)
            weight = attention[:, i].reshape([-1] + [1] * (x.dim() - 1))
            scales.append(upsampled * weight)
        scales.append(x)
        return torch.cat(scales, dim=1)
