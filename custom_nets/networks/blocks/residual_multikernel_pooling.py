"""CE-Net's Residual Multi-kernel Pooling (RMP) block, safe on small feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import nn

__all__ = ["ResidualMultiKernelPooling"]


class ResidualMultiKernelPooling(nn.Module):
    """
    Residual Multi-kernel Pooling block of CE-Net (Gu et al., IEEE TMI 2019).

    The input is max-pooled with kernel = stride = each of ``pool_sizes``; ONE shared 1x1 convolution
    reduces every pooled map to a single channel, which is upsampled (bilinear / trilinear) back to
    the input size. The ``len(pool_sizes)`` maps are concatenated before the input, so the output has
    ``in_channels + len(pool_sizes)`` channels (516 for CE-Net's 512).

    Unlike the official ``SPPblock`` this block assigns nothing in ``forward`` (TorchScript works) and
    clamps each pool size to the feature map, so a 2x2 bottleneck (a 64x64 input to CE-Net) pools
    with a 2x2 kernel instead of failing; where the map is large enough the result is the official one.
    ``torch.jit.trace`` records the clamped sizes as constants (hence its TracerWarning): a trace taken
    on a map of at least ``max(pool_sizes)`` per side (192 px into CE-Net) holds for every larger input.

    Args:
        spatial_dims: number of spatial dimensions of the input (2 or 3).
        in_channels: number of input channels.
        pool_sizes: kernel sizes (and strides) of the max-poolings.

    Example::

        >>> rmp = ResidualMultiKernelPooling(spatial_dims=2, in_channels=512)
        >>> rmp(torch.zeros(1, 512, 2, 3)).shape
        torch.Size([1, 516, 2, 3])
    """

    def __init__(self, spatial_dims: int, in_channels: int, pool_sizes: Sequence[int] = (2, 3, 5, 6)) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ResidualMultiKernelPooling supports 2 or 3 spatial dims, got {spatial_dims}.")
        if not pool_sizes or any(int(p) < 1 for p in pool_sizes):
            raise ValueError(f"pool_sizes must be positive integers, got {pool_sizes}.")
        self.spatial_dims = spatial_dims
        self.pool_sizes = [int(p) for p in pool_sizes]
        self.interp_mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, 1, kernel_size=1)
        self.out_channels = in_channels + len(self.pool_sizes)

    def _max_pool(self, x: torch.Tensor, kernel: list[int]) -> torch.Tensor:
        if self.spatial_dims == 2:
            return F.max_pool2d(x, kernel, kernel)
        return F.max_pool3d(x, kernel, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = list(x.shape[2:])
        maps: list[torch.Tensor] = []
        for pool_size in self.pool_sizes:
            kernel = [min(pool_size, side) for side in size]
            pooled = self.conv(self._max_pool(x, kernel))
            maps.append(F.interpolate(pooled, size=size, mode=self.interp_mode, align_corners=False))
        maps.append(x)
        return torch.cat(maps, dim=1)
