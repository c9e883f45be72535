"""
DICOM SEG output of the brain MRI bundle for cases whose sequences are DICOM MR series (``--dicom_seg true``
with ``--image_pattern '{case}/{sequence}'``).

A real BraTS case (FLAIR and T1c) is written as two MR series of one study on one grid, and its expert label
map (BraTS 2020 values 1, 2, 4) as a SEG through :class:`custom_nets.engines.dicom_seg.DicomSegWriter`: read
back, each segment must hold that label's voxels on the source slices of the first sequence's series. The real
bundle CLI then runs over a synthetic four-sequence case in DICOM and writes a SEG equal, voxel for voxel, to
the NIfTI label map of the same run.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from _export_helpers import BUNDLES_DIR, copy_bundle, write_initial_checkpoint
from custom_nets.data import synthetic_brats
from custom_nets.data.brats import BRATS2013_LAYOUT, brats_case
from custom_nets.data.synthetic_dicom import write_dicom_series
from custom_nets.data.volume_io import dicom_series_files, read_volume

hd = pytest.importorskip("highdicom", reason="the [dicom] extra (highdicom) is not installed")

from custom_nets.engines.dicom_seg import DicomSegWriter  # noqa: E402

BUNDLE = "brain_tumor_mri_segmentation"
METADATA = json.loads((BUNDLES_DIR / BUNDLE / "configs" / "metadata.json").read_text())
PATIENT = "Brain^Scan"  # written into every slice: it must reach no file name, table or console line


def _as_mr_study(volumes: dict[str, np.ndarray], spacing, case_dir: Path) -> dict[str, Path]:
    """Each volume ``(I, J, K)`` as an MR series folder ``case_dir/<sequence>``, all of one study and one grid."""
    study, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    folders = {}
    for sequence, volume in volumes.items():
        folders[sequence] = case_dir / sequence
        write_dicom_series(volume, folders[sequence], spacing=spacing, patient_name=PATIENT, modality="MR",
                           study_uid=study, frame_of_reference_uid=frame)  # fmt: skip
    return folders


def _pictures_by_sop_uid(labels: np.ndarray, series: Path) -> dict[str, np.ndarray]:
    """``labels`` ``(I, J, K)`` of a series written by ``write_dicom_series``: slice k is (rows = j, columns = i)."""
    pictures = {}
    for path in dicom_series_files(series):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        pictures[str(ds.SOPInstanceUID)] = labels[:, :, int(ds.InstanceNumber) - 1].T
    return pictures


def _check_segments(seg_path: Path, series: Path, labels: np.ndarray) -> None:
    seg = hd.seg.segread(seg_path)
    source = pydicom.dcmread(dicom_series_files(series)[0], stop_before_pixels=True)
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (source.StudyInstanceUID, source.FrameOfReferenceUID)
    (referenced,) = pydicom.dcmread(seg_path).ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    expected = _pictures_by_sop_uid(labels, series)
    numbers = seg.get_segment_numbers()
    pixels = seg.get_pixels_by_source_instance(list(expected), segment_numbers=numbers, assert_missing_frames_are_empty=True)
    for n, picture in enumerate(expected.values()):
        for s, value in enumerate((1, 2, 4)):
            np.testing.assert_array_equal(pixels[n, :, :, s], picture == value)
    assert PATIENT.split("^")[0] not in seg_path.name


def test_metadata_segments_are_the_label_map_with_codedict_codes():
    from pydicom.sr.codedict import codes

    segments = METADATA["dicom_seg"]["segments"]
    assert [s["label_value"] for s in segments] == [1, 2, 4]  # custom_nets.data.brats.regions_to_labels
    names = METADATA["network_data_format"]["outputs"]["pred"]["channel_def"]  # what MONAI Label shows
    assert [s["label"] for s in segments] == [names[str(s["label_value"])] for s in segments]
    for segment, kind in zip(segments, (codes.SCT.Necrosis, codes.SCT.Edema, codes.SCT.Neoplasm)):
        for key, code in {"category": codes.SCT.MorphologicallyAbnormalStructure, "type": kind, "anatomy": codes.SCT.Brain}.items():
            assert (segment[key]["value"], segment[key]["scheme"], segment[key]["meaning"]) == (code.value, code.scheme_designator, code.meaning)


def test_writer_on_a_real_case_as_mr_series_with_its_expert_labels(shared_data, tmp_path):
    """The expert label map of a real BraTS case as a SEG of its FLAIR series, one segment per BraTS label."""
    from pydicom.sr.codedict import codes

    case = brats_case(sorted((shared_data / "brats2015").iterdir())[0], **BRATS2013_LAYOUT)
    first = nib.load(case["image"][0])
    spacing = [float(s) for s in first.header.get_zooms()[:3]]
    # the sample is normalised (mean 0, sd 1): stored as int16 with 3 decimals, as a scanner stores integers
    volumes = {s: np.round(nib.load(p).get_fdata() * 1000).astype(np.int16) for s, p in zip(BRATS2013_LAYOUT["sequences"], case["image"])}
    folders = _as_mr_study(volumes, spacing, tmp_path / "case")
    expert = np.asarray(nib.load(case["label"]).dataobj).astype(np.uint8)
    labels = np.where(expert == 3, 1, expert)  # BraTS 2013's non-enhancing core (3) is part of 2017+'s label 1
    assert set(np.unique(labels)) == {0, 1, 2, 4}

    image = read_volume(folders["Flair"])
    np.testing.assert_array_equal(np.asarray(image[0]), volumes["Flair"])  # the reader's grid is the written one
    columns = DicomSegWriter(tmp_path / "out", metadata=METADATA)({"image": image, "pred": torch.as_tensor(labels)[None]})

    _check_segments(tmp_path / "out" / columns["dicom_seg"], folders["Flair"], labels)
    seg = hd.seg.segread(tmp_path / "out" / columns["dicom_seg"])
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == [s["label"] for s in METADATA["dicom_seg"]["segments"]]
    assert seg.get_segment_description(3).segmented_property_type == codes.SCT.Neoplasm


@pytest.mark.slow
def test_cli_on_a_dicom_case_writes_a_seg_equal_to_its_nifti_label_map(tmp_path):
    bundle = copy_bundle(BUNDLE, tmp_path / "bundle")
    write_initial_checkpoint(bundle)
    nifti = Path(synthetic_brats.generate(str(tmp_path / "nifti"), num_cases=1, shape=(48, 48, 12)))
    (case_dir,) = sorted(p for p in nifti.iterdir() if p.is_dir())
    sequences = ("t1", "t1ce", "t2", "flair")
    volumes = {s: np.round(nib.load(case_dir / f"{case_dir.name}_{s}.nii.gz").get_fdata()).astype(np.int16) for s in sequences}
    spacing = [float(s) for s in nib.load(case_dir / f"{case_dir.name}_t1.nii.gz").header.get_zooms()[:3]]
    folders = _as_mr_study(volumes, spacing, tmp_path / "dicom" / "case_001")
    outputs = tmp_path / "outputs"
    args = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
            "--bundle_root", ".", "--input_dir", str(tmp_path / "dicom"), "--output_dir", str(outputs),
            "--image_pattern", "{case}/{sequence}", "--image_size", "[64,64]", "--dicom_seg", "true"]  # fmt: skip
    result = subprocess.run(args, cwd=bundle, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    (row,) = csv.DictReader(open(next(outputs.glob("*.csv"))))
    assert row["dicom_seg"] == "case_001_seg.dcm", row
    mask = np.asarray(nib.load(outputs / row["mask"]).dataobj)
    assert mask.shape == volumes["t1"].shape and set(np.unique(mask)) <= {0, 1, 2, 4}
    _check_segments(outputs / "case_001_seg.dcm", folders["t1"], mask)
    assert PATIENT.split("^")[0] not in result.stdout + result.stderr + next(outputs.glob("*.csv")).read_text()
