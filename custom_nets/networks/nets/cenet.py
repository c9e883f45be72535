"""CE-Net (Gu et al., IEEE TMI 2019), faithful to the official ``CE_Net_`` but scriptable."""

from __future__ import annotations

import os

import torch
from monai.networks.layers.factories import Act, Conv
from torch import nn

from custom_nets.networks.blocks.cenet_decoder_block import CENetDecoderBlock
from custom_nets.networks.blocks.dense_atrous_conv import DenseAtrousConv
from custom_nets.networks.blocks.residual_multikernel_pooling import ResidualMultiKernelPooling
from custom_nets.networks.blocks.resnet_encoder import ResNetEncoder
from custom_nets.networks.utils import check_input, load_pretrained_encoder

__all__ = ["CENet"]


class CENet(nn.Module):
    """
    Context Encoder Network: ResNet-34 encoder, DAC and RMP context blocks, CE-Net decoder.

    Structure of the official ``CE_Net_`` (Guzaiwang/CE-Net, ``networks/cenet.py``)::

        e1..e4 = ResNet-34 layer1..layer4            (strides 4, 8, 16, 32)
        e = RMP(DAC(e4))                             (512 + 4 channels)
        d4 = dec4(e) + e3; d3 = dec3(d4) + e2; d2 = dec2(d3) + e1; d1 = dec1(d2)
        logits = conv3x3(relu(conv3x3(relu(deconv4x4_s2(d1)))))

    Differences from the official code, all on purpose: logits are returned (no sigmoid, so any
    loss and multi-class output work), the RMP block clamps its pools to small bottlenecks, nothing
    is assigned in ``forward`` (``torch.jit.script`` works), any ``in_channels`` is accepted, and
    ImageNet weights come only from a local file. With ``in_channels=3, out_channels=1`` it has
    29,003,093 parameters (official: the same layers).

    Args:
        spatial_dims: number of spatial dimensions (2 is the tested path; 3 builds the same layers in 3D).
        in_channels: number of input channels.
        out_channels: number of output channels (classes), returned as logits.
        pretrained_path: optional local torchvision ``resnet34`` state dict loaded into the encoder
            (the first convolution is adapted to ``in_channels``; ``fc.*`` is ignored).

    Inputs must have every spatial side a multiple of 32.

    Example::

        >>> net = CENet(spatial_dims=2, in_channels=1, out_channels=2)
        >>> net(torch.zeros(1, 1, 64, 96)).shape
        torch.Size([1, 2, 64, 96])
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        pretrained_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.divisor = 32
        filters = [64, 128, 256, 512]
        self.encoder = ResNetEncoder(spatial_dims=spatial_dims, in_channels=in_channels, depth=34)
        if pretrained_path is not None:
            load_pretrained_encoder(self.encoder, pretrained_path)
        self.dac = DenseAtrousConv(spatial_dims, filters[3])
        self.rmp = ResidualMultiKernelPooling(spatial_dims, filters[3])
        self.decoder4 = CENetDecoderBlock(spatial_dims, self.rmp.out_channels, filters[2])
        self.decoder3 = CENetDecoderBlock(spatial_dims, filters[2], filters[1])
        self.decoder2 = CENetDecoderBlock(spatial_dims, filters[1], filters[0])
        self.decoder1 = CENetDecoderBlock(spatial_dims, filters[0], filters[0])
        self.final_deconv = Conv[Conv.CONVTRANS, spatial_dims](filters[0], 32, kernel_size=4, stride=2, padding=1)
        self.final_act1 = Act[Act.RELU](inplace=True)
        self.final_conv1 = Conv[Conv.CONV, spatial_dims](32, 32, kernel_size=3, padding=1)
        self.final_act2 = Act[Act.RELU](inplace=True)
        self.final_conv2 = Conv[Conv.CONV, spatial_dims](32, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.spatial_dims, self.divisor)
        _, e1, e2, e3, e4 = self.encoder(x)
        context = self.rmp(self.dac(e4))
        d4 = self.decoder4(context) + e3
        d3 = self.decoder3(d4) + e2
        d2 = self.decoder2(d3) + e1
        d1 = self.decoder1(d2)
        out = self.final_act1(self.final_deconv(d1))
        out = self.final_act2(self.final_conv1(out))
        return self.final_conv2(out)
