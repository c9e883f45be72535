"""Shallow SegNet with bilinear upsampling (seed 002)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from custom_nets.networks.utils import check_input

__all__ = ["ShallowSegNet"]


class ShallowSegNet(nn.Module):
    """
    SegNet encoder-decoder with fewer stages and bilinear upsampling instead of max-unpooling.

    Follows "Shallow SegNet with bilinear interpolation and weighted cross-entropy loss for semantic
    segmentation of brain tissue" (seed 002): SegNet's symmetric conv-BN-ReLU encoder and decoder
    (Badrinarayanan et al. 2017), cut to ``len(features)`` stages, with the decoder upsampling by
    bilinear (trilinear in 3D) interpolation, so no pooling indices are kept and there are no skip
    connections. Pair it with a class-weighted cross-entropy as in the paper.

    Stage ``i`` of the encoder is ``convs_per_stage`` 3x3 conv-norm-act blocks to ``features[i]``
    channels, then 2x2 max-pooling; the decoder mirrors it (upsample x2, then conv blocks, the last of
    which reduces to the next shallower width), and a 1x1 convolution gives the logits.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels (classes), returned as logits.
        features: channels of each stage, shallowest first (SegNet's VGG widths, three stages).
        convs_per_stage: conv-norm-act blocks per encoder and per decoder stage.
        act: activation type and arguments.
        norm: normalisation type and arguments.
        dropout: dropout ratio of every conv block.

    Inputs must have every spatial side a multiple of ``2 ** len(features)`` (``self.divisor``, 8 by default).

    Example::

        >>> net = ShallowSegNet(spatial_dims=2, in_channels=1, out_channels=4)
        >>> net(torch.zeros(1, 1, 64, 96)).shape
        torch.Size([1, 4, 64, 96])
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (64, 128, 256),
        convs_per_stage: int = 2,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(features) < 1 or convs_per_stage < 1:
            raise ValueError(f"need at least one stage and one conv per stage, got {features}, {convs_per_stage}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.divisor = 2 ** len(features)

        def conv_block(cin: int, cout: int) -> Convolution:
            # Bias is redundant before a normalisation layer.
            return Convolution(spatial_dims, cin, cout, kernel_size=3, act=act, norm=norm, dropout=dropout, bias=False)

        self.encoder = nn.ModuleList()
        channels = in_channels
        for width in features:
            blocks = [conv_block(channels, width)] + [conv_block(width, width) for _ in range(convs_per_stage - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            channels = width
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2)
        self.upsample = UpSample(
            spatial_dims, scale_factor=2, mode="nontrainable", interp_mode="linear", align_corners=False
        )
        self.decoder = nn.ModuleList()
        for i in reversed(range(len(features))):
            width, target = features[i], features[max(i - 1, 0)]
            blocks = [conv_block(width, width) for _ in range(convs_per_stage - 1)] + [conv_block(width, target)]
            self.decoder.append(nn.Sequential(*blocks))
        self.head = Conv[Conv.CONV, spatial_dims](features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.spatial_dims, self.divisor)
        for stage in self.encoder:
            x = self.pool(stage(x))
        for stage in self.decoder:
            x = stage(self.upsample(x))
        return self.head(x)
