"""
LUNA16 lung-nodule CT: dataset layout, nodule masks from world coordinates (the measurement of predicted
nodules is :mod:`custom_nets.metrics.nodules`).

Layout: ``<dataset_dir>/subset*/<seriesuid>.mhd`` (+ ``.raw``) and ``<dataset_dir>/annotations.csv`` with
the columns ``seriesuid, coordX, coordY, coordZ, diameter_mm``. The coordinates are world millimetres in
the scanner's patient space as ITK (and the MetaImage origin) gives it: LPS. MONAI's readers give
``affine`` in RAS (``space`` in the metadata), so points are flipped in x and y on the way; voxel <->
world mapping always goes through the volume's current affine, so origin, spacing AND direction count.

"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from custom_nets.data.splits import load_or_create_datalist
from custom_nets.errors import InputError

__all__ = [
    "ANNOTATION_COLUMNS",
    "NoduleAnnotationError",
    "read_annotations",
    "luna16_cases",
    "datalist",
    "world_to_voxel",
    "voxel_to_world",
    "nodule_mask",
    "NoduleMaskd",
]

logger = logging.getLogger(__name__)

#: Columns of LUNA16's ``annotations.csv``.
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")



class NoduleAnnotationError(InputError):
    """A bad annotations file or an annotation that does not fit its scan; one line naming the file or case."""


def read_annotations(csv_file: str | os.PathLike) -> dict[str, list[list[float]]]:
    """
    ``annotations.csv`` -> ``{seriesuid: [[coordX, coordY, coordZ, diameter_mm], ...]}``.

    Raises:
        ValueError: a missing file, missing columns, or a row with a non-numeric or non-positive value
            (the message names the file and line).
    """
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise NoduleAnnotationError(f"{csv_file}: LUNA16 annotations file not found")
    out: dict[str, list[list[float]]] = {}
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ANNOTATION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise NoduleAnnotationError(f"{csv_file}: missing column(s) {missing}; expected {list(ANNOTATION_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
                values = [float(row[c]) for c in ANNOTATION_COLUMNS[1:]]
            except (TypeError, ValueError):
                raise NoduleAnnotationError(f"{csv_file}, line {line}: non-numeric coordinate or diameter") from None
            if not all(math.isfinite(v) for v in values) or values[3] <= 0:
                raise NoduleAnnotationError(f"{csv_file}, line {line}: coordinates must be finite and the diameter positive")
            out.setdefault(row["seriesuid"].strip(), []).append(values)
    return out


def luna16_cases(
    dataset_dir: str | os.PathLike,
    annotations_file: str = "annotations.csv",
    subset_pattern: str = "subset*",
    include_negative: bool = True,
) -> list[dict[str, Any]]:
    """
    Datalist entries ``{"case": seriesuid, "image": mhd path, "nodules": [[x, y, z, d], ...]}`` of the
    scans under ``dataset_dir/subset_pattern``, sorted by series uid.

    Annotations of scans that are not on disk (subsets not downloaded) are skipped with one logged
    summary line.

    Args:
        dataset_dir: LUNA16 root.
        annotations_file: annotations CSV, relative to ``dataset_dir`` (or absolute).
        subset_pattern: glob of the subset folders.
        include_negative: keep scans without any annotated nodule (they add negative slices).

    Raises:
        ValueError: no such folder, no scan, or a bad annotations file.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise InputError(f"{dataset_dir}: LUNA16 dataset folder not found")
    annotations = read_annotations(dataset_dir / annotations_file)
    scans = sorted(dataset_dir.glob(f"{subset_pattern}/*.mhd"), key=lambda p: p.stem)
    if not scans:
        raise InputError(f"{dataset_dir}: no scans found at {subset_pattern}/*.mhd (LUNA16 layout expected)")
    on_disk = {p.stem for p in scans}
    absent = sorted(set(annotations) - on_disk)
    if absent:
        logger.info("%d annotated scan(s) of %s are not under %s and are ignored", len(absent), annotations_file, dataset_dir)
    items = [{"case": p.stem, "image": os.fspath(p), "nodules": annotations.get(p.stem, [])} for p in scans]
    return [item for item in items if include_negative or item["nodules"]]


def datalist(
    dataset_dir: str | os.PathLike,
    datalist_file: str | os.PathLike,
    annotations_file: str = "annotations.csv",
    subset_pattern: str = "subset*",
    include_negative: bool = True,
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """
    The training/validation/test datalist of a LUNA16 folder, one subject per series (LUNA16 gives no
    patient id), seeded, written once to ``datalist_file`` and reused; arguments as in
    :func:`luna16_cases` and :func:`custom_nets.data.splits.split_subjects`.

    Example::

        splits = datalist("/data/LUNA16", "datalist.json")
        splits["training"][0]  # {"case": "1.3.6...", "image": ".../subset0/1.3.6....mhd", "nodules": [[x, y, z, d]]}
    """
    return load_or_create_datalist(
        datalist_file,
        dataset_dir,
        make_items=lambda: luna16_cases(dataset_dir, annotations_file, subset_pattern, include_negative),
        subject_of=lambda item: item["case"],
        path_keys=("image",),
        fractions=fractions,
        seed=seed,
        settings={"annotations_file": annotations_file, "subset_pattern": subset_pattern, "include_negative": include_negative},
    )


def _lps_ras_flip(points: np.ndarray, space: str) -> np.ndarray:
    """LPS <-> RAS for ``(N, 3)`` points when ``space`` is RAS (the flip is its own inverse)."""
    if str(space).upper() == "RAS":
        return points * np.array([-1.0, -1.0, 1.0])
    return points


def world_to_voxel(points_lps: np.ndarray, affine: np.ndarray, space: str = "RAS") -> np.ndarray:
    """
    ``(N, 3)`` LPS world points (mm) -> ``(N, 3)`` continuous voxel indices of a volume with ``affine``
    (voxel -> world in ``space``, as in MONAI metadata).
    """
    affine = np.asarray(affine, dtype=np.float64)
    points = _lps_ras_flip(np.atleast_2d(np.asarray(points_lps, dtype=np.float64)), space)
    return (np.linalg.inv(affine) @ np.c_[points, np.ones(len(points))].T).T[:, :3]


def voxel_to_world(indices: np.ndarray, affine: np.ndarray, space: str = "RAS") -> np.ndarray:
    """``(N, 3)`` continuous voxel indices -> ``(N, 3)`` LPS world points (mm); inverse of :func:`world_to_voxel`."""
    affine = np.asarray(affine, dtype=np.float64)
    idx = np.atleast_2d(np.asarray(indices, dtype=np.float64))
    return _lps_ras_flip((affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3], space)


def nodule_mask(
    shape: Sequence[int],
    affine: np.ndarray,
    nodules: Sequence[Sequence[float]],
    space: str = "RAS",
    case: str = "case",
    on_outside: str = "raise",
) -> np.ndarray:
    """
    A uint8 mask of ``shape`` with a ball of each nodule's diameter around its world centre: a voxel
    is inside when its centre is within the radius in millimetres (anisotropic spacing and oblique
    directions are exact). The voxel nearest to the centre is always marked, so a nodule smaller than
    a voxel still appears.

    Args:
        shape: spatial shape ``(I, J, K)``.
        affine: voxel -> world affine in ``space``.
        nodules: ``[[coordX, coordY, coordZ, diameter_mm], ...]`` in LPS world mm.
        space: space of ``affine``, ``"RAS"`` (MONAI readers' default) or ``"LPS"``.
        case: name used in messages.
        on_outside: a nodule centre outside the volume: ``"raise"`` (default) or ``"skip"`` (logged warning).

    Raises:
        NoduleAnnotationError: a centre outside the volume with ``on_outside="raise"``.
    """
    if on_outside not in ("raise", "skip"):
        raise ValueError(f"on_outside must be 'raise' or 'skip', got {on_outside!r}")
    shape = tuple(int(s) for s in shape)
    affine = np.asarray(affine, dtype=np.float64)
    mask = np.zeros(shape, dtype=np.uint8)
    linear = affine[:3, :3]
    inverse = np.linalg.inv(linear)
    for n, (x, y, z, diameter) in enumerate(nodules):
        centre = world_to_voxel([[x, y, z]], affine, space)[0]
        if np.any(centre < -0.5) or np.any(centre > np.asarray(shape) - 0.5):
            message = (
                f"{case}: nodule {n} at ({x:.1f}, {y:.1f}, {z:.1f}) mm lies outside the volume "
                f"(voxel index {np.round(centre, 1).tolist()}, shape {list(shape)}); check origin/direction"
            )
            if on_outside == "raise":
                raise NoduleAnnotationError(message)
            logger.warning("%s: skipped", message)
            continue
        radius = diameter / 2.0
        half = radius * np.linalg.norm(inverse, axis=1)  # index-space half extent of the ball per axis
        lo = np.maximum(np.floor(centre - half), 0).astype(int)
        hi = np.minimum(np.ceil(centre + half), np.asarray(shape) - 1).astype(int)
        grid = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
        offsets = (grid - centre) @ linear.T  # mm from the centre, in world axes
        inside = np.einsum("...i,...i->...", offsets, offsets) <= radius * radius
        box = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
        mask[box] |= inside.astype(np.uint8)
        mask[tuple(np.clip(np.round(centre).astype(int), 0, np.asarray(shape) - 1))] = 1
    return mask


class NoduleMaskd(MapTransform):
    """
    Dictionary transform: builds the nodule mask of a loaded CT (``MetaTensor`` with ``affine`` and
    ``space``) from its ``nodules`` entry and stores it as a ``(1, I, J, K)`` uint8 ``MetaTensor``
    that shares the image's metadata, so later spatial transforms treat both alike.

    Args:
        keys: the image key(s) whose geometry the mask takes (one mask per key is written to ``label_key``).
        nodules_key: key of ``[[coordX, coordY, coordZ, diameter_mm], ...]`` (LPS world mm).
        label_key: key the mask is written to.
        case_key: key of the case name, used in messages.
        on_outside: see :func:`nodule_mask`.

    Example::

        NoduleMaskd(keys="image", nodules_key="nodules", label_key="label")
    """

    def __init__(
        self,
        keys: KeysCollection,
        nodules_key: str = "nodules",
        label_key: str = "label",
        case_key: str = "case",
        on_outside: str = "raise",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.nodules_key, self.label_key, self.case_key, self.on_outside = nodules_key, label_key, case_key, on_outside

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor):
                raise TypeError(f"{key}: NoduleMaskd needs a MetaTensor with an affine (load it with LoadVolumed)")
            mask = nodule_mask(
                image.shape[1:],
                image.affine.numpy(),
                d.get(self.nodules_key) or [],
                space=str(image.meta.get("space", "RAS")),
                case=str(d.get(self.case_key, image.meta.get("case", key))),
                on_outside=self.on_outside,
            )
            label = MetaTensor(torch.from_numpy(mask)[None])
            label.copy_meta_from(image)
            d[self.label_key] = label
        return d
