"""
The HC18 fetal head dataset layout: its pixel-size CSV, its annotations, and a subject-disjoint datalist.

HC18 (van den Heuvel et al., PLoS ONE 2018; Zenodo 10.5281/zenodo.1327317, CC BY 4.0) ships::

    <dataset_dir>/training_set/NNN_HC.png               ultrasound image (NNN_2HC, NNN_3HC: more scans of subject NNN)
    <dataset_dir>/training_set/NNN_HC_Annotation.png    head annotation: an ellipse outline (official release)
                                                        or a filled ellipse (our sample)
    <dataset_dir>/training_set_pixel_size_and_HC.csv    filename, pixel size (mm), head circumference (mm)

:func:`datalist` checks every case once (readable image and annotation, equal sizes, a CSV
row), writes each annotation as a filled single-channel 0/1 PNG (filling outlines), splits the
subjects 70/20/10 with a fixed seed and writes a datalist JSON that later runs reuse. Problems are
raised as :class:`HC18DataError`, one line that names the file.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from custom_nets.atomic_write import atomic_path
from custom_nets.data.image2d import ImageInputError, check_image_2d
from custom_nets.data.splits import load_or_create_datalist
from custom_nets.errors import InputError
from custom_nets.ellipse import fit_ellipse

__all__ = [
    "HC18DataError",
    "IMAGE_FOLDER",
    "ANNOTATION_SUFFIX",
    "PIXEL_SIZE_CSV",
    "PixelSizeRow",
    "subject_of",
    "read_pixel_sizes",
    "fill_annotation",
    "datalist",
]

logger = logging.getLogger(__name__)

IMAGE_FOLDER = "training_set"
PIXEL_SIZE_CSV = "training_set_pixel_size_and_HC.csv"
ANNOTATION_SUFFIX = "_Annotation"

# "001_HC.png" -> subject "001"; "017_2HC.png" -> subject "017" (second scan of the same subject).
_IMAGE_NAME = re.compile(r"^(?P<subject>\d+)_(?P<scan>\d*)HC\.png$", re.IGNORECASE)


class HC18DataError(InputError):
    """A problem with an HC18 dataset; the message is one line that names the file or folder."""


class PixelSizeRow(NamedTuple):
    """One row of the HC18 CSV: pixel size in mm and the reference head circumference in mm (``None`` in the test-set CSV)."""

    pixel_size_mm: float
    hc_mm: float | None


def subject_of(image_name: str) -> str:
    """
    The subject of an HC18 image file name: ``"017_2HC.png"`` -> ``"017"``.

    Raises:
        HC18DataError: the name does not follow the ``NNN_HC.png`` / ``NNN_<k>HC.png`` pattern.
    """
    match = _IMAGE_NAME.match(os.path.basename(image_name))
    if match is None:
        raise HC18DataError(f"{image_name}: not an HC18 image name (expected NNN_HC.png or NNN_<k>HC.png)")
    return match.group("subject")


def read_pixel_sizes(csv_path: str | os.PathLike) -> dict[str, PixelSizeRow]:
    """
    Read an HC18 pixel-size CSV (training set: filename, pixel size, head circumference; test set:
    filename, pixel size) into ``{file name: PixelSizeRow}``.

    Columns are found by their header (``filename``, ``pixel size...``, ``head circumference...``),
    so the spelling variants of the training and test CSVs both work.

    Raises:
        HC18DataError: missing or unreadable file, missing column, or a value that is not a positive number.

    Example::

        sizes = read_pixel_sizes("hc18/training_set_pixel_size_and_HC.csv")
        sizes["001_HC.png"].pixel_size_mm  # 0.0897
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise HC18DataError(f"{csv_path}: pixel-size CSV not found")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise HC18DataError(f"{csv_path}: cannot read the pixel-size CSV ({e})") from e
    if not rows:
        raise HC18DataError(f"{csv_path}: the pixel-size CSV is empty")
    header = [h.strip().lower() for h in rows[0]]

    def column(prefix: str, required: bool = True) -> int | None:
        for i, name in enumerate(header):
            if name.startswith(prefix):
                return i
        if required:
            raise HC18DataError(f"{csv_path}: no '{prefix}' column in the header {rows[0]}")
        return None

    name_col, size_col, hc_col = column("filename"), column("pixel size"), column("head circumference", False)
    table: dict[str, PixelSizeRow] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            name = row[name_col].strip()
            size = float(row[size_col])
            hc = float(row[hc_col]) if hc_col is not None else None
        except (IndexError, ValueError) as e:
            raise HC18DataError(f"{csv_path}: line {line} is not 'filename, pixel size, ...' ({row})") from e
        if not (math.isfinite(size) and size > 0) or (hc is not None and not (math.isfinite(hc) and hc > 0)):
            raise HC18DataError(f"{csv_path}: line {line} has a pixel size or head circumference that is not positive ({row})")
        table[name] = PixelSizeRow(size, hc)
    return table


def _read_png(path: Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()  # decode everything now: a truncated file fails here, not in a training worker
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise HC18DataError(f"{path}: cannot read the {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def fill_annotation(annotation: np.ndarray) -> tuple[np.ndarray, str]:
    """
    Turn an HC18 annotation into a filled head mask, detecting whether it is an outline or already filled.

    The official annotations are ellipse outlines: a closed outline is filled with
    ``scipy.ndimage.binary_fill_holes``; an outline cut by the image border (which does not close) is
    replaced by the ellipse fitted to its pixels. A filled annotation is returned as it is.

    Args:
        annotation: ``(H, W)`` or ``(H, W, C)`` array (grayscale, RGB or RGBA PNG), background 0.

    Returns:
        the ``(H, W)`` boolean mask and how it was obtained: ``"filled"``, ``"outline"`` or ``"outline-fitted"``.

    Raises:
        ValueError: the annotation is empty or cannot be filled.
    """
    if annotation.ndim == 3:
        annotation = annotation[..., : min(3, annotation.shape[-1])].max(axis=-1)
    foreground = annotation > 0
    count = int(foreground.sum())
    if count == 0:
        raise ValueError("the annotation is empty (no head drawn)")
    filled = ndimage.binary_fill_holes(foreground)
    if filled.sum() > 1.5 * count:
        return filled, "outline"
    rows, cols = np.nonzero(foreground)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    if count / box >= 0.5:  # a filled ellipse covers pi/4 of its box, an outline a thin fraction
        return foreground, "filled"
    ellipse = fit_ellipse(np.stack([rows, cols], axis=1))  # an outline cut by the border: it does not close
    if ellipse is None:
        raise ValueError("the annotation is an open outline that no ellipse fits")
    # the fit runs along the stroke's centre line; adding the stroke itself matches a filled closed outline
    return ellipse.to_mask(foreground.shape) | foreground, "outline-fitted"


def _check_layout(dataset_dir: Path) -> tuple[Path, Path]:
    """The image folder and CSV of an HC18 dataset folder, or an error naming what is missing."""
    image_dir, csv_path = dataset_dir / IMAGE_FOLDER, dataset_dir / PIXEL_SIZE_CSV
    if not dataset_dir.is_dir():
        raise HC18DataError(f"{dataset_dir}: dataset folder not found (set --dataset_dir to the HC18 folder)")
    if not image_dir.is_dir():
        raise HC18DataError(f"{image_dir}: folder not found; --dataset_dir must hold the HC18 layout ({IMAGE_FOLDER}/, {PIXEL_SIZE_CSV})")
    if not csv_path.is_file():
        raise HC18DataError(f"{csv_path}: pixel-size CSV not found")
    return image_dir, csv_path


def _scan_cases(dataset_dir: Path, labels_dir: Path) -> list[dict[str, Any]]:
    """Check every image of the dataset and write its filled mask; one datalist item per image."""
    image_dir, csv_path = _check_layout(dataset_dir)
    pixel_sizes = read_pixel_sizes(csv_path)
    images = sorted(p for p in image_dir.iterdir() if _IMAGE_NAME.match(p.name))
    if not images:
        raise HC18DataError(f"{image_dir}: no HC18 image (NNN_HC.png) in the folder")
    items = []
    for image_path in images:
        annotation_path = image_path.with_name(image_path.stem + ANNOTATION_SUFFIX + image_path.suffix)
        if not annotation_path.is_file():
            raise HC18DataError(f"{annotation_path}: annotation of {image_path.name} not found")
        row = pixel_sizes.get(image_path.name)
        if row is None:
            raise HC18DataError(f"{csv_path}: no row for {image_path.name}")
        if row.hc_mm is None:
            raise HC18DataError(f"{csv_path}: no head circumference column (a training-set CSV is needed)")
        try:  # the same checks as inference (truncated, palette, multi-page, NaN ...); it decodes the image
            check_image_2d(image_path)
        except ImageInputError as e:
            raise HC18DataError(str(e)) from None
        with Image.open(image_path) as im:  # header only: the decode above succeeded
            width, height = im.size
        annotation = _read_png(annotation_path, "annotation")
        if (height, width) != annotation.shape[:2]:
            raise HC18DataError(
                f"{annotation_path}: size {annotation.shape[1]}x{annotation.shape[0]} differs from its image "
                f"{image_path.name} ({width}x{height})"
            )
        try:
            mask, kind = fill_annotation(annotation)
        except ValueError as e:
            raise HC18DataError(f"{annotation_path}: {e}") from e
        label_path = labels_dir / annotation_path.name
        with atomic_path(label_path) as tmp:
            Image.fromarray(mask.astype(np.uint8)).save(tmp, format="PNG")
        items.append(
            {
                "image": str(image_path),
                "label": str(label_path),
                "subject": subject_of(image_path.name),
                "pixel_size_mm": row.pixel_size_mm,
                "hc_ref_mm": row.hc_mm,
                "annotation": kind,
            }
        )
    subjects = {item["subject"] for item in items}
    if len(subjects) < 3:
        raise HC18DataError(f"{image_dir}: a train/validation/test split needs images of at least 3 subjects, found {len(subjects)}")
    logger.info(f"checked {len(items)} images of {len(subjects)} subjects; filled masks in {labels_dir}")
    return items


def datalist(
    dataset_dir: str | os.PathLike,
    datalist_file: str | os.PathLike,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    labels_dir: str | os.PathLike | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """
    Return the HC18 datalist of ``dataset_dir``, split 70/20/10 by subject with ``seed``: read from
    ``datalist_file`` when it exists, otherwise made once, after checking every case and writing its
    filled mask, and written there atomically (:func:`custom_nets.data.splits.load_or_create_datalist`).

    Items have ``image``, ``label`` (the filled 0/1 mask), ``subject``, ``pixel_size_mm``, ``hc_ref_mm``
    (reference head circumference) and ``annotation`` (``filled``, ``outline`` or ``outline-fitted``).
    All images of one subject (``NNN_HC``, ``NNN_2HC`` ...) land in the same part. Image paths are kept
    relative to ``dataset_dir`` (a moved dataset keeps its split); the datalist also records a hash of
    the pixel-size CSV, so a datalist made for another dataset is refused rather than reused.

    Args:
        dataset_dir: the HC18 folder (``training_set/`` and ``training_set_pixel_size_and_HC.csv``).
        datalist_file: where the datalist JSON is (or will be) written.
        seed: seed of the subject shuffle.
        fractions: training, validation and test shares of the subjects.
        labels_dir: where the filled masks go; defaults to ``labels/`` beside ``datalist_file``.

    Raises:
        HC18DataError: missing folder or CSV, an unreadable image or annotation, an image and
            annotation of different sizes, an image without a CSV row, fewer than 3 subjects.
        InputError: a datalist file made with other settings or for another dataset.

    Example::

        splits = datalist("/data/hc18", "eval/datalist.json", seed=0)
        len(splits["training"]), splits["test"][0]["pixel_size_mm"]
    """
    dataset_dir = Path(dataset_dir).expanduser().resolve()
    datalist_file = Path(datalist_file).expanduser().resolve()
    labels_dir = Path(labels_dir).resolve() if labels_dir is not None else datalist_file.parent / "labels"
    _, csv_path = _check_layout(dataset_dir)
    splits = load_or_create_datalist(
        datalist_file,
        dataset_dir,
        make_items=lambda: _scan_cases(dataset_dir, labels_dir),
        subject_of=lambda item: item["subject"],
        path_keys=("image",),  # labels are ours, beside the datalist, not in the dataset
        fractions=fractions,
        seed=seed,
        settings={"layout": "hc18", "pixel_size_csv_sha1": hashlib.sha1(csv_path.read_bytes()).hexdigest()},
    )
    for item in (i for part in splits.values() for i in part):
        if not os.path.isfile(item["label"]):
            raise HC18DataError(f"{datalist_file}: lists {item['label']}, which no longer exists; delete the datalist to write it again")
    return splits
