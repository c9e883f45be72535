from custom_nets.losses.hybrid_dice_boundary import HybridDiceBoundaryLoss
from custom_nets.losses.weighted_cross_entropy import WeightedCrossEntropyLoss, class_frequency_weights

__all__ = ["HybridDiceBoundaryLoss", "WeightedCrossEntropyLoss", "class_frequency_weights"]
