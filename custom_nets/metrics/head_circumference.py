"""
Head circumference (HC) from a fetal head mask: the ellipse fitted to the mask's contour, its perimeter by
Ramanujan's approximation, in millimetres; the HC18 challenge metric is the absolute difference in mm.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from custom_nets.data.formats import DICOM_SUFFIXES, GEOMETRY_SUFFIXES, NIFTI_SUFFIXES
from custom_nets.ellipse import Ellipse, ellipse_perimeter, fit_ellipse, fit_ellipse_robust

__all__ = [
    "fit_head_ellipse",
    "head_circumference_mm",
    "HeadCircumference",
    "ELLIPSE_META_KEY",
]


def fit_head_ellipse(mask: np.ndarray | torch.Tensor, spacing: float | Sequence[float] = 1.0) -> Ellipse | None:
    """
    The ellipse fitted to the outer contour of the largest connected region of a 2D ``mask``, in the
    units of ``spacing`` (mm per pixel along array axes 0 and 1; one number for square pixels).

    Holes are filled first; contour points on the image border are left out, so a head cut by the
    border is completed by the fit instead of being flattened; contour points that stray from the
    ellipse (a spill into the surrounding fluid) are left out by :func:`fit_ellipse_robust`, run in
    pixel units. ``None`` for an empty mask or when no ellipse fits.

    Args:
        mask: ``(H, W)`` array, non-zero inside the head.
        spacing: pixel size along axis 0 and 1 (or one value for both).
    """
    from skimage.measure import find_contours

    mask = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask) > 0
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D mask, got shape {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    # the regions lie inside the mask's bounding box: label there only (a head is a fraction of the frame)
    origin = np.asarray([rows[0], cols[0]], dtype=np.float64)
    labels, count = ndimage.label(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    box = ndimage.find_objects(labels, max_label=largest)[largest - 1]
    region = ndimage.binary_fill_holes(labels[box] == largest)
    contours = find_contours(np.pad(region, 1).astype(np.float32), 0.5)
    if not contours:
        return None
    # back to full-image pixel coordinates (undo the padding and both crops)
    points = max(contours, key=len) - 1.0 + origin + np.asarray([box[0].start, box[1].start], dtype=np.float64)
    inside = np.all((points >= 0) & (points <= np.asarray(mask.shape) - 1), axis=1)
    if inside.sum() >= 5:
        points = points[inside]
    _, inliers = fit_ellipse_robust(points)
    return fit_ellipse(points[inliers] * np.broadcast_to(np.asarray(spacing, dtype=np.float64), (2,)))


def head_circumference_mm(
    mask: np.ndarray | torch.Tensor,
    spacing: float | Sequence[float],
    contour_offset_px: float = 0.0,
    pixel_ellipse: Ellipse | None = None,
) -> float:
    """
    Head circumference in mm of a 2D head ``mask`` with pixel size ``spacing`` (mm, per axis or one
    value): the perimeter of :func:`fit_head_ellipse`, its semi-axes first shortened by
    ``contour_offset_px`` pixels. NaN for an empty mask.

    ``pixel_ellipse``, the ellipse (in pixels) that ``mask`` is the filled form of (what :class:`HeadMaskd`
    fitted), is measured instead of fitting the mask's contour again; the caller checks that it is.

    ``contour_offset_px`` corrects for a labelling convention: HC18's reference ellipse is the centre
    line of the drawn outline, while a filled annotation (and a network trained on it) includes the
    outline's stroke. On the 300 filled masks of our HC18 sample the mask contour lies
    1.39 +- 0.04 px outside the reference ellipse (``docs/README.md`` of the HC18 bundle), hence 1.4 there.

    Example::

        mask = np.zeros((100, 100)); rr, cc = skimage.draw.disk((50, 50), 20); mask[rr, cc] = 1
        head_circumference_mm(mask, 0.1)  # about 2 pi 20 * 0.1 = 12.6
    """
    ellipse = fit_head_ellipse(mask, spacing) if pixel_ellipse is None else pixel_ellipse.scaled(spacing)
    if ellipse is None:
        return float("nan")
    offset = contour_offset_px * float(np.sqrt(np.prod(np.broadcast_to(np.asarray(spacing, dtype=np.float64), (2,)))))
    return ellipse_perimeter(max(ellipse.semi_major - offset, 0.0), max(ellipse.semi_minor - offset, 0.0))


_NO_PIXEL_SIZE = "no pixel size: the image file carries none and no pixel-size CSV row names it"


def _spacing_from_image(meta: Mapping[str, Any], filename: str) -> tuple[float, float] | None:
    """Pixel size along array axes 0 and 1 from the image file's own geometry, or None (PNG/JPEG carry none)."""
    name = filename.lower()
    if not name.endswith(GEOMETRY_SUFFIXES) or _invalid_nifti_pixel_size(filename):
        return None
    if name.endswith(DICOM_SUFFIXES):  # the header: a DICOM without a pixel size gets 1 mm in the affine
        import pydicom

        from custom_nets.data.image2d import dicom_pixel_size

        try:
            return dicom_pixel_size(pydicom.dcmread(filename, stop_before_pixels=True))
        except Exception:  # unreadable headers are reported by the image reader, not here
            return None
    affine = meta.get("original_affine", meta.get("affine"))
    if affine is None:
        return None
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    spacing = np.sqrt((affine[:-1, :2] ** 2).sum(axis=0))
    return (float(spacing[0]), float(spacing[1])) if np.all(np.isfinite(spacing) & (spacing > 0)) else None


def _invalid_nifti_pixel_size(path: str) -> str | None:
    """
    Why the pixel size a NIfTI header stores (pixdim) is unusable, or None (and None for other files).
    nibabel reads a stored 0 as 1 mm and builds the affine with it, so the header's own bytes decide.
    """
    import nibabel as nib

    if not path.lower().endswith(NIFTI_SUFFIXES):
        return None
    try:
        header_class = type(nib.load(path).header)  # NIfTI-1 or NIfTI-2
        with nib.openers.ImageOpener(path) as f:
            x, y = (float(v) for v in header_class.from_fileobj(f, check=False)["pixdim"][1:3])
    except Exception:  # unreadable files are reported by the image check, not here
        return None
    if math.isfinite(x) and math.isfinite(y) and x != 0 and y != 0:
        return None
    return f"invalid pixel size {x:g} x {y:g} mm in the NIfTI header (pixdim): not measured; give it in a pixel-size CSV"


#: Metadata key of a head mask that :class:`custom_nets.transforms.HeadMaskd` replaced by a fitted ellipse:
#: the ellipse's ``Ellipse`` fields in pixels.
ELLIPSE_META_KEY = "head_ellipse"


def _ellipse_of_mask(pred: Any, mask: np.ndarray) -> Ellipse | None:
    """
    The ellipse recorded in ``pred``'s metadata when ``mask`` is still exactly its filled form (a later
    step may have changed the mask, e.g. emptied it for a constant input), else None: measure the mask.
    """
    fields = (getattr(pred, "meta", None) or {}).get(ELLIPSE_META_KEY)
    if fields is None:
        return None
    ellipse = Ellipse(*(float(v) for v in torch.as_tensor(fields).reshape(-1).tolist()))
    return ellipse if np.array_equal(ellipse.to_mask(mask.shape), mask) else None


class HeadCircumference:
    """
    Per-case head circumference columns for a table: the predicted HC in mm, and, when the case has a
    reference HC, the reference and the absolute error (the HC18 metric). A callable on one case
    (a dict with the prediction and its image metadata), as used by
    :class:`custom_nets.handlers.case_metrics_saver.CaseMetricsSaver` (evaluation) and
    :class:`custom_nets.engines.folder_inference.FolderInference` (inference).

    The pixel size is taken, in this order, from the case's ``pixel_size_key`` (an HC18 datalist
    item), from ``pixel_sizes`` by image file name (an HC18 CSV read with
    :func:`custom_nets.data.hc18.read_pixel_sizes`), then from the image file's own geometry (NIfTI
    header, DICOM ``PixelSpacing`` or ultrasound region calibration). Without any, the HC is left empty,
    as with an invalid one (a NIfTI pixdim of 0, which nibabel would read as 1 mm): never guessed. Every
    case gets an ``hc_note``: empty when ``hc_mm`` holds a value, else one line saying why not (no or an
    invalid pixel size, an empty mask, no ellipse fits).

    Args:
        pred_key: key of the prediction: one-hot ``(C, H, W)`` (channel ``foreground_channel`` is the
            head) or a ``(1, H, W)`` label map (non-zero is the head), at the image's original size.
        pixel_size_key: key of a per-case pixel size in mm.
        reference_key: key of a per-case reference head circumference in mm.
        pixel_sizes: file name -> pixel size in mm (a float or an object with ``pixel_size_mm``).
        image_key: key whose metadata names the image file (``filename_or_obj``) and holds its affine.
        foreground_channel: channel of the head in a one-hot prediction.
        contour_offset_px: see :func:`head_circumference_mm` (1.4 for networks trained on HC18's filled masks).

    Example::

        hc = HeadCircumference(pixel_sizes=read_pixel_sizes("hc18/test_set_pixel_size.csv"))
        hc({"pred": mask, "image": image})  # {"pixel_size_mm": 0.11, "hc_mm": 172.3, "hc_note": ""}
    """

    def __init__(
        self,
        pred_key: str = "pred",
        pixel_size_key: str = "pixel_size_mm",
        reference_key: str = "hc_ref_mm",
        pixel_sizes: Mapping[str, Any] | None = None,
        image_key: str = "image",
        foreground_channel: int = 1,
        contour_offset_px: float = 0.0,
    ) -> None:
        self.pred_key = pred_key
        self.pixel_size_key = pixel_size_key
        self.reference_key = reference_key
        self.pixel_sizes = pixel_sizes or {}
        self.image_key = image_key
        self.foreground_channel = foreground_channel
        self.contour_offset_px = contour_offset_px

    def _meta(self, case: Mapping[str, Any]) -> Mapping[str, Any]:
        for key in (self.image_key, self.pred_key):
            meta = getattr(case.get(key), "meta", None)
            if meta:
                return meta
        return case.get(f"{self.image_key}_meta_dict", {})

    def spacing(self, case: Mapping[str, Any]) -> tuple[float, float] | None:
        """The pixel size of ``case`` along array axes 0 and 1 in mm, or None when unknown."""
        value = case.get(self.pixel_size_key)
        meta = self._meta(case)
        filename = str(meta.get("filename_or_obj", ""))
        if value is None:
            value = self.pixel_sizes.get(os.path.basename(filename))
            value = getattr(value, "pixel_size_mm", value)
        if value is not None:
            size = float(torch.as_tensor(value).reshape(-1)[0])
            return (size, size)
        return _spacing_from_image(meta, filename) if filename else None

    def __call__(self, case: Mapping[str, Any]) -> dict[str, float | str | None]:
        pred = torch.as_tensor(case[self.pred_key]).detach().cpu()
        if pred.ndim != 3:
            raise ValueError(f"head circumference needs a 2D prediction (C, H, W), got shape {list(pred.shape)}")
        mask = pred[self.foreground_channel] > 0.5 if pred.shape[0] > 1 else pred[0] > 0
        spacing = self.spacing(case)
        hc, note = None, ""
        if spacing is None:
            note = _invalid_nifti_pixel_size(str(self._meta(case).get("filename_or_obj", ""))) or _NO_PIXEL_SIZE
        elif not mask.any():
            note = "empty mask: no head was segmented"
        else:
            mask_np = mask.numpy()
            hc = head_circumference_mm(mask_np, spacing, self.contour_offset_px, _ellipse_of_mask(case[self.pred_key], mask_np))
            if not math.isfinite(hc):
                hc, note = None, "no ellipse fits the mask's contour"
        columns: dict[str, float | str | None] = {
            "pixel_size_mm": None if spacing is None else float(np.sqrt(spacing[0] * spacing[1])),
            "hc_mm": hc,
            "hc_note": note,
        }
        reference = case.get(self.reference_key)
        if reference is not None:
            reference = float(torch.as_tensor(reference).reshape(-1)[0])
            columns["hc_ref_mm"] = reference
            hc = columns["hc_mm"]
            columns["hc_abs_error_mm"] = None if hc is None else abs(hc - reference)
        return columns
