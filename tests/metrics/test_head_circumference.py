"""Head circumference: Ramanujan's perimeter, ellipse fit of a mask, pixel size sources, agreement with HC18's reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.transforms import EnsureChannelFirst, LoadImage
from PIL import Image

from custom_nets.data.hc18 import IMAGE_FOLDER, PIXEL_SIZE_CSV, fill_annotation, read_pixel_sizes
from custom_nets.ellipse import Ellipse, ellipse_perimeter
from custom_nets.metrics.head_circumference import HeadCircumference, fit_head_ellipse, head_circumference_mm
from image_files import write_dicom_2d, write_nifti_2d, write_png

ELLIPSE = Ellipse(60.0, 80.0, 40.0, 25.0, 0.5)  # centre (row, col), semi-axes, angle: pixels / radians


@pytest.mark.parametrize(
    "a, b, expected",
    [(10.0, 10.0, 2 * math.pi * 10), (2.0, 1.0, 9.688448220547675), (3.0, 0.0, 12.0)],
    ids=["circle", "ellipse-2-1", "flat"],
)
def test_ellipse_perimeter(a, b, expected):
    rel = 1e-9 if b else 1e-3  # Ramanujan II is exact for a circle, near-exact for head shapes, 0.05% off for a line
    assert ellipse_perimeter(a, b) == pytest.approx(expected, rel=rel)


def test_fit_head_ellipse_recovers_a_rasterised_ellipse():
    fitted = fit_head_ellipse(ELLIPSE.to_mask((120, 160)))
    assert fitted.center_0 == pytest.approx(60.0, abs=0.3) and fitted.center_1 == pytest.approx(80.0, abs=0.3)
    # the contour runs half-way between inside and outside pixel centres: on the ellipse itself
    assert fitted.semi_major == pytest.approx(40.0, abs=0.3) and fitted.semi_minor == pytest.approx(25.0, abs=0.3)
    assert math.cos(2 * (fitted.angle - 0.5)) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("spacing", [0.1, (0.1, 0.1), (0.08, 0.12)])
def test_head_circumference_mm_scales_by_pixel_size(spacing):
    mask = ELLIPSE._replace(angle=0.0).to_mask((120, 160))  # axes along the array axes
    s0, s1 = np.broadcast_to(np.asarray(spacing, dtype=float), (2,))
    expected = ellipse_perimeter(40.0 * s0, 25.0 * s1)
    assert head_circumference_mm(mask, spacing) == pytest.approx(expected, rel=0.01)


def test_head_circumference_of_a_head_cut_by_the_border():
    full = ELLIPSE.to_mask((120, 160))
    cut = full[:, 55:]  # a third of the head is outside the image
    assert head_circumference_mm(cut, 0.1) == pytest.approx(head_circumference_mm(full, 0.1), rel=0.02)


def test_head_circumference_uses_the_largest_region_and_fills_holes():
    mask = ELLIPSE.to_mask((120, 160))
    clean = head_circumference_mm(mask, 0.1)
    mask[55:65, 75:85] = False  # a hole
    mask[2:6, 2:6] = True  # a speck
    assert head_circumference_mm(mask, 0.1) == pytest.approx(clean, rel=1e-6)


def test_head_circumference_of_empty_mask_is_nan():
    assert math.isnan(head_circumference_mm(np.zeros((16, 16)), 0.1))


def test_contour_offset_matches_hc18_reference(shared_data):
    """HC18's reference is the outline's centre line: 1.4 px inside a filled mask (docs of the HC18 bundle)."""
    folder = shared_data / "hc18_subset"
    table = read_pixel_sizes(folder / PIXEL_SIZE_CSV)
    errors = []
    for name in sorted(table)[:40]:
        annotation = np.asarray(Image.open(folder / IMAGE_FOLDER / name.replace(".png", "_Annotation.png")))
        mask, _ = fill_annotation(annotation)
        errors.append(head_circumference_mm(mask, table[name].pixel_size_mm, contour_offset_px=1.4) - table[name].hc_mm)
    assert abs(np.mean(errors)) < 0.2 and np.max(np.abs(errors)) < 0.6


def _case(path, pred: torch.Tensor, **extra):
    image = EnsureChannelFirst()(LoadImage(image_only=True)(str(path)))
    return {"image": image, "pred": pred, **extra}


def _mask_like(path) -> torch.Tensor:
    image = EnsureChannelFirst()(LoadImage(image_only=True)(str(path)))
    shape = image.shape[1:3]
    return torch.as_tensor(Ellipse(shape[0] / 2, shape[1] / 2, shape[0] / 3, shape[1] / 4, 0.0).to_mask(shape))[None].float()


def test_head_circumference_columns_with_reference(tmp_path):
    path = write_png(tmp_path / "001_HC.png", np.zeros((60, 80)))
    pred = _mask_like(path)
    row = HeadCircumference()(_case(path, pred, pixel_size_mm=0.1, hc_ref_mm=10.0))
    assert row["pixel_size_mm"] == pytest.approx(0.1)
    assert row["hc_mm"] == pytest.approx(head_circumference_mm(pred[0].numpy(), 0.1))
    assert row["hc_ref_mm"] == 10.0 and row["hc_abs_error_mm"] == pytest.approx(abs(row["hc_mm"] - 10.0))


def test_head_circumference_one_hot_prediction_uses_foreground_channel(tmp_path):
    path = write_png(tmp_path / "001_HC.png", np.zeros((60, 80)))
    mask = _mask_like(path)
    one_hot = torch.cat([1 - mask, mask])
    assert HeadCircumference()(_case(path, one_hot, pixel_size_mm=0.1))["hc_mm"] == pytest.approx(
        HeadCircumference()(_case(path, mask, pixel_size_mm=0.1))["hc_mm"]
    )


def test_head_circumference_pixel_size_from_csv_table(tmp_path):
    path = write_png(tmp_path / "017_2HC.png", np.zeros((60, 80)))
    csv_path = tmp_path / "sizes.csv"
    csv_path.write_text("filename,pixel size(mm)\n017_2HC.png,0.125\n")
    row = HeadCircumference(pixel_sizes=read_pixel_sizes(csv_path))(_case(path, _mask_like(path)))
    assert row["pixel_size_mm"] == pytest.approx(0.125) and row["hc_mm"] > 0


def test_head_circumference_unknown_for_png_without_pixel_size(tmp_path):
    path = write_png(tmp_path / "scan.png", np.zeros((60, 80)))
    row = HeadCircumference()(_case(path, _mask_like(path)))
    assert row["pixel_size_mm"] is None and row["hc_mm"] is None and row["hc_note"].startswith("no pixel size")


@pytest.mark.parametrize(
    "writer, expected",
    [
        (lambda p, a: write_nifti_2d(p / "scan.nii.gz", a, spacing=(0.2, 0.2)), 0.2),
        (lambda p, a: write_dicom_2d(p / "scan.dcm", a, pixel_spacing=(0.15, 0.15)), 0.15),
        (lambda p, a: write_dicom_2d(p / "scan.dcm", a, us_region_delta_cm=(0.011, 0.011)), 0.11),
    ],
    ids=["nifti-header", "dicom-pixel-spacing", "dicom-ultrasound-region"],
)
def test_head_circumference_pixel_size_from_image_geometry(tmp_path, writer, expected):
    path = writer(tmp_path, np.zeros((60, 80)))
    pred = _mask_like(path)
    case = _case(path, pred[..., 0] if pred.ndim == 4 else pred)
    case["image"] = case["image"][..., 0] if case["image"].ndim == 4 else case["image"]
    row = HeadCircumference()(case)
    assert row["pixel_size_mm"] == pytest.approx(expected)
    assert row["hc_mm"] == pytest.approx(head_circumference_mm(case["pred"][0].numpy(), expected), rel=1e-6)


def test_an_empty_mask_gets_no_hc_but_a_one_line_reason(tmp_path):
    path = write_png(tmp_path / "001_HC.png", np.zeros((60, 80)))
    pred = _mask_like(path)
    measured = HeadCircumference()(_case(path, pred, pixel_size_mm=0.1))
    assert measured["hc_mm"] > 0 and measured["hc_note"] == ""
    empty = HeadCircumference()(_case(path, torch.zeros_like(pred), pixel_size_mm=0.1, hc_ref_mm=10.0))
    assert empty["hc_mm"] is None and empty["hc_abs_error_mm"] is None and empty["hc_note"].startswith("empty mask")
