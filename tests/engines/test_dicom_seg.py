"""
DICOM SEG output of the lung CT bundle (``--dicom_seg true``, :class:`custom_nets.engines.dicom_seg.DicomSegWriter`).

The real ``python -m monai.bundle run inference`` CLI runs on a bundle copy with a freshly initialised
``models/model.pt`` over the real TCIA DICOM series, a synthetic DICOM series and a NIfTI volume. Each SEG is
read back with highdicom and pydicom: it must reference the source series (study, series, every SOP
instance, frame of reference), carry the metadata's segment and codes and the bundle's name and version,
and its frames, mapped back to the source slices by SOP Instance UID, must equal the NIfTI mask of the
same run voxel for voxel. Random weights may give an empty mask, so the writer is also run directly on a
known non-empty mask over the real series (the right lung rasterised from the series' RTSTRUCT).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from _export_helpers import BUNDLES_DIR, copy_bundle, env_without, write_initial_checkpoint
from custom_nets.data.synthetic_dicom import make_synthetic_dicom_series, write_dicom_series
from custom_nets.data.volume_io import dicom_series_files, read_volume
from custom_nets.errors import InputError

hd = pytest.importorskip("highdicom", reason="the [dicom] extra (highdicom) is not installed")

from custom_nets.engines.dicom_seg import DicomSegWriter, dicom_seg_outputs  # noqa: E402

BUNDLE = "lung_nodule_ct_segmentation"
METADATA = json.loads((BUNDLES_DIR / BUNDLE / "configs" / "metadata.json").read_text())
TINY = ["--image_size", "[64,64]", "--num_workers", "0"]
SYNTHETIC_IDENTIFIERS = ("Synthetic^Phantom", "SYNTH-0001")  # written into every slice by synthetic_dicom
REAL_IDENTIFIERS = ("ACRIN-FLT-Breast_001",)  # the real series' PatientName / PatientID (pseudonymised by TCIA)



def _bundle_cli(bundle: Path, inputs: Path, outputs: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
            "--bundle_root", ".", "--input_dir", str(inputs), "--output_dir", str(outputs), *TINY, *extra]  # fmt: skip
    return subprocess.run(args, cwd=bundle, capture_output=True, text=True, env=env, timeout=600)


def _source_headers(series: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_series_files(series)]


def _mask_on_source_slices(mask: np.ndarray, affine: np.ndarray, headers: list[pydicom.Dataset]) -> dict[str, np.ndarray]:
    """
    The NIfTI mask as one (Rows, Columns) picture per source SOP Instance UID, computed here for axial series with
    the identity orientation only (as both test series are): voxel (i, j, k) is pixel (row j, column i) of the
    slice at voxel k's position, whatever the order of the files.
    """
    to_voxel = np.linalg.inv(affine)
    pictures = {}
    for ds in headers:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        lps = np.asarray([float(v) for v in ds.ImagePositionPatient])
        i, j, k = to_voxel[:3, :3] @ (lps * [-1, -1, 1]) + to_voxel[:3, 3]
        assert (round(i), round(j)) == (0, 0)  # ITK's grid: pixel (0, 0) of every slice is voxel (0, 0, k)
        pictures[str(ds.SOPInstanceUID)] = mask[:, :, round(k)].T
    return pictures


def _check_seg_matches(seg_path: Path, series: Path, mask: np.ndarray, affine: np.ndarray, identifiers: tuple[str, ...]) -> None:
    """``seg_path`` references ``series`` and its frames equal ``mask`` (on the reader's grid) slice by slice."""
    from pydicom.sr.codedict import codes

    headers = _source_headers(series)
    seg = hd.seg.segread(seg_path)
    raw = pydicom.dcmread(seg_path)
    assert raw.SOPClassUID == pydicom.uid.SegmentationStorage and raw.SegmentationType == "BINARY"
    # the source series, referenced
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    (referenced,) = raw.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {ds.SOPInstanceUID for ds in headers}
    assert {uid for _, _, uid in seg.get_source_image_uids()} == {str(ds.SOPInstanceUID) for ds in headers}
    assert seg.SeriesInstanceUID != headers[0].SeriesInstanceUID
    # segments, codes and algorithm from metadata.json
    assert seg.get_segment_numbers() == [1]
    (segment,) = raw.SegmentSequence
    assert segment.SegmentLabel == "nodule" and segment.SegmentAlgorithmType == "AUTOMATIC"
    description = seg.get_segment_description(1)
    assert description.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
    assert description.segmented_property_type == codes.SCT.Nodule
    assert list(description.anatomic_regions) == [codes.SCT.Lung]
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (METADATA["name"], METADATA["version"])
    # frames back on the source slices, voxel for voxel
    expected = _mask_on_source_slices(mask, affine, headers)
    uids = list(expected)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1], assert_missing_frames_are_empty=True)
    for n, uid in enumerate(uids):
        np.testing.assert_array_equal(pixels[n, :, :, 0], expected[uid] > 0, err_msg=f"source slice {uid}")
    # the SEG names no patient (its patient module copies the source's, as the standard asks)
    assert seg.PatientID == headers[0].PatientID
    assert not any(value in seg_path.name for value in identifiers)


@pytest.fixture(scope="module")
def real_series(shared_data) -> Path:
    return shared_data / "lung_ct" / "acrin_flt_breast_001" / "dicom"


def test_metadata_codes_are_the_codedict_ones():
    from pydicom.sr.codedict import codes

    (segment,) = METADATA["dicom_seg"]["segments"]
    expected = {"category": codes.SCT.MorphologicallyAbnormalStructure, "type": codes.SCT.Nodule, "anatomy": codes.SCT.Lung}
    for key, code in expected.items():
        assert (segment[key]["value"], segment[key]["scheme"], segment[key]["meaning"]) == (code.value, code.scheme_designator, code.meaning)
    assert segment["label_value"] == 1 and METADATA["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] == segment["label"]


def test_writer_on_the_real_series_with_a_known_mask(real_series, tmp_path, caplog):
    """A non-empty mask (the right lung from the series' RTSTRUCT, on the series' grid) written and read back."""
    image = read_volume(real_series)
    known = nib.load(real_series.parent / "labels_derived_from_rtstruct.nii.gz")
    np.testing.assert_allclose(known.affine, image.meta["original_affine"], atol=1e-4)
    mask = (np.asarray(known.dataobj) == 1).astype(np.float32)
    assert mask.sum() > 10000 and 1 < np.count_nonzero(mask.sum(axis=(0, 1))) < mask.shape[2]  # lung on some slices only

    with caplog.at_level("DEBUG"):
        columns = DicomSegWriter(tmp_path, metadata=METADATA)({"image": image, "pred": torch.as_tensor(mask)[None]})

    assert columns == {"dicom_seg": "dicom_seg.dcm"}
    _check_seg_matches(tmp_path / "dicom_seg.dcm", real_series, mask, np.asarray(image.meta["original_affine"]), REAL_IDENTIFIERS)
    assert not any(value in caplog.text for value in REAL_IDENTIFIERS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dicom_seg.dcm"]  # atomic: no temporary file left


@pytest.mark.parametrize("break_series", ["no_frame_of_reference", "mixed_studies"])
def test_series_without_one_frame_of_reference_or_study_gets_no_seg(break_series, tmp_path, caplog):
    series = Path(make_synthetic_dicom_series(str(tmp_path / "series"), shape=(16, 16, 4)))
    first = sorted(series.iterdir())[0]
    ds = pydicom.dcmread(first)
    if break_series == "no_frame_of_reference":
        for path in series.iterdir():
            ds = pydicom.dcmread(path)
            del ds.FrameOfReferenceUID
            ds.save_as(path)
    else:
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(first)
    image = read_volume(series)
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        columns = DicomSegWriter(out, metadata=METADATA)({"image": image, "pred": torch.ones((1, *image.shape[1:]))})
    assert columns["dicom_seg"].startswith("skipped: the DICOM series")
    assert ("FrameOfReferenceUID" if break_series == "no_frame_of_reference" else "mixes 2 StudyInstanceUIDs") in columns["dicom_seg"]
    assert not out.exists() or not any(out.iterdir())
    assert len([r for r in caplog.records if "no DICOM SEG" in r.getMessage()]) == 1


def test_label_map_with_several_labels_gives_one_segment_per_metadata_label(tmp_path):
    """A BraTS-like label map (1, 2, 4) on a synthetic series: segment n holds the voxels of the n-th metadata label."""
    from pydicom.sr.codedict import codes

    series = Path(make_synthetic_dicom_series(str(tmp_path / "series"), shape=(20, 16, 5)))
    image = read_volume(series)
    labels = np.zeros(image.shape[1:], dtype=np.float32)
    labels[2:8, 3:9, 1:4], labels[10:14, 2:6, 2], labels[15:18, 10:15, 0:5] = 1, 2, 4
    code = {"value": codes.SCT.Tissue.value, "scheme": "SCT", "meaning": codes.SCT.Tissue.meaning}
    metadata = {"name": "multi-label test", "version": "9.9.9", "dicom_seg": {"segments": [
        {"label_value": value, "label": f"label {value}", "category": code, "type": code} for value in (1, 2, 4)]}}  # fmt: skip

    columns = DicomSegWriter(tmp_path, metadata=metadata)({"image": image, "pred": torch.as_tensor(labels)[None]})

    seg = hd.seg.segread(tmp_path / columns["dicom_seg"])
    assert seg.get_segment_numbers() == [1, 2, 3]
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == ["label 1", "label 2", "label 4"]
    headers = _source_headers(series)
    expected = _mask_on_source_slices(labels, np.asarray(image.meta["original_affine"]), headers)
    pixels = seg.get_pixels_by_source_instance(list(expected), segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True)
    for n, picture in enumerate(expected.values()):
        for segment, value in enumerate((1, 2, 4)):
            np.testing.assert_array_equal(pixels[n, :, :, segment], picture == value)
    labels[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"series: label value\(s\) 3 have no segment in metadata.json dicom_seg#segments"):
        DicomSegWriter(tmp_path, metadata=metadata)({"image": image, "pred": torch.as_tensor(labels)[None]})


def test_a_mask_off_the_series_grid_is_refused(real_series, tmp_path):
    image = read_volume(real_series)
    shifted = np.asarray(image.meta["original_affine"]).copy()
    shifted[2, 3] += 0.5 * shifted[2, 2]  # half a slice along z
    image.meta["original_affine"] = shifted
    with pytest.raises(ValueError, match="does not lie on the mask's voxel grid"):
        DicomSegWriter(tmp_path, metadata=METADATA)({"image": image, "pred": torch.zeros((1, *image.shape[1:]))})
    assert not any(tmp_path.iterdir())


def test_flag_and_setup_errors_are_one_line(tmp_path):
    writer = DicomSegWriter(tmp_path, metadata=METADATA)
    assert dicom_seg_outputs(False, writer) == [] and dicom_seg_outputs("false", writer) == []
    assert dicom_seg_outputs("true", writer) == [writer]
    with pytest.raises(InputError, match="--dicom_seg must be true or false"):
        dicom_seg_outputs("sometimes", writer)
    with pytest.raises(InputError, match="metadata.json: --dicom_seg true needs 'name', 'version' and 'dicom_seg#segments'"):
        dicom_seg_outputs(True, DicomSegWriter(tmp_path, metadata={"name": "x", "version": "1"}))
    assert not any(tmp_path.iterdir())


def test_nifti_stays_the_default_output():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / BUNDLE / "configs" / "inference.json"))
    parser.read_meta(str(BUNDLES_DIR / BUNDLE / "configs" / "metadata.json"))
    assert parser["dicom_seg"] is False
    outputs = parser.get_parsed_content("case_outputs")
    assert [type(o).__name__ for o in outputs] == ["VolumeMaskWriter", "NoduleTableWriter"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A copy of the lung bundle with a freshly initialised ``models/model.pt``."""
    root = copy_bundle(BUNDLE, tmp_path_factory.mktemp("bundle") / BUNDLE)
    write_initial_checkpoint(root)
    return root


@pytest.mark.slow
def test_cli_writes_a_seg_per_dicom_series_equal_to_its_nifti_mask(bundle, real_series, tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    os.symlink(real_series, inputs / "series_real")
    make_synthetic_dicom_series(str(inputs / "series_synthetic"), shape=(48, 40, 6))
    hu = np.full((24, 20, 4), -1000, dtype=np.int16)
    hu[6:18, 5:15] = 30
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), str(inputs / "volume.nii.gz"))

    result = _bundle_cli(bundle, inputs, outputs, "--dicom_seg", "true")

    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    with open(outputs / "results.csv", newline="") as f:
        rows = {row["image"]: row for row in csv.DictReader(f)}
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(["series_real", "series_synthetic", "volume.nii.gz"], "ok")
    assert rows["series_real"]["dicom_seg"] == "series_real_seg.dcm"
    assert rows["series_synthetic"]["dicom_seg"] == "series_synthetic_seg.dcm"
    assert rows["volume.nii.gz"]["dicom_seg"] == "skipped: nifti input is not DICOM"
    assert sorted(p.name for p in outputs.iterdir() if p.suffix == ".dcm") == ["series_real_seg.dcm", "series_synthetic_seg.dcm"]
    assert (outputs / "volume_seg.nii.gz").is_file()
    for name, identifiers in (("series_real", REAL_IDENTIFIERS), ("series_synthetic", SYNTHETIC_IDENTIFIERS)):
        nifti = nib.load(outputs / f"{name}_seg.nii.gz")
        _check_seg_matches(outputs / f"{name}_seg.dcm", inputs / name, np.asarray(nifti.dataobj), nifti.affine, identifiers)
    tracking = {pydicom.dcmread(outputs / f"{n}_seg.dcm").SegmentSequence[0].TrackingUID for n in ("series_real", "series_synthetic")}
    assert len(tracking) == 2  # a Tracking UID names one finding: new for every SEG
    printed = result.stdout + result.stderr
    assert not any(value in printed for value in (*REAL_IDENTIFIERS, *SYNTHETIC_IDENTIFIERS, "Synthetic", "SYNTH"))
    assert sum("volume: no DICOM SEG: nifti input is not DICOM" in line for line in printed.splitlines()) == 1


@pytest.mark.slow
def test_cli_without_highdicom_stops_in_one_line_naming_the_extra(bundle, tmp_path):
    env = env_without(tmp_path / "site", "highdicom")
    inputs = tmp_path / "in"
    write_dicom_series(np.zeros((8, 8, 3), dtype=np.int16), inputs / "series")

    result = _bundle_cli(bundle, inputs, tmp_path / "out", "--dicom_seg", "true", env=env)

    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ERROR: --dicom_seg true needs highdicom, which is not installed: pip install 'custom_nets[dicom]'"
    )
    assert not (tmp_path / "out" / "series_seg.nii.gz").exists()  # stopped before the first case
