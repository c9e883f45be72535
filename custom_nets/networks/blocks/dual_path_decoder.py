"""Dual-path decoder: a global transposed-convolution path and a local skip-connection path."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Norm
from torch import nn

__all__ = ["DualPathDecoder"]


class DualPathDecoder(nn.Module):
    """
    Dual-path feature decoder (docs/design.md, "The network").

    - Global path: the context features are reduced to ``global_channels`` and brought up by transposed
      convolutions (stride 2 each) to the grid of the last skip, keeping the overall structure.
    - Local path: from the context features, each stage convolves (at the coarse grid, where it is cheap),
      upsamples x2 and adds the encoder skip of that grid, for accurate boundaries.
    - Fusion: the two paths are concatenated and merged by one light 3x3 convolution.

    The decoder stops at the grid of the last skip (stride 4 for a ResNet encoder); the network's head
    upsamples its logits to the input size, so no convolution runs at full resolution.

    Args:
        spatial_dims: 2 or 3.
        context_channels: channels of the context (bottleneck) features.
        skip_channels: channels of the skips, coarsest first; each skip is at twice the previous grid.
        global_channels: width of the global path.
        out_channels: channels of the fused output.
        norm: normalisation (MONAI factory name).
        act: activation (MONAI factory name).

    Example::

        >>> decoder = DualPathDecoder(2, context_channels=516, skip_channels=(256, 128, 64))
        >>> skips = [torch.randn(1, 256, 4, 4), torch.randn(1, 128, 8, 8), torch.randn(1, 64, 16, 16)]
        >>> decoder(torch.randn(1, 516, 2, 2), skips).shape
        torch.Size([1, 32, 16, 16])
    """

    def __init__(
        self,
        spatial_dims: int,
        context_channels: int,
        skip_channels: Sequence[int],
        global_channels: int = 64,
        out_channels: int = 32,
        norm: str | tuple = Norm.BATCH,
        act: str | tuple = Act.RELU,
    ) -> None:
        super().__init__()
        self.interpolation = "bilinear" if spatial_dims == 2 else "trilinear"

        def conv(c_in: int, c_out: int, kernel_size: int = 3, transposed: bool = False) -> Convolution:
            return Convolution(
                spatial_dims, c_in, c_out, strides=2 if transposed else 1, kernel_size=kernel_size,
                act=act, norm=norm, bias=False, is_transposed=transposed,
            )

        # Local path: stage i maps the previous width to skip_channels[i] before the x2 upsampling.
        widths = [context_channels] + list(skip_channels)
        self.local_stages = nn.ModuleList([conv(widths[i], widths[i + 1]) for i in range(len(skip_channels))])
        # Global path: one transposed convolution per skip grid.
        global_layers = [conv(context_channels, global_channels, kernel_size=1)]
        global_layers += [conv(global_channels, global_channels, transposed=True) for _ in skip_channels]
        self.global_path = nn.Sequential(*global_layers)
        self.fusion = conv(skip_channels[-1] + global_channels, out_channels)

    def forward(self, context: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        local = context
        for i, stage in enumerate(self.local_stages):
            skip = skips[i]
            local = F.interpolate(stage(local), size=skip.shape[2:], mode=self.interpolation, align_corners=False)
            local = local + skip
        global_features = self.global_path(context)
        return self.fusion(torch.cat([local, global_features], dim=1))
