"""custom_nets: the seed network, its baselines and the losses used by this project's MONAI bundles."""

from custom_nets.networks.nets import AdaptiveCENet, CENet, ResNetUNet, ShallowSegNet

__version__ = "0.1.0"
__all__ = ["AdaptiveCENet", "CENet", "ResNetUNet", "ShallowSegNet"]
