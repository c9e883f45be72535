"""
A small synthetic dataset in the BraTS 2020 layout, for demos and tests without a download.

``<output_dir>/BraTS20_Training_XXX/BraTS20_Training_XXX_{t1,t1ce,t2,flair,seg}.nii.gz``: a
skull-stripped "brain" ellipsoid (exactly 0 outside, like BraTS) with one tumour per case: necrotic
core (label 1), enhancing rim (4) and surrounding edema (2), each with a sequence-specific contrast
(enhancing bright on T1ce, edema bright on FLAIR and T2, ...). Labels follow the BraTS 2020
convention (0/1/2/4); the affine is BraTS's (LPS-like ``diag(-1, -1, 1)``), 1 mm voxels.

Command line::

    python -m custom_nets.data.synthetic_brats --output_dir /tmp/brats --num_cases 10
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from custom_nets.data import synthetic
from custom_nets.atomic_write import atomic_path, write_text_atomic

__all__ = ["TISSUE_CONTRAST", "MARKER_FILE", "generate", "generate_once"]

logger = logging.getLogger(__name__)

#: Written last, like BraTS 2020's own ``name_mapping.csv``: its presence means the dataset is complete.
MARKER_FILE = "name_mapping.csv"

#: Mean intensity per sequence of (brain, edema, enhancing rim, necrosis).
TISSUE_CONTRAST = {
    "t1": (500.0, 380.0, 420.0, 250.0),
    "t1ce": (520.0, 400.0, 1100.0, 260.0),
    "t2": (450.0, 900.0, 700.0, 1000.0),
    "flair": (400.0, 1000.0, 750.0, 500.0),
}


def _save(image: nib.Nifti1Image, path: Path) -> None:
    # atomic: processes that generate the same dataset at once (DDP ranks) never read a partial file
    with atomic_path(path) as tmp:
        nib.save(image, os.fspath(tmp))


def generate(
    output_dir: str,
    num_cases: int = 10,
    shape: Sequence[int] = (64, 64, 40),
    sequences: Sequence[str] = ("t1", "t1ce", "t2", "flair"),
    prefix: str = "BraTS20_Training",
    seed: int = 0,
) -> str:
    """
    Write a synthetic BraTS-2020-layout dataset and return its folder.

    Args:
        output_dir: destination (created; existing cases of the same names are overwritten).
        num_cases: number of cases ``<prefix>_001`` ...
        shape: volume size in voxels.
        sequences: sequence names to write; names outside :data:`TISSUE_CONTRAST` get FLAIR's contrast.
        prefix: case-name prefix.
        seed: random seed; the same seed writes the same dataset.

    Example::

        generate("/tmp/brats", num_cases=3, shape=(48, 48, 32))
    """
    rng = np.random.default_rng(seed)
    out = Path(output_dir)
    shape = tuple(int(s) for s in shape)
    size = np.asarray(shape, dtype=np.float64)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    affine = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, size[1] - 1], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    for case_index in range(num_cases):
        case = f"{prefix}_{case_index + 1:03d}"
        brain_r = size * np.array([0.42, 0.45, 0.42])
        brain = sum(((g - s / 2) / r) ** 2 for g, s, r in zip(grid, size, brain_r)) <= 1.0
        centre = size / 2 + rng.uniform(-0.18, 0.18, 3) * size
        tumour_r = float(rng.uniform(0.10, 0.16) * size.min())
        # distance in units of the tumour radius, with a slightly elongated shape per case
        stretch = rng.uniform(0.8, 1.25, 3)
        dist = np.sqrt(sum(((g - c) / (tumour_r * s)) ** 2 for g, c, s in zip(grid, centre, stretch)))
        label = np.zeros(shape, dtype=np.uint8)
        label[(dist <= 1.9) & brain] = 2  # edema
        label[(dist <= 1.0) & brain] = 4  # enhancing rim
        label[(dist <= 0.55) & brain] = 1  # necrotic core
        folder = out / case
        folder.mkdir(parents=True, exist_ok=True)
        for sequence in sequences:
            means = TISSUE_CONTRAST.get(sequence, TISSUE_CONTRAST["flair"])
            image = np.zeros(shape, dtype=np.float32)
            image[brain] = means[0]
            for lab, mean in ((2, means[1]), (4, means[2]), (1, means[3])):
                image[label == lab] = mean
            image += rng.normal(0.0, 40.0, shape).astype(np.float32) * brain
            image[~brain] = 0.0  # skull-stripped: exactly zero outside the brain
            _save(nib.Nifti1Image(np.clip(image, 0, None).astype(np.int16), affine), folder / f"{case}_{sequence}.nii.gz")
        _save(nib.Nifti1Image(label, affine), folder / f"{case}_seg.nii.gz")
    names = "\n".join(f"synthetic,{prefix}_{i + 1:03d}" for i in range(num_cases))
    write_text_atomic(out / MARKER_FILE, f"Grade,BraTS_2020_subject_ID\n{names}\n")  # last: marks the set complete
    logger.info("wrote %d synthetic BraTS cases to %s", num_cases, out)
    return os.fspath(out)


def generate_once(output_dir: str, **kwargs) -> str:
    """
    :func:`generate` unless ``output_dir`` already holds a complete dataset (its
    :data:`MARKER_FILE`, written last, is there); returns ``output_dir``. The brain MRI bundle calls this
    for its default dataset, so its commands run on a fresh machine without a download.
    """
    return synthetic.generate_once(output_dir, MARKER_FILE, generate, "BraTS", **kwargs)


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO)
    fire.Fire(generate)
