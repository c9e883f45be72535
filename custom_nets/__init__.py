"""custom_nets: the seed network, its baselines and the losses used by this project's MONAI bundles."""

from custom_nets.handlers.boundary_weight_ramp import BoundaryWeightRamp, boundary_weight_at
from custom_nets.losses import HybridDiceBoundaryLoss, WeightedCrossEntropyLoss, class_frequency_weights
from custom_nets.networks.nets import AdaptiveCENet, CENet, ResNetUNet, ShallowSegNet

__version__ = "0.1.0"
__all__ = [
    "AdaptiveCENet",
    "BoundaryWeightRamp",
    "CENet",
    "HybridDiceBoundaryLoss",
    "ResNetUNet",
    "ShallowSegNet",
    "WeightedCrossEntropyLoss",
    "boundary_weight_at",
    "class_frequency_weights",
]
