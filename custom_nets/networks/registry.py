"""
The networks this project compares, by name: one table for the architecture comparison
(``python -m custom_nets.tracking.architectures``) and the latency benchmark (``benchmarks/latency.py``).

Each entry is a ``network_def`` without the arguments the data decides (``spatial_dims``, ``in_channels``,
``out_channels``), which the caller adds.
"""

from __future__ import annotations

from typing import Any

from monai.bundle import ConfigParser
from torch import nn

from custom_nets.errors import InputError

__all__ = ["NETWORKS", "COMPARED_NETWORKS", "network_def", "build_network"]

NETWORKS: dict[str, dict[str, Any]] = {
    "AdaptiveCENet": {"_target_": "custom_nets.networks.nets.adaptive_cenet.AdaptiveCENet"},
    "CENet": {"_target_": "custom_nets.networks.nets.cenet.CENet"},
    # MONAI's residual U-Net at the usual 5-level size
    "UNet": {"_target_": "monai.networks.nets.UNet", "channels": [32, 64, 128, 256, 512], "strides": [2, 2, 2, 2], "num_res_units": 2},
    "ResNetUNet34": {"_target_": "custom_nets.networks.nets.resnet_unet.ResNetUNet", "depth": 34},
    "ResNetUNet101": {"_target_": "custom_nets.networks.nets.resnet_unet.ResNetUNet", "depth": 101},
    "ShallowSegNet": {"_target_": "custom_nets.networks.nets.shallow_segnet.ShallowSegNet"},
}
#: the architecture comparison's default set (ResNet-101 costs a CPU budget several times over)
COMPARED_NETWORKS = ("AdaptiveCENet", "CENet", "UNet", "ResNetUNet34", "ShallowSegNet")


def network_def(name: str, **data_args: Any) -> dict[str, Any]:
    """
    The ``network_def`` of network ``name`` with ``data_args`` (``spatial_dims``, ``in_channels``, ...) added.

    Raises:
        InputError: ``name`` is not in :data:`NETWORKS`.

    Example::

        network_def("UNet", spatial_dims=2, in_channels=1, out_channels=2)
        # {'_target_': 'monai.networks.nets.UNet', 'channels': [32, ...], ..., 'spatial_dims': 2, 'in_channels': 1, 'out_channels': 2}
    """
    if name not in NETWORKS:
        raise InputError(f"unknown network '{name}'; choose from {', '.join(NETWORKS)}")
    return {**NETWORKS[name], **data_args}


def build_network(name: str, **data_args: Any) -> nn.Module:
    """Network ``name`` built from :func:`network_def`, as a bundle config builds it."""
    return ConfigParser({"net": network_def(name, **data_args)}).get_parsed_content("net")
