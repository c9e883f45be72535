"""LUNA16 layout: nodule masks at the annotated world positions, per-nodule measurements, bad annotations."""

from __future__ import annotations

import csv
import logging
import math
import subprocess
import sys

import numpy as np
import pytest

from custom_nets.data import luna16, synthetic_luna16
from custom_nets.data.luna16 import (
    NoduleAnnotationError,
    NoduleMaskd,
    luna16_cases,
    nodule_mask,
    read_annotations,
    voxel_to_world,
    world_to_voxel,
)
from custom_nets.data.synthetic_luna16 import GEOMETRIES
from custom_nets.data.volume_io import LoadVolumed
from custom_nets.metrics.nodules import NODULE_TABLE_COLUMNS, nodule_table, write_nodule_csv

# an oblique affine (RAS), anisotropic spacing, non-zero origin
OBLIQUE = np.array(
    [[-0.7 * math.cos(0.3), 0.7 * math.sin(0.3), 0.0, 120.0],
     [-0.7 * math.sin(0.3), -0.7 * math.cos(0.3), 0.0, 80.0],
     [0.0, 0.0, 2.5, -300.0],
     [0.0, 0.0, 0.0, 1.0]]
)  # fmt: skip


@pytest.fixture(scope="module")
def luna_dir(tmp_path_factory):
    # one scan per geometry (identity, flipped, oblique) with nodules, and a fourth without any
    return synthetic_luna16.generate(str(tmp_path_factory.mktemp("luna16")), num_cases=4, shape=(64, 64, 24), seed=2)


@pytest.mark.parametrize("case_index", range(len(GEOMETRIES)))
def test_sphere_lands_at_annotated_world_position(luna_dir, case_index):
    item = luna16_cases(luna_dir)[case_index]
    data = NoduleMaskd(keys="image")(LoadVolumed(keys="image")(item))
    image, mask = data["image"][0].numpy(), data["label"][0].numpy().astype(bool)
    rows = nodule_table(mask, data["image"].affine.numpy(), case=item["case"])
    assert len(rows) == len(item["nodules"]) > 0
    found = np.array([[r["coordX"], r["coordY"], r["coordZ"]] for r in rows])
    for x, y, z, _ in item["nodules"]:
        assert np.min(np.linalg.norm(found - [x, y, z], axis=1)) < 0.5  # mm; voxels are 0.8 x 0.8 x 2.5
    # the mask covers the voxels the generator painted as nodule (30 HU, noise sd 15) and nothing else
    assert abs(float(image[mask].mean()) - 30.0) < 5.0
    assert float(np.abs(image[mask] - 30.0).max()) < 100.0


def test_mask_agrees_with_itk_physical_to_index(luna_dir):
    import itk

    item = luna16_cases(luna_dir)[2]  # the oblique scan
    reference = itk.imread(item["image"])
    image = LoadVolumed(keys="image")(item)["image"]
    for x, y, z, _ in item["nodules"]:
        expected = reference.TransformPhysicalPointToContinuousIndex(itk.Point[itk.D, 3]([x, y, z]))
        np.testing.assert_allclose(world_to_voxel([[x, y, z]], image.affine.numpy())[0], list(expected), atol=1e-4)


def test_world_voxel_round_trip():
    points = np.array([[10.0, -20.0, -290.0], [0.0, 0.0, -250.0]])
    np.testing.assert_allclose(voxel_to_world(world_to_voxel(points, OBLIQUE), OBLIQUE), points, atol=1e-9)


def test_nodule_table_measures_a_known_ball():
    affine = np.diag([-0.5, -0.5, 1.0, 1.0])
    centre_index = np.array([20.0, 24.0, 15.0])
    centre_lps = voxel_to_world([centre_index], affine)[0]
    mask = nodule_mask((40, 48, 30), affine, [[*centre_lps, 8.0]])
    rows = nodule_table(mask, affine, case="ball")
    assert len(rows) == 1 and rows[0]["case"] == "ball"
    np.testing.assert_allclose([rows[0][c] for c in ("coordX", "coordY", "coordZ")], centre_lps, atol=1e-3)
    assert rows[0]["volume_mm3"] == pytest.approx(4 / 3 * math.pi * 4**3, rel=0.05)
    assert rows[0]["diameter_mm"] == pytest.approx(8.0, rel=0.03)
    assert rows[0]["voxels"] == int(mask.sum())


def test_nodule_table_separates_components_largest_first():
    mask = np.zeros((30, 30, 30), dtype=np.uint8)
    mask[2:5, 2:5, 2:5] = 1
    mask[15:25, 15:25, 15:25] = 1
    rows = nodule_table(mask, np.eye(4), space="LPS")
    assert [r["voxels"] for r in rows] == [1000, 27]
    assert [r["nodule"] for r in rows] == [1, 2]
    assert rows[0]["coordX"] == pytest.approx(19.5)


def test_nodule_smaller_than_a_voxel_still_marks_one_voxel():
    mask = nodule_mask((10, 10, 10), np.diag([-2.0, -2.0, 5.0, 1.0]), [[9.0, 9.0, 25.0, 0.5]])
    assert int(mask.sum()) == 1


def test_annotation_outside_the_volume_names_the_case():
    with pytest.raises(NoduleAnnotationError, match=r"^scan_7: nodule 0 at \(500.0, 0.0, 0.0\) mm lies outside the volume") as info:
        nodule_mask((10, 10, 10), np.eye(4), [[500.0, 0.0, 0.0, 5.0]], space="LPS", case="scan_7")
    assert "\n" not in str(info.value)


def test_annotation_outside_the_volume_can_be_skipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        mask = nodule_mask((10, 10, 10), np.eye(4), [[500.0, 0.0, 0.0, 5.0]], space="LPS", case="scan_7", on_outside="skip")
    assert mask.sum() == 0
    assert "scan_7: nodule 0" in caplog.text


@pytest.mark.parametrize(
    "content, message",
    [
        ("seriesuid,coordX,coordY,diameter_mm\na,1,2,3\n", "missing column"),
        ("seriesuid,coordX,coordY,coordZ,diameter_mm\na,1,2,x,3\n", "line 2: non-numeric"),
        ("seriesuid,coordX,coordY,coordZ,diameter_mm\na,1,2,3,0\n", "line 2: .*diameter positive"),
    ],
)
def test_bad_annotation_file_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "annotations.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        read_annotations(path)
    assert "annotations.csv" in str(info.value)


@pytest.mark.parametrize("include_negative, expected", [(True, 4), (False, 3)])
def test_cases_with_or_without_negative_scans(luna_dir, include_negative, expected):
    items = luna16_cases(luna_dir, include_negative=include_negative)
    assert len(items) == expected
    assert all(item["image"].endswith(f"{item['case']}.mhd") for item in items)


def test_datalist_keeps_nodules_and_resolves_paths(luna_dir, tmp_path):
    splits = luna16.datalist(luna_dir, tmp_path / "datalist.json")
    items = [item for split in splits.values() for item in split]
    assert sorted(item["case"] for item in items) == sorted(item["case"] for item in luna16_cases(luna_dir))
    assert all(item["image"].startswith(str(luna_dir)) for item in items)
    by_case = {item["case"]: item["nodules"] for item in luna16_cases(luna_dir)}
    assert all(item["nodules"] == by_case[item["case"]] for item in items)


def test_nodule_csv_has_the_documented_columns(tmp_path):
    mask = np.zeros((8, 8, 8), dtype=np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    path = write_nodule_csv(nodule_table(mask, np.eye(4), case="c1"), tmp_path / "c1_nodules.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == NODULE_TABLE_COLUMNS
        assert [row["case"] for row in reader] == ["c1"]


@pytest.mark.slow
def test_generator_command_line(tmp_path):
    command = [sys.executable, "-m", "custom_nets.data.synthetic_luna16", "--output_dir", str(tmp_path),
               "--num_cases", "2", "--shape", "[24,24,8]", "--num_subsets", "1"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    assert sorted(p.suffix for p in (tmp_path / "subset0").iterdir()) == [".mhd", ".mhd", ".raw", ".raw"]
    assert len(read_annotations(tmp_path / "annotations.csv")) == 2
