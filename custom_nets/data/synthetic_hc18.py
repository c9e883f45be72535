"""
A synthetic dataset in the HC18 layout: bright elliptical skulls in ultrasound-like speckle, with
annotations and the pixel-size CSV, so the fetal head bundle runs on a fresh machine with no download.

Command line::

    python -m custom_nets.data.synthetic_hc18 --output_dir /tmp/hc18_synthetic --num_images 40
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from custom_nets.data import synthetic
from custom_nets.atomic_write import atomic_path, write_csv_atomic
from custom_nets.data.hc18 import ANNOTATION_SUFFIX, IMAGE_FOLDER, PIXEL_SIZE_CSV
from custom_nets.ellipse import Ellipse, ellipse_perimeter

__all__ = ["synthetic_case", "generate", "generate_once"]


def synthetic_case(
    rng: np.random.Generator, height: int = 540, width: int = 800, stroke_px: float = 3.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Ellipse]:
    """
    One synthetic ultrasound image with its head annotation.

    The head is an ellipse of random size, position and angle. Like HC18, the reference ellipse is the
    centre line of an annotation outline ``stroke_px`` wide, and a filled annotation includes the stroke.

    Args:
        rng: random generator (the case is a function of its state).
        height: image height in pixels.
        width: image width in pixels.
        stroke_px: width of the annotation outline.

    Returns:
        the image (uint8 ``(height, width)``), the filled annotation and the outline annotation (bool),
        and the reference ellipse in pixels.
    """
    short = min(height, width)
    semi_major = rng.uniform(0.22, 0.36) * short
    semi_minor = semi_major * rng.uniform(0.72, 0.9)
    margin = semi_major + stroke_px + 2
    center = (
        rng.uniform(margin, max(margin + 1, height - margin)) if height > 2 * margin else height / 2,
        rng.uniform(margin, max(margin + 1, width - margin)) if width > 2 * margin else width / 2,
    )
    ellipse = Ellipse(center[0], center[1], semi_major, semi_minor, rng.uniform(-math.pi / 2, math.pi / 2))
    half = stroke_px / 2

    def grown(delta: float) -> np.ndarray:
        return ellipse._replace(semi_major=semi_major + delta, semi_minor=semi_minor + delta).to_mask((height, width))

    filled = grown(half)
    outline = filled & ~grown(-half)

    # tissue: smooth random texture; skull: a bright ring a few mm thick; brain: darker with a midline echo
    tissue = ndimage.gaussian_filter(rng.random((height, width)), sigma=short / 40)
    tissue = 0.25 + 0.5 * (tissue - tissue.min()) / max(float(np.ptp(tissue)), 1e-6)
    skull = filled & ~grown(-0.06 * semi_minor - half)
    brain = grown(-0.06 * semi_minor - half)
    intensity = np.where(brain, 0.2, tissue)
    intensity = np.where(skull, rng.uniform(0.8, 1.0), intensity)
    cos, sin = math.cos(ellipse.angle), math.sin(ellipse.angle)
    d0, d1 = np.meshgrid(np.arange(height) - center[0], np.arange(width) - center[1], indexing="ij")
    midline = np.abs(-d0 * sin + d1 * cos) < max(1.0, short / 200)
    intensity = np.where(brain & midline, 0.6, intensity)
    intensity = ndimage.gaussian_filter(intensity, sigma=1.0)
    speckle = rng.rayleigh(scale=0.8, size=(height, width))  # multiplicative, as in B-mode ultrasound
    image = np.clip(intensity * speckle * 255 / 1.6, 0, 255).astype(np.uint8)
    return image, filled, outline, ellipse


def generate(
    output_dir: str,
    num_images: int = 40,
    height: int = 540,
    width: int = 800,
    annotation: str = "filled",
    repeat_every: int = 4,
    seed: int = 0,
) -> str:
    """
    Write ``num_images`` synthetic cases in the HC18 layout under ``output_dir``::

        training_set/NNN_HC.png, training_set/NNN_HC_Annotation.png   (every ``repeat_every``-th subject
        training_set/NNN_2HC.png ...                                    also gets a second scan)
        training_set_pixel_size_and_HC.csv                              pixel size and reference HC in mm

    Args:
        output_dir: dataset folder to create (existing files of the same names are replaced).
        num_images: number of images (at least 3, for a train/val/test split by subject).
        height: image height in pixels (HC18: mostly 540).
        width: image width in pixels (HC18: mostly 800).
        annotation: ``"filled"`` (like our HC18 sample) or ``"outline"`` (like the official release).
        repeat_every: every n-th subject has a second scan ``NNN_2HC`` (0: none).
        seed: random seed; the same seed gives the same files.

    Returns:
        ``output_dir``.

    Example::

        from custom_nets.data.synthetic_hc18 import generate
        generate("/tmp/hc18_synthetic", num_images=20, height=135, width=200)
    """
    if annotation not in ("filled", "outline"):
        raise ValueError(f"annotation must be 'filled' or 'outline', got {annotation!r}")
    if int(num_images) < 3:
        raise ValueError(f"num_images must be at least 3 (a train/val/test split needs 3 subjects), got {num_images}")
    rng = np.random.default_rng(seed)
    image_dir = Path(output_dir) / IMAGE_FOLDER
    image_dir.mkdir(parents=True, exist_ok=True)
    rows, subject = [], 0
    while len(rows) < int(num_images):
        subject += 1
        scans = ["HC"] + (["2HC"] if repeat_every and subject % repeat_every == 0 else [])
        for scan in scans[: int(num_images) - len(rows)]:
            name = f"{subject:03d}_{scan}"
            image, filled, outline, ellipse = synthetic_case(rng, int(height), int(width))
            pixel_size = float(rng.uniform(0.07, 0.17))  # mm, the range of HC18
            mask = filled if annotation == "filled" else outline
            for path, array in ((image_dir / f"{name}.png", image), (image_dir / f"{name}{ANNOTATION_SUFFIX}.png", mask.astype(np.uint8) * 255)):
                with atomic_path(path) as tmp:
                    Image.fromarray(array).save(tmp, format="PNG")
            hc = ellipse_perimeter(ellipse.semi_major, ellipse.semi_minor) * pixel_size
            rows.append({"filename": f"{name}.png", "pixel size(mm)": f"{pixel_size:.9f}", "head circumference (mm)": f"{hc:.2f}"})
    write_csv_atomic(Path(output_dir) / PIXEL_SIZE_CSV, rows)  # written last: its presence marks a complete dataset
    return os.fspath(output_dir)


def generate_once(output_dir: str, **kwargs) -> str:
    """
    :func:`generate` the dataset unless ``output_dir`` already holds a complete one (the CSV, written
    last, is there), and return ``output_dir``. The HC18 bundle's default ``dataset_dir`` is this call,
    so ``python -m monai.bundle run training --config_file configs/train.json`` runs on a fresh machine
    and ``--dataset_dir`` replaces it (nothing is generated then).

    Args:
        output_dir: dataset folder.
        kwargs: passed to :func:`generate`.
    """
    return synthetic.generate_once(output_dir, PIXEL_SIZE_CSV, generate, "HC18", **kwargs)


if __name__ == "__main__":
    import fire

    fire.Fire(generate)
