"""
A small synthetic dataset in the LUNA16 layout, for demos and tests without a download.

``<output_dir>/subset<k>/<seriesuid>.mhd`` + ``.raw`` (int16 Hounsfield units: air, a body ellipse,
two lungs, spherical soft-tissue nodules) and ``<output_dir>/annotations.csv`` with each nodule's
world centre (LPS mm, as ITK computes it from origin, spacing and direction) and diameter. The scans
cycle through three geometries, so readers are exercised on more than the identity case:
identity direction; x and y axes flipped; an oblique rotation (15 degrees about z, 10 about x).
Every scan has a non-zero origin and anisotropic spacing.

Command line::

    python -m custom_nets.data.synthetic_luna16 --output_dir /tmp/luna16 --num_cases 10
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from custom_nets.data import synthetic
from custom_nets.atomic_write import atomic_path

__all__ = ["GEOMETRIES", "generate", "generate_once"]

logger = logging.getLogger(__name__)


def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    cz, sz = math.cos(math.radians(z_deg)), math.sin(math.radians(z_deg))
    cx, sx = math.cos(math.radians(x_deg)), math.sin(math.radians(x_deg))
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    return rz @ rx


#: ITK direction matrices (columns: world direction of the i, j, k index axes), used in turn.
GEOMETRIES = (np.eye(3), np.diag([-1.0, -1.0, 1.0]), _rotation(15.0, 10.0))


def _ellipsoid(grid: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def generate(
    output_dir: str,
    num_cases: int = 10,
    shape: Sequence[int] = (96, 96, 40),
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    nodules_per_case: int = 2,
    diameter_range_mm: Sequence[float] = (6.0, 14.0),
    num_subsets: int = 2,
    seed: int = 0,
) -> str:
    """
    Write a synthetic LUNA16-layout dataset and return its folder.

    Args:
        output_dir: destination (created; existing scans of the same names are overwritten).
        num_cases: number of scans, spread over ``subset0`` .. ``subset<num_subsets-1>``.
        shape: volume size in voxels ``(I, J, K)`` (x, y, z index axes).
        spacing: voxel size in mm.
        nodules_per_case: nodules per scan (one scan in every four has none, as in LUNA16).
        diameter_range_mm: smallest and largest nodule diameter.
        num_subsets: number of ``subset*`` folders.
        seed: random seed; the same seed writes the same dataset.

    Example::

        generate("/tmp/luna16", num_cases=3, shape=(64, 64, 24))
    """
    import itk

    rng = np.random.default_rng(seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in shape)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    index = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    size = np.asarray(shape, dtype=np.float64)
    rows = []
    for case_index in range(num_cases):
        uid = f"1.2.826.0.1.3680043.8.498.{seed}.{case_index + 1}"
        direction = GEOMETRIES[case_index % len(GEOMETRIES)]
        origin = np.array([-0.5 * shape[0] * spacing[0], -0.6 * shape[1] * spacing[1], -200.0 - 10 * case_index])
        body = _ellipsoid(index[:2], size[:2] / 2, size[:2] * np.array([0.46, 0.40]))
        hu = np.full(shape, -1000.0, dtype=np.float32)
        hu[body] = 40.0
        lungs = []
        for side in (-1, 1):
            centre = (size[0] * (0.5 + side * 0.2), size[1] * 0.5, size[2] * 0.5)
            lung = _ellipsoid(index, centre, (size[0] * 0.15, size[1] * 0.28, size[2] * 0.45))
            hu[lung] = -850.0
            lungs.append((centre, lung))
        count = 0 if case_index % 4 == 3 else nodules_per_case
        for n in range(count):
            lung_centre, _ = lungs[n % 2]
            diameter = float(rng.uniform(*diameter_range_mm))
            # a centre well inside the lung, at a sub-voxel position so rounding errors would show
            centre_idx = np.asarray(lung_centre) + rng.uniform(-0.35, 0.35, 3) * size * np.array([0.15, 0.28, 0.3])
            offsets = (np.stack(index, axis=-1) - centre_idx.astype(np.float32)) * spacing_arr.astype(np.float32)
            ball = np.einsum("...i,...i->...", offsets, offsets) <= (diameter / 2) ** 2  # mm; direction is a rotation
            hu[ball] = 30.0
            world = origin + direction @ (spacing_arr * centre_idx)  # ITK: physical = origin + D * (spacing * index)
            rows.append([uid, *(round(float(v), 4) for v in world), round(diameter, 4)])
        hu += rng.normal(0.0, 15.0, shape).astype(np.float32)
        image = itk.image_from_array(np.ascontiguousarray(np.round(hu).astype(np.int16).transpose(2, 1, 0)))
        image.SetSpacing([float(s) for s in spacing])
        image.SetOrigin([float(o) for o in origin])
        image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
        subset = out / f"subset{case_index % max(num_subsets, 1)}"
        # written in a private folder, then moved in data first: processes that generate the same
        # dataset at once (DDP ranks) never read a header without its complete data file
        with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
            itk.imwrite(image, os.fspath(Path(tmp) / f"{uid}.mhd"), compression=False)
            subset.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / f"{uid}.raw", subset / f"{uid}.raw")
            os.replace(Path(tmp) / f"{uid}.mhd", subset / f"{uid}.mhd")
    with atomic_path(out / "annotations.csv") as tmp, open(tmp, "w", newline="") as f:  # last: marks the set complete
        writer = csv.writer(f)
        writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        writer.writerows(rows)
    logger.info("wrote %d synthetic LUNA16 scans with %d nodules to %s", num_cases, len(rows), out)
    return os.fspath(out)


def generate_once(output_dir: str, **kwargs) -> str:
    """
    :func:`generate` unless ``output_dir`` already holds a complete dataset
    (``annotations.csv``, written last, is there); returns ``output_dir``. The lung CT bundle calls this
    for its default dataset, so its commands run on a fresh machine without a download.
    """
    return synthetic.generate_once(output_dir, "annotations.csv", generate, "LUNA16", **kwargs)


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO)
    fire.Fire(generate)
