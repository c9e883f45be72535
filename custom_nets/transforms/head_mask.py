"""
Post-processing of a fetal head mask, as the HC18 challenge's leading methods do: keep the largest
region (holes filled), or replace the mask by the filled ellipse fitted to its contour, so that the
mask and the head circumference measured from it describe the same ellipse.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from custom_nets.metrics.head_circumference import ELLIPSE_META_KEY, fit_head_ellipse

__all__ = ["POSTPROCESS_MODES", "head_mask", "HeadMaskd"]

#: ``ellipse``: the filled fitted ellipse; ``largest``: the largest region, holes filled; ``none``: as predicted.
POSTPROCESS_MODES = ("ellipse", "largest", "none")


def _largest_region(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    box = ndimage.find_objects(labels, max_label=largest)[largest - 1]
    region = np.zeros_like(mask)
    region[box] = ndimage.binary_fill_holes(labels[box] == largest)  # holes lie inside the box: fill there only
    return region


def head_mask(pred: torch.Tensor, mode: str = "ellipse", foreground_channel: int = 1) -> torch.Tensor:
    """
    Post-process one 2D head prediction, keeping its type, shape, dtype and metadata.

    Args:
        pred: ``(1, H, W)`` binary mask (non-zero is the head) or ``(2, H, W)`` one-hot prediction.
        mode: one of :data:`POSTPROCESS_MODES`. An empty mask stays empty; a mask no ellipse fits
            falls back to ``largest``. The fitted ellipse (pixels) goes into a MetaTensor's
            ``meta["head_ellipse"]``, so that the head circumference is measured on it, not refitted.
        foreground_channel: the head's channel of a one-hot prediction.

    Example::

        head_mask(torch.as_tensor(mask[None]), "ellipse")  # (1, H, W): the filled fitted ellipse
    """
    if mode not in POSTPROCESS_MODES:
        raise ValueError(f"postprocess must be one of {', '.join(POSTPROCESS_MODES)}, got {mode!r}")
    if pred.ndim != 3 or pred.shape[0] not in (1, 2):
        raise ValueError(f"head post-processing needs a 2D (1, H, W) mask or (2, H, W) one-hot prediction, got shape {list(pred.shape)}")
    if mode == "none":
        return pred
    one_hot = pred.shape[0] == 2
    mask = (pred[foreground_channel] > 0.5 if one_hot else pred[0] > 0).detach().cpu().numpy()
    ellipse = fit_head_ellipse(mask) if mode == "ellipse" and mask.any() else None  # it keeps the largest region itself
    region = ellipse.to_mask(mask.shape) if ellipse is not None else _largest_region(mask)
    head = torch.as_tensor(region, device=pred.device).to(pred.dtype)
    out = pred.clone()
    if isinstance(out, MetaTensor):  # the ellipse, for HeadCircumference to measure instead of fitting it again
        out.meta.pop(ELLIPSE_META_KEY, None)
        if ellipse is not None:
            out.meta[ELLIPSE_META_KEY] = list(ellipse)
    if one_hot:
        out[foreground_channel] = head
        out[1 - foreground_channel] = 1 - head
    else:
        out[0] = head
    return out


class HeadMaskd(MapTransform):
    """
    Dictionary form of :func:`head_mask`, for a bundle's post-processing (``--postprocess`` of the
    fetal head bundle).

    Args:
        keys: keys of the predictions (``(1, H, W)`` masks or ``(2, H, W)`` one-hot).
        mode: one of :data:`POSTPROCESS_MODES`.
        foreground_channel: the head's channel of a one-hot prediction.
        allow_missing_keys: do not raise for a missing key.

    Example, after ``AsDiscreted`` in ``inference.json``::

        {"_target_": "custom_nets.transforms.HeadMaskd", "keys": "pred", "mode": "@postprocess"}
    """

    def __init__(
        self, keys: KeysCollection, mode: str = "ellipse", foreground_channel: int = 1, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in POSTPROCESS_MODES:
            raise ValueError(f"postprocess must be one of {', '.join(POSTPROCESS_MODES)}, got {mode!r}")
        self.mode = mode
        self.foreground_channel = foreground_channel

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = head_mask(d[key], self.mode, self.foreground_channel)
        return d
