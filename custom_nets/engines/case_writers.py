"""
Per-case outputs of :class:`custom_nets.engines.folder_inference.FolderInference`: the predicted mask in
the input's format family, and a PNG overlay for a quick look. Files are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.image_writer import resolve_writer
from monai.transforms import EnsureChannelFirst, LoadImage
from PIL import Image

from custom_nets.atomic_write import atomic_path
from custom_nets.data.image2d import Image2DReader

__all__ = ["OUTPUT_SUFFIX", "split_suffix", "MaskWriter", "OverlayWriter"]

#: Output suffix of a mask by input suffix: 2D pictures -> PNG, NIfTI -> NIfTI, DICOM -> DICOM (ITK, no patient tags).
OUTPUT_SUFFIX = {
    ".png": ".png", ".jpg": ".png", ".jpeg": ".png", ".bmp": ".png", ".tif": ".png", ".tiff": ".png",
    ".nii": ".nii.gz", ".nii.gz": ".nii.gz", ".dcm": ".dcm", ".dicom": ".dcm",
    ".nrrd": ".nrrd", ".mha": ".mha", ".mhd": ".mha",
}  # fmt: skip


def split_suffix(path: str | os.PathLike) -> tuple[str, str]:
    """``("name", ".nii.gz")`` for ``"/x/name.nii.gz"``: the file name without folders, split at its (double) suffix."""
    name = os.path.basename(os.fspath(path).rstrip("/\\"))
    lower = name.lower()
    for suffix in sorted(OUTPUT_SUFFIX, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix) :].lower()
    stem, suffix = os.path.splitext(name)
    return stem, suffix.lower()


class _OutputNames:
    """Remember which input each output file was written for, so two inputs never silently share one output."""

    def __init__(self) -> None:
        self._sources: dict[str, str] = {}

    def claim(self, path: str, source: str) -> str:
        owner = self._sources.setdefault(os.path.abspath(path), source)
        if owner != source:
            raise FileExistsError(f"{path} was already written for {os.path.basename(owner)} in this run; rename one input")
        return path


def _source_path(case: Mapping[str, Any], key: str) -> str:
    meta = getattr(case.get(key), "meta", None) or {}
    path = meta.get("filename_or_obj")
    if not path:
        raise ValueError(f"cannot name the output: '{key}' has no filename_or_obj in its metadata")
    return str(path)


def _pixel_spacing_as_read(path: str | os.PathLike) -> None:
    """
    Give a DICOM written by ITK its pixel size as ``PixelSpacing``, the tag DICOM readers (ours included) read.
    GDCM stores a secondary capture's pixel size as ``NominalScannedPixelSpacing`` unless an ITK DICOM read
    earlier in the process has switched its global ForcePixelSpacing on: the tag must not depend on that.
    """
    import pydicom

    ds = pydicom.dcmread(path)
    if "PixelSpacing" not in ds and "NominalScannedPixelSpacing" in ds:
        ds.PixelSpacing = ds.NominalScannedPixelSpacing
        ds.save_as(path)


class MaskWriter:
    """
    Write a case's label map (``(1, ...)`` after ``AsDiscreted(argmax=True)``, at the original size) next
    to the others in ``output_dir``, named ``<input name><postfix><suffix>``, in the input's format family
    (:data:`OUTPUT_SUFFIX`) with the input's geometry, through MONAI's image writers.

    PNG masks are multiplied by ``png_scale`` (255: the head shows white); NIfTI and DICOM masks keep the
    label values. A DICOM input gives a new secondary-capture DICOM written by ITK, which carries the
    pixel spacing but none of the input's patient tags.

    Args:
        output_dir: output folder (created when missing).
        pred_key: key of the label map.
        image_key: key whose metadata names the input file.
        postfix: added to the input's name.
        output_suffix: force one output format (e.g. ``".nii.gz"``); ``None``: by input family.
        png_scale: multiplier of label values in PNG output (use 1 for multi-class label maps).

    Returns from a call ``{"mask": <file name>}``.
    """

    #: the result columns that name a file this writer wrote (removed again when a later output of the case fails)
    file_columns = ("mask",)

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = "pred",
        image_key: str = "image",
        postfix: str = "_mask",
        output_suffix: str | None = None,
        png_scale: int = 255,
    ) -> None:
        self.output_dir = os.fspath(output_dir)
        self.pred_key = pred_key
        self.image_key = image_key
        self.postfix = postfix
        self.output_suffix = output_suffix
        self.png_scale = int(png_scale)
        self._names = _OutputNames()

    def __call__(self, case: Mapping[str, Any]) -> dict[str, str]:
        pred = case[self.pred_key]
        source = _source_path(case, self.image_key)
        stem, suffix = split_suffix(source)
        out_suffix = self.output_suffix or OUTPUT_SUFFIX.get(suffix, ".nii.gz")
        meta = dict(getattr(pred, "meta", {}) or {})
        # the writer squeezes the one label channel away: its data must say "no channel", not the colour input's
        # "channel last", or MONAI's resampler takes a 2D mask for a 1D image (TypeError in fall_back_tuple)
        labels = MetaTensor(torch.as_tensor(pred).detach().cpu(), meta={**meta, "original_channel_dim": "no_channel"})
        if out_suffix == ".png":
            if labels.numel() and float(labels.max()) * self.png_scale > 255:
                raise ValueError(f"label values up to {float(labels.max()):g} times png_scale {self.png_scale} exceed 255")
            labels = labels * self.png_scale
        # PNG labels are already scaled uint8: MONAI's PIL writer would clip them to [0, 1] and scale them again
        options = {"scale": None} if out_suffix == ".png" else {}
        writer = resolve_writer(out_suffix.lstrip("."))[0](output_dtype=np.uint8, **options)
        writer.set_data_array(labels.to(torch.uint8), channel_dim=0)
        writer.set_metadata(meta, resample=False)
        path = self._names.claim(os.path.join(self.output_dir, f"{stem}{self.postfix}{out_suffix}"), source)
        with atomic_path(path) as tmp:
            writer.write(tmp)
            if out_suffix == ".dcm":
                _pixel_spacing_as_read(tmp)
        return {"mask": os.path.basename(path)}


class OverlayWriter:
    """
    Write ``<input name><postfix>.png``: the input image (grayscale, 1st-99th percentile contrast) with
    the predicted foreground tinted and its border drawn, for a quick visual check. 2D inputs only; the
    picture is oriented as MONAI's PNG writer orients masks, so it matches the written PNG mask.

    Args:
        output_dir: output folder (created when missing).
        pred_key: key of the label map (``(1, H, W)``, non-zero is foreground) at the original size.
        image_key: key whose metadata names the input file, which is read again at full size.
        postfix: added to the input's name.
        color: RGB colour of the foreground.
        alpha: opacity of the tint.

    Returns from a call ``{"overlay": <file name>}``.
    """

    #: the result columns that name a file this writer wrote (removed again when a later output of the case fails)
    file_columns = ("overlay",)

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = "pred",
        image_key: str = "image",
        postfix: str = "_overlay",
        color: Sequence[int] = (255, 64, 0),
        alpha: float = 0.35,
    ) -> None:
        self.output_dir = os.fspath(output_dir)
        self.pred_key = pred_key
        self.image_key = image_key
        self.postfix = postfix
        self.color = np.asarray(color, dtype=np.float32)
        self.alpha = float(alpha)
        self._load = LoadImage(image_only=True, reader=Image2DReader())  # DICOM as the 2D bundles read it
        self._names = _OutputNames()
        self._channel_first = EnsureChannelFirst()

    def __call__(self, case: Mapping[str, Any]) -> dict[str, str]:
        from scipy import ndimage

        source = _source_path(case, self.image_key)
        image = self._channel_first(self._load(source)).float()
        image = image[:3].mean(0).numpy()
        mask = torch.as_tensor(case[self.pred_key]).detach().cpu().numpy()
        mask = mask[0] if mask.shape[0] == 1 else mask.argmax(0)
        image, mask = np.squeeze(image), np.squeeze(mask) > 0
        if image.ndim != 2 or image.shape != mask.shape:
            raise ValueError(f"overlay needs a 2D image and mask of one size, got {image.shape} and {mask.shape}")
        low, high = np.percentile(image, (1, 99))
        gray = np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        rgb[mask] = (1 - self.alpha) * rgb[mask] + self.alpha * self.color
        border = mask & ~ndimage.binary_erosion(mask, iterations=2)
        rgb[border] = self.color
        picture = Image.fromarray(np.transpose(rgb, (1, 0, 2)).astype(np.uint8))  # MONAI arrays are (x, y)
        stem, _ = split_suffix(source)
        path = self._names.claim(os.path.join(self.output_dir, f"{stem}{self.postfix}.png"), source)
        with atomic_path(path) as tmp:
            picture.save(tmp, format="PNG")
        return {"overlay": os.path.basename(path)}
