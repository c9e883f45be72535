"""Hausdorff distance in millimetres for volumes whose voxel size travels with them (MetaTensor affine)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric

__all__ = ["PhysicalHausdorffDistanceMetric", "voxel_spacing"]


def voxel_spacing(image: torch.Tensor) -> list[tuple[float, ...]] | None:
    """
    The voxel size (mm) of each item of a batch-first ``MetaTensor``, from the column norms of its affine
    (one affine, or one per item of a collated batch); ``None`` without metadata.
    """
    if not isinstance(image, MetaTensor) or "affine" not in image.meta:
        return None
    affine = np.asarray(torch.as_tensor(image.meta["affine"]).detach().cpu(), dtype=np.float64)
    affines = affine if affine.ndim == 3 else np.broadcast_to(affine, (image.shape[0], *affine.shape))
    rank = affine.shape[-1] - 1
    return [tuple(float(v) for v in np.linalg.norm(a[:rank, :rank], axis=0)) for a in affines]


class PhysicalHausdorffDistanceMetric(HausdorffDistanceMetric):
    """
    MONAI's ``HausdorffDistanceMetric`` with the ``spacing`` of every case taken from the prediction's
    affine (``MetaTensor`` metadata), so distances are in millimetres for anisotropic volumes (CT with
    0.7 x 0.7 x 2.5 mm voxels) without passing spacing by hand; MONAI's metric handlers call the
    metric without it. Tensors without metadata fall back to unit spacing (voxels).

    Use it through MONAI's ``IgniteMetricHandler`` in a bundle config (one case per item: the
    evaluator decollates, so every case gets its own spacing)::

        "val_hd95": {"_target_": "IgniteMetricHandler",
                     "metric_fn": {"_target_": "custom_nets.metrics.physical_hausdorff.PhysicalHausdorffDistanceMetric",
                                   "include_background": false, "percentile": 95, "reduction": "mean"},
                     "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}

    Args: as ``monai.metrics.HausdorffDistanceMetric``.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if kwargs.get("spacing") is None:
            spacing = voxel_spacing(y_pred)
            if spacing is not None and len(spacing) == y_pred.shape[0] and len(spacing[0]) == y_pred.ndim - 2:
                kwargs["spacing"] = spacing
        return super()._compute_tensor(y_pred, y, **kwargs)
