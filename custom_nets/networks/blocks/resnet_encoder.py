"""ResNet encoder whose parameter names match torchvision's ``resnet18/34/50/101``."""

from __future__ import annotations

import torch
from monai.networks.nets import ResNet

__all__ = ["ResNetEncoder", "RESNET_LAYERS"]

# (block, layers) of the torchvision ResNet family this encoder reproduces.
RESNET_LAYERS: dict[int, tuple[str, list[int]]] = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
}


class ResNetEncoder(ResNet):
    """
    A MONAI ``ResNet`` without its classifier that returns the features of every stage.

    MONAI's ResNet with shortcut type B and no downsample bias names its parameters exactly like
    torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0`` ...), so ImageNet
    weights saved from torchvision load into it with ``load_state_dict``.

    Args:
        spatial_dims: number of spatial dimensions of the input.
        in_channels: number of input channels.
        depth: 18, 34, 50 or 101.

    Returns from ``forward`` a tuple of five maps: the stem (stride 2, before max-pooling) and
    ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32). Their channel counts are in ``out_channels``.

    Example::

        >>> encoder = ResNetEncoder(spatial_dims=2, in_channels=1, depth=34)
        >>> [f.shape[1] for f in encoder(torch.zeros(1, 1, 64, 64))]
        [64, 64, 128, 256, 512]
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 3, depth: int = 34) -> None:
        if depth not in RESNET_LAYERS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {depth}.")
        block, layers = RESNET_LAYERS[depth]
        super().__init__(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            bias_downsample=False,
            feed_forward=False,
        )
        expansion = 1 if block == "basic" else 4
        self.out_channels = [64] + [w * expansion for w in (64, 128, 256, 512)]
        # ``fc`` is None without a classifier; drop the pooling too so the state dict is encoder-only.
        del self.avgpool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        stem = self.act(self.bn1(self.conv1(x)))
        e1 = self.layer1(self.maxpool(stem))
        e2 = self.layer2(e1)
        e3 = self.layer3(e2)
        e4 = self.layer4(e3)
        return stem, e1, e2, e3, e4
