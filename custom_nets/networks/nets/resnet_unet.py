"""U-Net with a torchvision-compatible ResNet encoder: ResNet34-UNet and Res101-UNet (seed 003)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import UpCat
from torch import nn

from custom_nets.networks.blocks.resnet_encoder import ResNetEncoder
from custom_nets.networks.utils import check_input, load_pretrained_encoder

__all__ = ["ResNetUNet"]


class ResNetUNet(nn.Module):
    """
    U-Net whose encoder is a ResNet (torchvision parameter names), e.g. Res101-UNet of seed 003.

    The decoder is that of the common "U-Net with pretrained encoder" recipe (as in
    segmentation_models_pytorch, the API seed 003 used): five stages, each an x2 upsampling
    (nearest by default), concatenation with the encoder map of that resolution (layer3, layer2,
    layer1, stem, none at full resolution) and two 3x3 conv-BN-ReLU blocks (MONAI's ``UpCat``),
    then a 1x1 convolution to logits at the input size.

    Args:
        spatial_dims: number of spatial dimensions (2 is the tested path).
        in_channels: number of input channels.
        out_channels: number of output channels (classes), returned as logits.
        depth: ResNet depth, 18, 34, 50 or 101 (the baselines use 34 and 101).
        pretrained_path: optional local torchvision ``resnet<depth>`` state dict loaded into the encoder
            (the first convolution is adapted to ``in_channels``; ``fc.*`` is ignored).
        decoder_channels: output channels of the five decoder stages, deepest first.
        upsample_mode: interpolation of the x2 upsampling, ``"nearest"`` or ``"linear"``.

    Inputs must have every spatial side a multiple of 32.

    Example::

        >>> net = ResNetUNet(spatial_dims=2, in_channels=1, out_channels=3, depth=34)
        >>> net(torch.zeros(1, 1, 64, 96)).shape
        torch.Size([1, 3, 64, 96])
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        depth: int = 34,
        pretrained_path: str | os.PathLike | None = None,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        upsample_mode: str = "nearest",
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 entries (one per x2 upsampling), got {decoder_channels}.")
        if upsample_mode not in ("nearest", "linear"):
            raise ValueError(f"upsample_mode must be 'nearest' or 'linear', got {upsample_mode!r}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.divisor = 32
        self.encoder = ResNetEncoder(spatial_dims=spatial_dims, in_channels=in_channels, depth=depth)
        if pretrained_path is not None:
            load_pretrained_encoder(self.encoder, pretrained_path)
        stem_ch, e1_ch, e2_ch, e3_ch, e4_ch = self.encoder.out_channels
        # Skip widths per decoder stage, deepest first; the full-resolution stage has none.
        skip_channels = (e3_ch, e2_ch, e1_ch, stem_ch, 0)
        in_chs = [e4_ch] + list(decoder_channels[:-1])
        align_corners = None if upsample_mode == "nearest" else False
        self.decoder = nn.ModuleList(
            UpCat(
                spatial_dims,
                in_chns=cin,
                cat_chns=skip,
                out_chns=cout,
                act=("relu", {"inplace": True}),
                norm="batch",
                bias=False,
                upsample="nontrainable",
                pre_conv=None,
                interp_mode=upsample_mode,
                align_corners=align_corners,
                is_pad=False,  # check_input guarantees matching sizes
            )
            for cin, skip, cout in zip(in_chs, skip_channels, decoder_channels)
        )
        self.head = Conv[Conv.CONV, spatial_dims](decoder_channels[-1], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.spatial_dims, self.divisor)
        stem, e1, e2, e3, e4 = self.encoder(x)
        x = self.decoder[0](e4, e3)
        x = self.decoder[1](x, e2)
        x = self.decoder[2](x, e1)
        x = self.decoder[3](x, stem)
        x = self.decoder[4](x, None)
        return self.head(x)
