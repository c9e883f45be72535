"""Ellipse post-processing of head masks: noise, a spill into the fluid and a spurious blob do not move the HC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from custom_nets.ellipse import Ellipse, fit_ellipse, fit_ellipse_robust
from custom_nets.metrics.head_circumference import head_circumference_mm
from custom_nets.transforms import HeadMaskd, head_mask

TRUTH = Ellipse(135.0, 200.0, 95.0, 75.0, 0.4)  # pixels; an HC18-sized head in a 270x400 image
SHAPE = (270, 400)
PIXEL_MM = 0.12


def _damaged_mask(seed: int) -> np.ndarray:
    """The true head with a ragged border, a spill on one side and a separate spurious blob."""
    rng = np.random.default_rng(seed)
    mask = TRUTH.to_mask(SHAPE)
    border = mask ^ ndimage.binary_erosion(mask, iterations=2)
    mask[border & (rng.random(SHAPE) < 0.5)] = False  # ragged contour
    ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
    mask[ring & (rng.random(SHAPE) < 0.5)] = True
    rows, cols = np.ogrid[: SHAPE[0], : SHAPE[1]]
    spill_centre = (TRUTH.center_0 + 60, TRUTH.center_1 + 75)  # just outside the skull, lower right
    mask |= (rows - spill_centre[0]) ** 2 + (cols - spill_centre[1]) ** 2 <= 25**2
    mask |= (rows - 20) ** 2 + (cols - 20) ** 2 <= 12**2  # a blob far from the head
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ellipse_postprocessing_recovers_the_head_circumference_within_one_percent(seed):
    truth_hc = TRUTH.perimeter * PIXEL_MM
    mask = _damaged_mask(seed)
    ellipse = head_mask(torch.as_tensor(mask[None].astype(np.uint8)), "ellipse")
    assert head_circumference_mm(ellipse[0].numpy(), PIXEL_MM) == pytest.approx(truth_hc, rel=0.01)
    # and the filled ellipse is the head: the spill and the blob are gone
    overlap = (ellipse[0].numpy() > 0) & TRUTH.to_mask(SHAPE)
    dice = 2 * overlap.sum() / ((ellipse[0].numpy() > 0).sum() + TRUTH.to_mask(SHAPE).sum())
    assert dice > 0.99


def test_robust_fit_drops_the_spill_a_plain_fit_follows():
    from skimage.measure import find_contours

    mask = _damaged_mask(0)
    mask = ndimage.binary_fill_holes(mask)
    labels, _ = ndimage.label(mask)
    points = max(find_contours((labels == labels[135, 200]).astype(float), 0.5), key=len)
    robust, inliers = fit_ellipse_robust(points)
    assert 0 < (~inliers).sum() < 0.3 * len(points)  # the spill's contour is left out, not the rest
    assert robust.perimeter == pytest.approx(TRUTH.perimeter, rel=0.01)
    assert fit_ellipse(points).perimeter > 1.02 * TRUTH.perimeter  # 4% here: what the robust fit is for


def test_largest_keeps_one_filled_region_and_none_changes_nothing():
    mask = _damaged_mask(0)
    mask[130:140, 195:205] = False  # a hole in the head
    pred = torch.as_tensor(mask[None].astype(np.float32))
    largest = head_mask(pred, "largest")[0].numpy() > 0
    assert ndimage.label(largest)[1] == 1 and largest[135, 200] and not largest[20, 20]
    assert torch.equal(head_mask(pred, "none"), pred)


def test_one_hot_prediction_keeps_its_channels_type_and_metadata():
    mask = torch.as_tensor(_damaged_mask(1), dtype=torch.float32)
    pred = MetaTensor(torch.stack([1 - mask, mask]), meta={"filename_or_obj": "001_HC.png"})
    out = HeadMaskd("pred", mode="ellipse")({"pred": pred})["pred"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "001_HC.png"
    assert out.shape == pred.shape and out.dtype == pred.dtype
    assert torch.equal(out[0] + out[1], torch.ones(SHAPE))


def test_an_empty_mask_stays_empty_and_a_bad_mode_is_refused():
    empty = torch.zeros(1, 20, 30)
    assert torch.equal(head_mask(empty, "ellipse"), empty)
    with pytest.raises(ValueError, match="postprocess must be one of ellipse, largest, none"):
        HeadMaskd("pred", mode="circle")


@pytest.mark.parametrize("spacing", [0.12, (0.12, 0.09)])
def test_head_circumference_measures_the_recorded_ellipse_as_a_refit_would(spacing):
    """HeadMaskd records its ellipse; HeadCircumference measures it instead of fitting the filled mask again."""
    from custom_nets.metrics.head_circumference import ELLIPSE_META_KEY, HeadCircumference

    mask = torch.as_tensor(_damaged_mask(2), dtype=torch.float32)
    pred = HeadMaskd("pred", mode="ellipse")({"pred": MetaTensor(mask[None], meta={"filename_or_obj": "a.png"})})["pred"]
    recorded = Ellipse(*pred.meta[ELLIPSE_META_KEY])
    assert np.array_equal(recorded.to_mask(SHAPE), pred[0].numpy() > 0)
    refit = head_circumference_mm(pred[0].numpy(), spacing, 1.4)
    measured = head_circumference_mm(pred[0].numpy(), spacing, 1.4, pixel_ellipse=recorded)
    assert measured == pytest.approx(refit, abs=0.05)  # mm: the refit sees the rasterised contour
    pixel = spacing if isinstance(spacing, float) else spacing[0]
    columns = HeadCircumference(pixel_size_key="pixel")({"pred": pred, "pixel": pixel})
    assert columns["hc_mm"] == pytest.approx(head_circumference_mm(pred[0].numpy(), pixel, 0.0, pixel_ellipse=recorded))


def test_a_mask_changed_after_the_fit_is_measured_not_its_stale_ellipse():
    from custom_nets.metrics.head_circumference import HeadCircumference

    pred = HeadMaskd("pred", mode="ellipse")({"pred": MetaTensor(torch.as_tensor(_damaged_mask(0), dtype=torch.float32)[None])})["pred"]
    emptied = pred.clone().zero_()  # what the runner does for a constant input: the metadata stays
    assert HeadCircumference(pixel_size_key="pixel")({"pred": emptied, "pixel": 0.1})["hc_note"] == "empty mask: no head was segmented"
    halved = pred.clone()
    halved[:, :, SHAPE[1] // 2 :] = 0
    hc = HeadCircumference(pixel_size_key="pixel")({"pred": halved, "pixel": 0.1})["hc_mm"]
    assert hc == pytest.approx(head_circumference_mm(halved[0].numpy(), 0.1), rel=1e-6)
    assert HeadMaskd("pred", mode="largest")({"pred": pred})["pred"].meta.get("head_ellipse") is None


def test_a_stretched_ellipse_keeps_its_area_and_axes():
    ellipse = Ellipse(10.0, 20.0, 8.0, 5.0, 0.3)
    doubled = ellipse.scaled(2.0)
    assert tuple(doubled[:4]) == pytest.approx((20.0, 40.0, 16.0, 10.0))
    assert np.sin(doubled.angle - 0.3) == pytest.approx(0.0, abs=1e-12)  # an axis is a direction up to its sign
    stretched = ellipse.scaled((0.5, 2.0))
    assert stretched.semi_major * stretched.semi_minor == pytest.approx(8.0 * 5.0)  # area scales by 0.5 x 2
    # the stretched ellipse holds the stretched points of the original
    t = np.linspace(0, 2 * np.pi, 50)
    cos, sin = np.cos(ellipse.angle), np.sin(ellipse.angle)
    points = np.stack([10 + 8 * np.cos(t) * cos - 5 * np.sin(t) * sin, 20 + 8 * np.cos(t) * sin + 5 * np.sin(t) * cos], 1)
    assert np.abs(stretched.radial_distance(points * [0.5, 2.0])).max() < 1e-9
