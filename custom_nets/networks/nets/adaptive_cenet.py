"""AdaptiveCENet: the project's network (docs/design.md, "The network")."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Norm
from torch import nn

from custom_nets.networks.blocks.adaptive_atrous_conv import AdaptiveAtrousConv
from custom_nets.networks.blocks.attention_rmp import AttentionRMP
from custom_nets.networks.blocks.dual_path_decoder import DualPathDecoder
from custom_nets.networks.blocks.feature_aggregation import FeatureAggregation
from custom_nets.networks.blocks.resnet_encoder import ResNetEncoder
from custom_nets.networks.utils import check_input, load_pretrained_encoder

__all__ = ["AdaptiveCENet"]


class AdaptiveCENet(nn.Module):
    """
    Context-encoder network with adaptive atrous convolution, attention RMP, feature aggregation and a
    dual-path decoder (``docs/design.md``, "The network").

    Data flow (strides relative to the input)::

        ResNet-34 encoder -> stem /2, e1 /4, e2 /8, e3 /16, e4 /32
        e4 -> AdaptiveAtrousConv -> AttentionRMP -> context (512 + 4 channels, /32)
        FeatureAggregation(e1..e4) on the /8 grid, added to the e2 skip (residual)
        DualPathDecoder(context, skips e3, e2 + aggregation, e1) -> /4
        1x1 head -> logits, upsampled to the input size

    The decoder ends at stride 4 and the logits are upsampled, so no convolution runs at full resolution:
    that is where CE-Net spends a large part of its FLOPs, and what keeps this network faster than CE-Net
    although it adds modules.

    Args:
        spatial_dims: 2 (the tested case) or 3.
        in_channels: input channels (any number; pretrained stem weights are adapted).
        out_channels: output channels (classes, or labels for sigmoid outputs).
        pretrained_path: optional local file with a torchvision ResNet-34 state dict (e.g. ImageNet weights
            saved with ``torch.save(torchvision.models.resnet34(weights=...).state_dict(), path)``).
        aac_rates: dilation rates of the adaptive atrous convolution.
        aac_reduction: channel reduction of the atrous bank.
        rmp_pool_sizes: pooling sizes of the attention RMP.
        global_channels: width of the decoder's global path.
        decoder_channels: width of the fused decoder output before the head.
        act: activation of the blocks after the encoder (AAC, aggregation, decoder): a MONAI factory name or
            ``(name, {args})``.
        norm: normalisation of those blocks: a MONAI factory name or ``(name, {args})``, e.g.
            ``("group", {"num_groups": 16})`` for small batches. The ResNet-34 encoder keeps batch norm and
            ReLU: its ImageNet weights were trained with them (and MONAI's ResNet passes neither to its
            residual blocks).
        The feature aggregation is added to the e2 skip, so it has that skip's channels (128).

    Input sides must be multiples of 32; a wrong input raises a ``ValueError`` naming the problem.

    Example::

        >>> net = AdaptiveCENet(spatial_dims=2, in_channels=1, out_channels=2)
        >>> net(torch.randn(1, 1, 256, 192)).shape
        torch.Size([1, 2, 256, 192])
        >>> net.dilation_weights()  # the learned mix of atrous rates (uniform before training)
        {1: 0.25, 3: 0.25, 5: 0.25, 7: 0.25}
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        pretrained_path: str | os.PathLike | None = None,
        aac_rates: Sequence[int] = (1, 3, 5, 7),
        aac_reduction: int = 4,
        rmp_pool_sizes: Sequence[int] = (2, 3, 5, 6),
        global_channels: int = 64,
        decoder_channels: int = 32,
        act: str | tuple = Act.RELU,
        norm: str | tuple = Norm.BATCH,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"AdaptiveCENet supports spatial_dims 2 or 3, got {spatial_dims}.")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels} and {out_channels}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.divisor = 32  # total stride of the encoder
        self.interpolation = "bilinear" if spatial_dims == 2 else "trilinear"

        self.encoder = ResNetEncoder(spatial_dims, in_channels, depth=34)
        if pretrained_path is not None:
            load_pretrained_encoder(self.encoder, pretrained_path)
        _, c1, c2, c3, c4 = self.encoder.out_channels

        self.aac = AdaptiveAtrousConv(spatial_dims, c4, rates=aac_rates, reduction=aac_reduction, norm=norm, act=act)
        self.rmp = AttentionRMP(spatial_dims, c4, pool_sizes=rmp_pool_sizes)
        self.aggregation = FeatureAggregation(spatial_dims, in_channels=(c1, c2, c3, c4), out_channels=c2, norm=norm)
        self.decoder = DualPathDecoder(
            spatial_dims,
            context_channels=self.rmp.out_channels,
            skip_channels=(c3, c2, c1),
            global_channels=global_channels,
            out_channels=decoder_channels,
            norm=norm,
            act=act,
        )
        self.head = Conv[Conv.CONV, spatial_dims](decoder_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.spatial_dims, self.divisor)
        _, e1, e2, e3, e4 = self.encoder(x)
        context = self.rmp(self.aac(e4))
        e2 = e2 + self.aggregation([e1, e2, e3, e4], e2)
        features = self.decoder(context, [e3, e2, e1])
        return F.interpolate(self.head(features), size=x.shape[2:], mode=self.interpolation, align_corners=False)

    @torch.jit.export
    def dilation_weights(self) -> dict[int, float]:
        """The learned softmax mix of the adaptive atrous convolution, ``{rate: weight}``."""
        return self.aac.dilation_weights()
