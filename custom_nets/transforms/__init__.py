"""MONAI-style transforms of our own (what MONAI does not have)."""

from custom_nets.transforms.head_mask import POSTPROCESS_MODES, HeadMaskd, head_mask

__all__ = ["POSTPROCESS_MODES", "HeadMaskd", "head_mask"]
