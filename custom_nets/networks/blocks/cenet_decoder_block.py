"""CE-Net's decoder block: 1x1 reduce, 3x3 transposed convolution (x2), 1x1 expand."""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

__all__ = ["CENetDecoderBlock"]


class CENetDecoderBlock(nn.Module):
    """
    Decoder block of CE-Net (Gu et al., IEEE TMI 2019) that doubles the spatial size.

    ``conv1`` (1x1, ``in_channels -> mid_channels``) -> ``deconv2`` (3x3 transposed, stride 2,
    padding 1, output padding 1) -> ``conv3`` (1x1, ``mid_channels -> out_channels``), each followed by
    normalisation and activation. Layer names follow the official ``DecoderBlock``.

    Args:
        spatial_dims: number of spatial dimensions of the input.
        in_channels: number of input channels.
        out_channels: number of output channels.
        mid_channels: channels of the transposed convolution; ``in_channels // 4`` (CE-Net) when None.
        act: activation type and arguments, after each convolution.
        norm: normalisation type and arguments, after each convolution.

    Example::

        >>> block = CENetDecoderBlock(spatial_dims=2, in_channels=516, out_channels=256)
        >>> block(torch.zeros(1, 516, 8, 12)).shape
        torch.Size([1, 256, 16, 24])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        mid_channels: int | None = None,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        mid = in_channels // 4 if mid_channels is None else mid_channels
        if mid < 1:
            raise ValueError(f"CENetDecoderBlock needs at least 1 middle channel, got in_channels={in_channels}.")
        self.conv1 = Conv[Conv.CONV, spatial_dims](in_channels, mid, kernel_size=1)
        self.norm1 = get_norm_layer(norm, spatial_dims=spatial_dims, channels=mid)
        self.act1 = get_act_layer(act)
        self.deconv2 = Conv[Conv.CONVTRANS, spatial_dims](
            mid, mid, kernel_size=3, stride=2, padding=1, output_padding=1
        )
        self.norm2 = get_norm_layer(norm, spatial_dims=spatial_dims, channels=mid)
        self.act2 = get_act_layer(act)
        self.conv3 = Conv[Conv.CONV, spatial_dims](mid, out_channels, kernel_size=1)
        self.norm3 = get_norm_layer(norm, spatial_dims=spatial_dims, channels=out_channels)
        self.act3 = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.act2(self.norm2(self.deconv2(x)))
        return self.act3(self.norm3(self.conv3(x)))
