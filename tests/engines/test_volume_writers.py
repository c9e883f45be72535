"""3D per-case outputs of batch inference: NIfTI masks in the scan's geometry and the per-nodule table."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, Invertd, Orientationd, Resized

from custom_nets.data.volume_io import LoadVolumed
from custom_nets.engines.volume_writers import NoduleTableWriter, VolumeMaskWriter
from custom_nets.metrics.physical_hausdorff import PhysicalHausdorffDistanceMetric

AFFINE = np.array([[0.0, -0.8, 0.0, 40.0], [0.7, 0.0, 0.0, -30.0], [0.0, 0.0, 2.5, -100.0], [0, 0, 0, 1]])


@pytest.fixture
def scan(tmp_path):
    data = np.zeros((30, 34, 12), dtype=np.int16)
    data[5:9, 5:9, 3:6] = 100
    data[20:26, 20:26, 6:10] = 100
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "scan_07.nii.gz")
    return tmp_path / "scan_07.nii.gz", data


def _through_pipeline(path):
    """Load, reorient and resize like a bundle, 'predict' by thresholding, and invert back to the scan's grid."""
    pre = Compose([LoadVolumed("image"), Orientationd("image", axcodes="RAS", labels=None), Resized("image", [32, 32, -1])])
    case = pre({"image": str(path)})
    case["pred"] = (case["image"] > 50).float()
    return Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(case)


def test_mask_lands_on_the_scan_grid(scan, tmp_path):
    path, data = scan
    case = _through_pipeline(path)
    result = VolumeMaskWriter(tmp_path / "out")(case)
    written = nib.load(tmp_path / "out" / result["mask"])
    assert result["mask"] == "scan_07_seg.nii.gz"
    assert written.shape == data.shape
    np.testing.assert_allclose(written.affine, AFFINE, atol=1e-5)
    got, expected = np.asarray(written.dataobj) > 0, data > 50
    assert 2 * (got & expected).sum() / (got.sum() + expected.sum()) > 0.7  # a flip or shift would give ~0


def test_mask_off_the_scan_grid_is_refused(scan, tmp_path):
    case = LoadVolumed("image")({"image": str(scan[0])})
    case["pred"] = torch.zeros(1, 32, 32, 12)
    with pytest.raises(ValueError, match="differs from the source volume"):
        VolumeMaskWriter(tmp_path / "out")(case)


def test_nodule_table_covers_every_case_of_the_run(scan, tmp_path):
    path, data = scan
    writer = NoduleTableWriter(tmp_path / "out")
    case = LoadVolumed("image")({"image": str(path)})
    case["pred"] = torch.from_numpy(data > 50)[None]
    assert writer(case) == {"nodules": 2}
    case["image"].meta["case"] = "scan_08"
    writer(case)
    with open(tmp_path / "out" / "nodules.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["scan_07", "scan_07", "scan_08", "scan_08"]
    assert float(rows[0]["volume_mm3"]) == pytest.approx(6 * 6 * 4 * 0.8 * 0.7 * 2.5)


@pytest.mark.parametrize("keep_existing, expected", [("true", ["scan_07", "scan_07", "scan_08", "scan_08"]), (False, ["scan_08", "scan_08"])])
def test_a_resumed_run_keeps_the_nodules_of_earlier_cases(scan, tmp_path, keep_existing, expected):
    path, data = scan
    case = LoadVolumed("image")({"image": str(path)})
    case["pred"] = torch.from_numpy(data > 50)[None]
    NoduleTableWriter(tmp_path / "out")(case)  # the killed run finished scan_07
    case["image"].meta["case"] = "scan_08"
    NoduleTableWriter(tmp_path / "out", keep_existing=keep_existing)(case)  # --skip_existing runs scan_08 only
    with open(tmp_path / "out" / "nodules.csv", newline="") as f:
        assert [r["case"] for r in csv.DictReader(f)] == expected


@pytest.mark.parametrize("affine, expected", [(np.diag([0.7, 0.7, 2.5, 1.0]), 5.0), (None, 2.0)])
def test_hausdorff_distance_in_millimetres_from_the_affine(affine, expected):
    from monai.data import MetaTensor

    pred, label = torch.zeros(1, 20, 20, 20), torch.zeros(1, 20, 20, 20)
    pred[0, 5:10, 5:10, 5:10] = 1
    label[0, 5:10, 5:10, 7:12] = 1  # shifted by 2 voxels along the 2.5 mm axis
    if affine is not None:
        pred, label = MetaTensor(pred, affine=torch.as_tensor(affine)), MetaTensor(label, affine=torch.as_tensor(affine))
    metric = PhysicalHausdorffDistanceMetric(include_background=True, percentile=95)
    metric([pred], [label])
    assert float(metric.aggregate()) == pytest.approx(expected)
