"""MONAI-style transforms of our own (what MONAI does not have)."""

from custom_nets.transforms.antialiased_resize import AntiAliasedResize, AntiAliasedResized
from custom_nets.transforms.head_mask import POSTPROCESS_MODES, HeadMaskd, head_mask

__all__ = ["AntiAliasedResize", "AntiAliasedResized", "POSTPROCESS_MODES", "HeadMaskd", "head_mask"]
