"""CE-Net's Dense Atrous Convolution (DAC) block."""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Act, Conv
from monai.networks.layers.utils import get_act_layer
from torch import nn

__all__ = ["DenseAtrousConv"]


class DenseAtrousConv(nn.Module):
    """
    Dense Atrous Convolution block of CE-Net (Gu et al., IEEE TMI 2019), as in the official code.

    Three 3x3 convolutions at increasing dilation and one 1x1 convolution are shared between four
    cascaded branches; their ReLU outputs are added to the input (residual)::

        b1 = relu(dilate1(x))
        b2 = relu(conv1x1(dilate2(x)))
        b3 = relu(conv1x1(dilate2(dilate1(x))))
        b4 = relu(conv1x1(dilate3(dilate2(dilate1(x)))))
        out = x + b1 + b2 + b3 + b4

    The paper's figure shows rates 1, 3, 5 as a cascade without weight sharing; the official
    ``DACblock`` shares the convolutions as above, and this class follows the code.
    Channels and spatial size are preserved.

    Args:
        spatial_dims: number of spatial dimensions of the input.
        channels: number of input (and output) channels.
        dilations: dilation rates of ``dilate1``, ``dilate2``, ``dilate3``.
        act: activation of the branches: a MONAI factory name or ``(name, {args})``.

    Example::

        >>> dac = DenseAtrousConv(spatial_dims=2, channels=512)
        >>> dac(torch.zeros(1, 512, 8, 8)).shape
        torch.Size([1, 512, 8, 8])
    """

    def __init__(
        self, spatial_dims: int, channels: int, dilations: tuple[int, int, int] = (1, 3, 5), act: str | tuple = Act.RELU
    ) -> None:
        super().__init__()
        if len(dilations) != 3:
            raise ValueError(f"DenseAtrousConv needs exactly three dilation rates, got {dilations}.")
        conv_type = Conv[Conv.CONV, spatial_dims]
        # "same" padding for a 3x3 kernel at dilation d is d.
        self.dilate1 = conv_type(channels, channels, kernel_size=3, dilation=dilations[0], padding=dilations[0])
        self.dilate2 = conv_type(channels, channels, kernel_size=3, dilation=dilations[1], padding=dilations[1])
        self.dilate3 = conv_type(channels, channels, kernel_size=3, dilation=dilations[2], padding=dilations[2])
        self.conv1x1 = conv_type(channels, channels, kernel_size=1)
        self.act = get_act_layer(act)
        # The official block starts every bias at zero.
        for conv in (self.dilate1, self.dilate2, self.dilate3, self.conv1x1):
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.dilate1(x)
        d21 = self.dilate2(d1)
        branch1 = self.act(d1)
        branch2 = self.act(self.conv1x1(self.dilate2(x)))
        branch3 = self.act(self.conv1x1(d21))
        branch4 = self.act(self.conv1x1(self.dilate3(d21)))
        return x + branch1 + branch2 + branch3 + branch4
