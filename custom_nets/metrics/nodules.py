"""
Per-nodule measurements of a predicted lung-CT mask: one row per connected component, reported the same way
as LUNA16's annotations (LPS world mm, the column names of ``annotations.csv``), so that a prediction table
can be compared with the reference directly (:mod:`custom_nets.data.luna16`).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from custom_nets.atomic_write import atomic_path
from custom_nets.data.luna16 import voxel_to_world

__all__ = ["NODULE_TABLE_COLUMNS", "nodule_table", "write_nodule_csv"]

#: Columns of the per-nodule table written at inference (coordinates: LPS world mm, like the annotations).
NODULE_TABLE_COLUMNS = ("case", "nodule", "coordX", "coordY", "coordZ", "diameter_mm", "volume_mm3", "voxels")


def _component_sizes_and_centres(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """
    Voxel count and centre of mass (voxel indices) of components ``1..count`` of a label volume, summed
    slice by slice with ``np.bincount``: the temporaries are the size of one slice, where
    ``scipy.ndimage.center_of_mass`` makes a float64 copy of the whole volume per axis.
    """
    sums = np.zeros((count + 1, 4), dtype=np.float64)  # voxels, sum of i, sum of j, sum of k
    j_index, k_index = (g.ravel() for g in np.meshgrid(*[np.arange(n, dtype=np.float64) for n in labels.shape[1:]], indexing="ij"))
    for i in range(labels.shape[0]):
        plane = labels[i].ravel()
        per_label = np.bincount(plane, minlength=count + 1)
        sums[:, 0] += per_label
        sums[:, 1] += i * per_label
        sums[:, 2] += np.bincount(plane, weights=j_index, minlength=count + 1)
        sums[:, 3] += np.bincount(plane, weights=k_index, minlength=count + 1)
    voxels = sums[1:, 0]
    return voxels.astype(int), sums[1:, 1:] / np.maximum(voxels, 1)[:, None]


def nodule_table(
    mask: np.ndarray | torch.Tensor,
    affine: np.ndarray,
    space: str = "RAS",
    case: str = "",
    min_voxels: int = 1,
) -> list[dict[str, Any]]:
    """
    One row per connected component (26-connectivity) of a binary ``(I, J, K)`` mask: the centre of
    mass in LPS world mm (``coordX/Y/Z``, as in LUNA16's annotations), the equivalent-sphere diameter
    ``(6 V / pi)^(1/3)`` in mm, the volume in mm3 and the voxel count. Components are numbered from 1 by
    decreasing volume. Only the bounding box of the foreground is labelled, to keep memory small.

    Args:
        mask: binary mask (non-zero = nodule), ``(I, J, K)`` or ``(1, I, J, K)``.
        affine: voxel -> world affine of the mask's grid, in ``space``.
        space: ``"RAS"`` or ``"LPS"``.
        case: value of the ``case`` column.
        min_voxels: smaller components are left out.

    Example::

        rows = nodule_table(pred[0], pred.meta["original_affine"], case="lung1")
        rows[0]  # {"case": "lung1", "nodule": 1, "coordX": ..., "diameter_mm": 6.2, "volume_mm3": 125.0, "voxels": 640}
    """
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    foreground = array > 0
    if not foreground.any():
        return []
    occupied = [np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    box = tuple(slice(int(idx[0]), int(idx[-1]) + 1) for idx in occupied)
    labels, count = ndimage.label(foreground[box], structure=np.ones((3, 3, 3), dtype=bool))
    voxels, centres = _component_sizes_and_centres(labels, count)
    centres += np.array([s.start for s in box], dtype=np.float64)
    world = voxel_to_world(centres, affine, space)
    voxel_volume = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))
    rows = []
    for i in np.argsort(-voxels, kind="stable"):
        if voxels[i] < min_voxels:
            continue
        volume = float(voxels[i]) * voxel_volume
        rows.append(
            {
                "case": case,
                "nodule": len(rows) + 1,
                "coordX": round(float(world[i, 0]), 3),
                "coordY": round(float(world[i, 1]), 3),
                "coordZ": round(float(world[i, 2]), 3),
                "diameter_mm": round((6.0 * volume / math.pi) ** (1.0 / 3.0), 3),
                "volume_mm3": round(volume, 3),
                "voxels": int(voxels[i]),
            }
        )
    return rows


def write_nodule_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write :func:`nodule_table` rows (columns :data:`NODULE_TABLE_COLUMNS`) atomically; a header-only file when empty."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=NODULE_TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path
