"""BraTS layouts, label conventions, brain-masked intensity scaling; on synthetic and on the real sample."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_nets.data import brats, synthetic_brats
from custom_nets.data.brats import (
    BRATS2013_LAYOUT,
    BraTSCaseError,
    BraTSCaseFilesd,
    ConvertBraTSLabelsToRegionsd,
    RobustBrainNormalized,
    brats_cases,
    region_masks,
    regions_to_labels,
    stack_case_sequences,
)
from custom_nets.data.volume_io import LoadVolumed, VolumeInputError


@pytest.fixture(scope="module")
def brats_dir(tmp_path_factory):
    return synthetic_brats.generate(str(tmp_path_factory.mktemp("brats")), num_cases=3, shape=(24, 24, 16), seed=1)


def test_brats2020_layout_lists_sequences_in_channel_order(brats_dir):
    items = brats_cases(brats_dir, sequences=["flair", "t1ce"])
    assert [item["case"] for item in items] == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]
    assert items[0]["image"][0].endswith("BraTS20_Training_001_flair.nii.gz")
    assert items[0]["image"][1].endswith("BraTS20_Training_001_t1ce.nii.gz")
    assert items[0]["label"].endswith("BraTS20_Training_001_seg.nii.gz")


def test_brats2013_sample_layout(shared_data):
    items = brats_cases(shared_data / "brats2015", **BRATS2013_LAYOUT)
    assert len(items) == 3
    assert all(len(item["image"]) == 2 and item["brain_mask"].endswith("brainmask.nii.gz") for item in items)


def test_case_folder_expands_to_sequence_files_for_inference(brats_dir):
    data = BraTSCaseFilesd(keys="image", sequences=["t2", "flair"])({"image": f"{brats_dir}/BraTS20_Training_002"})
    assert data["case"] == "BraTS20_Training_002"
    assert [p.rsplit("_", 1)[-1] for p in data["image"]] == ["t2.nii.gz", "flair.nii.gz"]
    assert BraTSCaseFilesd(keys="image")({"image": ["a.nii.gz"]})["image"] == ["a.nii.gz"]  # already files: kept


def test_missing_sequence_names_case_and_sequence(brats_dir, tmp_path):
    import shutil

    case_dir = tmp_path / "BraTS20_Training_001"
    shutil.copytree(f"{brats_dir}/BraTS20_Training_001", case_dir)
    (case_dir / "BraTS20_Training_001_t2.nii.gz").unlink()
    with pytest.raises(BraTSCaseError, match=r"^BraTS20_Training_001: missing MRI sequence\(s\) t2") as info:
        brats_cases(tmp_path)
    assert "\n" not in str(info.value)


def test_sequences_of_different_shapes_name_the_case(tmp_path):
    case_dir = tmp_path / "BraTS20_Training_009"
    case_dir.mkdir()
    for name, shape in (("t1", (8, 8, 6)), ("flair", (8, 8, 5))):
        nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.int16), np.eye(4)), case_dir / f"BraTS20_Training_009_{name}.nii.gz")
    item = brats_cases(tmp_path, sequences=["t1", "flair"], label_pattern=None)[0]
    with pytest.raises(VolumeInputError, match=r"^BraTS20_Training_009: volumes of different shapes"):
        LoadVolumed(keys="image")(item)


@pytest.mark.parametrize(
    "convention, labels, expected",
    [
        # label values -> expected (TC, WT, ET) membership of one voxel each
        ("brats2020", [0, 1, 2, 4], [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]),
        ("brats2013", [0, 1, 2, 3, 4], [[0, 1, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]]),
        ({"TC": (1,), "WT": (1, 2), "ET": (2,), "labels": (0, 1, 2)}, [0, 1, 2], [[0, 1, 0], [0, 1, 1], [0, 0, 1]]),
    ],
)
def test_label_conventions_map_to_regions(convention, labels, expected):
    regions = region_masks(torch.tensor(labels, dtype=torch.float32)[None, :, None], convention)
    assert regions.shape == (3, len(labels), 1)
    assert regions[..., 0].tolist() == [[float(v) for v in row] for row in expected]


def test_label_outside_convention_names_the_case():
    data = {"case": "brats_2013_pat0001_1", "label": torch.tensor([[[0.0, 3.0]]])}
    with pytest.raises(ValueError, match=r"^brats_2013_pat0001_1: label values \[3\] are not part of brats2020"):
        ConvertBraTSLabelsToRegionsd(keys="label", convention="brats2020")(data)


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="unknown BraTS label convention"):
        ConvertBraTSLabelsToRegionsd(keys="label", convention="brats2099")


def test_regions_back_to_brats2020_labels():
    labels = torch.tensor([0, 1, 2, 4, 4, 2], dtype=torch.float32)[None, :, None, None]
    assert torch.equal(regions_to_labels(region_masks(labels, "brats2020")).float(), labels)


def test_robust_normalisation_maps_brain_percentiles_to_unit_range():
    torch.manual_seed(0)
    image = torch.zeros(2, 20, 20, 10)
    brain = torch.zeros(20, 20, 10, dtype=torch.bool)
    brain[4:16, 4:16, 2:8] = True
    image[0][brain] = torch.randn(int(brain.sum())) * 100 + 500
    image[1][brain] = torch.rand(int(brain.sum())) * 3
    out = RobustBrainNormalized(keys="image", lower=1, upper=99)({"image": image.clone()})["image"]
    for c in range(2):
        inside = out[c][brain]
        assert float(inside.min()) == 0.0 and float(inside.max()) == 1.0
        assert 0.97 < float(((inside > 0) & (inside < 1)).float().mean()) <= 0.99
        assert float(out[c][~brain].abs().max()) == 0.0


def test_robust_normalisation_uses_the_brain_mask_when_given():
    image = torch.full((1, 6, 6, 4), -1.0)  # z-scored data: negative values inside the brain too
    image[0, :3] = 2.0
    mask = torch.zeros(1, 6, 6, 4)
    mask[0, 1:5] = 1
    out = RobustBrainNormalized(keys="image", mask_key="brain_mask", lower=0, upper=100)({"image": image, "brain_mask": mask})
    assert out["image"][0, 0].abs().max() == 0  # outside the mask
    assert out["image"][0, 1:3].min() == 1.0 and out["image"][0, 3:5].max() == 0.0


def test_real_sample_case_pipeline(shared_data):
    item = brats_cases(shared_data / "brats2015", **BRATS2013_LAYOUT)[0]
    data = LoadVolumed(keys=["image", "label", "brain_mask"])(item)
    data = RobustBrainNormalized(keys="image", mask_key="brain_mask")(data)
    data = ConvertBraTSLabelsToRegionsd(keys="label", convention="brats2013")(data)
    assert tuple(data["image"].shape) == (2, 240, 240, 155) and tuple(data["label"].shape) == (3, 240, 240, 155)
    assert 0.0 <= float(data["image"].min()) and float(data["image"].max()) <= 1.0
    tc, wt, et = (data["label"][i].sum() for i in range(3))
    assert 0 < et <= tc <= wt  # regions are nested


def test_datalist_split_of_the_real_sample_keeps_subjects_apart(shared_data, tmp_path):
    splits = brats.datalist(shared_data / "brats2015", tmp_path / "datalist.json", subject_regex=r"^(.*pat\d+)", **BRATS2013_LAYOUT)
    assert [len(splits[k]) for k in ("training", "validation", "test")] == [1, 1, 1]
    assert all(str(shared_data) in item["image"][0] for items in splits.values() for item in items)


def test_stacked_study_preprocesses_like_its_case_folder(brats_dir, tmp_path, repo_root):
    """The bundle's inference preprocessing gives the same network input for a case folder and for its sequences
    stacked in one 4D NIfTI (a MONAI Label study)."""
    from monai.bundle import ConfigParser

    case = f"{brats_dir}/BraTS20_Training_002"
    study = stack_case_sequences(case, tmp_path / "BraTS20_Training_002.nii.gz")
    assert nib.load(study).shape == (24, 24, 16, 4)
    parser = ConfigParser()
    parser.read_config(str(repo_root / "bundles" / "brain_tumor_mri_segmentation" / "configs" / "inference.json"))
    parser["image_size"] = [32, 32]
    preprocessing = parser.get_parsed_content("preprocessing")
    from_folder, from_study = preprocessing({"image": case}), preprocessing({"image": str(study)})
    torch.testing.assert_close(from_study["image"].as_tensor(), from_folder["image"].as_tensor())  # float32 rounding of another memory layout
    np.testing.assert_allclose(from_study["image"].affine, from_folder["image"].affine)


def test_stacked_real_sample_keeps_the_brain_of_its_mask(shared_data, tmp_path):
    """BraTS 2013 sequences are non-zero outside the brain: the stacked study zeroes them, so the scaling without
    a mask (the study's) equals the scaling with the case's brain mask."""
    case = shared_data / "brats2015" / "brats_2013_pat0005_1"
    layout = {k: v for k, v in BRATS2013_LAYOUT.items() if k != "label_pattern"}
    study = stack_case_sequences(case, tmp_path / "pat0005.nii.gz", **layout)
    item = BraTSCaseFilesd(keys="image", **layout)({"image": str(case)})
    from_folder = RobustBrainNormalized(keys="image", mask_key="brain_mask")(LoadVolumed(keys=["image", "brain_mask"])(item))
    from_study = RobustBrainNormalized(keys="image")(LoadVolumed(keys="image", stacked_channels={"image": 2})({"image": str(study)}))
    torch.testing.assert_close(from_study["image"].as_tensor(), from_folder["image"].as_tensor())
    np.testing.assert_allclose(nib.load(study).affine, nib.load(item["image"][0]).affine)


def test_stacked_study_with_another_channel_count_is_refused(brats_dir, tmp_path):
    study = stack_case_sequences(f"{brats_dir}/BraTS20_Training_001", tmp_path / "two.nii.gz", sequences=["flair", "t1ce"])
    with pytest.raises(VolumeInputError, match=r"two.nii.gz holds 2 volume\(s\) .*expected a NIfTI of 4 channels stacked"):
        LoadVolumed(keys="image", stacked_channels={"image": 4})({"image": str(study)})
    with pytest.raises(VolumeInputError, match="holds 2 volumes or channels"):  # not asked for: one 3D volume per file
        LoadVolumed(keys="image")({"image": str(study)})


@pytest.mark.slow
def test_studies_command_line_writes_studies_and_labels(brats_dir, tmp_path):
    command = [sys.executable, "-m", "custom_nets", "brats_studies", str(brats_dir), str(tmp_path), "--labels", "true"]
    subprocess.run(command, check=True, capture_output=True)
    studies = sorted(p.name for p in tmp_path.glob("*.nii.gz"))
    assert studies == [f"BraTS20_Training_00{i}.nii.gz" for i in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "labels" / "final").iterdir()) == studies
    assert nib.load(tmp_path / studies[0]).shape == (24, 24, 16, 4)


@pytest.mark.slow
def test_generator_command_line(tmp_path):
    command = [sys.executable, "-m", "custom_nets.data.synthetic_brats", "--output_dir", str(tmp_path), "--num_cases", "2",
               "--shape", "[16,16,8]", "--sequences", "[flair,t1ce]"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    items = brats_cases(tmp_path, sequences=["flair", "t1ce"])
    assert len(items) == 2
    assert set(np.unique(np.asarray(nib.load(items[0]["label"]).dataobj)).tolist()) <= {0, 1, 2, 4}
