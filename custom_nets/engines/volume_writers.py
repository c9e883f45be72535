"""
Per-case outputs of :class:`custom_nets.engines.folder_inference.FolderInference` for 3D volumes: the
mask as NIfTI in the scan's exact geometry, and the per-nodule table of a lung CT. Files are written
atomically.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom_nets.metrics.nodules import nodule_table, write_nodule_csv
from custom_nets.data.volume_io import write_mask_like
from custom_nets.flags import as_flag

__all__ = ["VolumeMaskWriter", "NoduleTableWriter"]


def _source_meta(case: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    meta = getattr(case.get(key), "meta", None)
    if not meta or "original_affine" not in meta or "spatial_shape" not in meta:
        raise ValueError(f"'{key}' carries no reader geometry (original_affine, spatial_shape); load it with LoadVolumed")
    return meta


class VolumeMaskWriter:
    """
    Write a case's label map ``(1, I, J, K)`` (post-processed back to the scan's voxel grid, e.g. with
    ``Invertd``) to ``<output_dir>/<case><postfix>.nii.gz`` with the shape and affine the reader gave
    for the scan (:func:`custom_nets.data.volume_io.write_mask_like`), so it overlays the scan in any
    viewer, whatever the input format (NIfTI, NRRD, MetaImage, DICOM series, BraTS case folder).

    Args:
        output_dir: output folder (created when missing).
        pred_key: key of the label map.
        image_key: key of the loaded scan, whose metadata gives the geometry and the case name.
        postfix: added to the case name.

    Returns from a call ``{"mask": <file name>}``.

    Raises (per case, caught by ``FolderInference``):
        ValueError: the label map is not on the scan's voxel grid.
    """

    #: the result columns that name a file this writer wrote (removed again when a later output of the case fails)
    file_columns = ("mask",)

    def __init__(self, output_dir: str | os.PathLike, pred_key: str = "pred", image_key: str = "image", postfix: str = "_seg") -> None:
        self.output_dir = Path(output_dir)
        self.pred_key, self.image_key, self.postfix = pred_key, image_key, postfix

    def __call__(self, case: Mapping[str, Any]) -> dict[str, str]:
        meta = _source_meta(case, self.image_key)
        path = self.output_dir / f"{meta.get('case', 'case')}{self.postfix}.nii.gz"
        write_mask_like(torch.as_tensor(case[self.pred_key]), meta, path, dtype=np.uint8)
        return {"mask": path.name}


class NoduleTableWriter:
    """
    Measure the connected components of a lung-CT nodule mask (:func:`custom_nets.metrics.nodules.nodule_table`:
    centre in LPS world mm like LUNA16's annotations, equivalent diameter, volume) and keep one table
    for the whole run at ``<output_dir>/<filename>``, rewritten atomically after each case so that it
    is complete up to the last finished case even if the job stops.

    Args:
        output_dir: output folder (created when missing).
        pred_key: key of the label map ``(1, I, J, K)`` on the scan's voxel grid (non-zero = nodule).
        image_key: key of the loaded scan (geometry and case name).
        filename: name of the table.
        min_voxels: smaller components are left out.
        keep_existing: start from the rows of an existing table (a resumed run, ``--skip_existing``): the
            cases it does not run again keep their nodules; a case run again gets its new rows.

    Returns from a call ``{"nodules": <count>}``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = "pred",
        image_key: str = "image",
        filename: str = "nodules.csv",
        min_voxels: int = 1,
        keep_existing: bool | str = False,
    ) -> None:
        self.path = Path(output_dir) / filename
        self.pred_key, self.image_key, self.min_voxels = pred_key, image_key, min_voxels
        self._rows: dict[str, list[dict[str, Any]]] = {}
        if as_flag(keep_existing, "keep_existing") and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    self._rows.setdefault(row.get("case", ""), []).append(row)

    def __call__(self, case: Mapping[str, Any]) -> dict[str, int]:
        meta = _source_meta(case, self.image_key)
        name = str(meta.get("case", "case"))
        mask = torch.as_tensor(case[self.pred_key])
        shape = tuple(int(s) for s in np.asarray(meta["spatial_shape"]).tolist())
        if tuple(mask.shape[-3:]) != shape:
            raise ValueError(f"{name}: mask shape {tuple(mask.shape)} is not on the scan's grid {shape}")
        rows = nodule_table(mask, np.asarray(meta["original_affine"]), str(meta.get("space", "RAS")), name, self.min_voxels)
        self._rows[name] = rows
        write_nodule_csv([row for case_rows in self._rows.values() for row in case_rows], self.path)
        return {"nodules": len(rows)}
