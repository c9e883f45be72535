"""Adaptive Atrous Convolution (AAC): a learned softmax mix of dilated convolutions with attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import ChannelSELayer
from monai.networks.layers.factories import Act, Conv, Norm
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

__all__ = ["AdaptiveAtrousConv"]


class AdaptiveAtrousConv(nn.Module):
    """
    Adaptive Atrous Convolution (docs/design.md, "The network"), on the deepest encoder features.

    A bank of 3x3 convolutions at several dilation rates sees the same (channel-reduced) features; their
    outputs are mixed as ``F = sum_i softmax(a)_i * Conv_i(x)`` with the mixing logits ``a`` learned, so the
    network itself chooses the rate (``dilation_weights()`` reads the mix after training). Spatial attention
    ``sigmoid(Conv(F))`` then channel attention ``sigmoid(FC(GAP(F_s)))`` (MONAI's squeeze-and-excitation)
    reweight the result, which is projected back and added to the input (residual).

    The bank works on ``in_channels // reduction`` channels: at full width a four-rate bank of 512-channel
    convolutions costs 9.4 M parameters and dominates the bottleneck's FLOPs at large inputs.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels of the input (and of the output).
        rates: dilation rates of the bank.
        reduction: channel reduction of the bank relative to ``in_channels``.
        attention_kernel_size: kernel of the spatial-attention convolution.
        norm: normalisation of the convolutions: a MONAI factory name or ``(name, {args})``, e.g.
            ``("group", {"num_groups": 8})``.
        act: activation: a MONAI factory name or ``(name, {args})``.

    Example::

        >>> aac = AdaptiveAtrousConv(spatial_dims=2, in_channels=512)
        >>> aac(torch.randn(2, 512, 8, 8)).shape
        torch.Size([2, 512, 8, 8])
        >>> sorted(aac.dilation_weights())
        [1, 3, 5, 7]
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        rates: Sequence[int] = (1, 3, 5, 7),
        reduction: int = 4,
        attention_kernel_size: int = 7,
        norm: str | tuple = Norm.BATCH,
        act: str | tuple = Act.RELU,
    ) -> None:
        super().__init__()
        if len(rates) < 1:
            raise ValueError("AdaptiveAtrousConv needs at least one dilation rate.")
        conv = Conv[Conv.CONV, spatial_dims]
        mid = max(in_channels // reduction, 1)
        self.rates = [int(r) for r in rates]

        self.reduce = nn.Sequential(
            conv(in_channels, mid, kernel_size=1, bias=False), get_norm_layer(norm, spatial_dims, mid), get_act_layer(act)
        )
        self.bank = nn.ModuleList(
            [conv(mid, mid, kernel_size=3, padding=r, dilation=r, bias=False) for r in self.rates]
        )
        # Zero logits: every rate starts with the same weight and training moves the mix.
        self.mixing_logits = nn.Parameter(torch.zeros(len(self.rates)))
        self.mix_norm = nn.Sequential(get_norm_layer(norm, spatial_dims, mid), get_act_layer(act))
        self.spatial_attention = nn.Sequential(
            conv(mid, 1, kernel_size=attention_kernel_size, padding=attention_kernel_size // 2), nn.Sigmoid()
        )
        self.channel_attention = ChannelSELayer(spatial_dims, mid, r=4)
        self.expand = nn.Sequential(conv(mid, in_channels, kernel_size=1, bias=False), get_norm_layer(norm, spatial_dims, in_channels))
        self.out_act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.reduce(x)
        weights = torch.softmax(self.mixing_logits, dim=0)
        mixed = torch.zeros_like(reduced)
        for i, conv in enumerate(self.bank):
            mixed = mixed + weights[i] * conv(reduced)
        mixed = self.mix_norm(mixed)
        spatial = mixed * self.spatial_attention(mixed)
        context = self.channel_attention(spatial)
        return self.out_act(x + self.expand(context))

    @torch.jit.export
    def dilation_weights(self) -> dict[int, float]:
        """The learned mix of the bank: ``{rate: softmax weight}``, summing to 1."""
        weights = torch.softmax(self.mixing_logits.detach(), dim=0)
        mix: dict[int, float] = {}
        for i, rate in enumerate(self.rates):
            mix[rate] = float(weights[i].item())
        return mix
