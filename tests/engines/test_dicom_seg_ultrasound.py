"""
DICOM SEG output of the fetal-head bundle for single-frame ultrasound DICOM input (``--dicom_seg true``,
:class:`custom_nets.engines.dicom_seg.DicomSegWriter`).

A real HC18 image is written as an ultrasound DICOM export (YBR_FULL_422 or RGB, region calibration, study and
series UIDs). The SEG is read back with highdicom and pydicom: it must reference the source image (study,
series, SOP instance), carry the metadata's segment, codes and the bundle's name and version, and its one frame
must lie on the source image pixel for pixel. The head-circumference table is keyed by the source's SOP
Instance UID, so that a PACS finds the image each measurement was made on.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import EnsureChannelFirstd, LoadImaged
from PIL import Image
from scipy.ndimage import binary_fill_holes

from _export_helpers import BUNDLES_DIR, copy_bundle, write_initial_checkpoint
from custom_nets.data.image2d import Image2DReader
from image_files import write_dicom_2d

hd = pytest.importorskip("highdicom", reason="the [dicom] extra (highdicom) is not installed")

from custom_nets.engines.dicom_seg import DicomSegWriter  # noqa: E402

BUNDLE = "fetal_head_us_segmentation"
METADATA = json.loads((BUNDLES_DIR / BUNDLE / "configs" / "metadata.json").read_text())
PATIENT = "Sono^Graphy"  # written into every test image: it must reach no file name and no table


@pytest.fixture(scope="module")
def hc18_image(shared_data) -> tuple[np.ndarray, np.ndarray]:
    """A real HC18 image (rows, columns) and its head, filled from the annotated ellipse outline."""
    folder = shared_data / "hc18_subset" / "training_set"
    image = np.asarray(Image.open(folder / "001_HC.png").convert("L"))
    head = binary_fill_holes(np.asarray(Image.open(folder / "001_HC_Annotation.png").convert("L")) > 0)
    assert head.sum() > 1000 and image.shape == head.shape
    return image, head


def _ultrasound_export(path: Path, image: np.ndarray, photometric: str = "YBR_FULL_422", with_study: bool = True) -> Path:
    """``image`` as a single-frame ultrasound DICOM as scanners export it (colour, region calibration, UIDs)."""
    write_dicom_2d(path, np.repeat(image[..., None], 3, axis=-1), us_region_delta_cm=(0.015, 0.015), patient_name=PATIENT, photometric=photometric)
    ds = pydicom.dcmread(path)
    if with_study:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.save_as(path)
    return path


def _loaded(path: Path) -> dict:
    """The image as the bundle's first two transforms load it: ``(channels, x = column, y = row)`` with its metadata."""
    case = LoadImaged("image", reader=Image2DReader())({"image": str(path)})
    return EnsureChannelFirstd("image")(case)


def _seg_frame(seg_path: Path, source: pydicom.Dataset) -> np.ndarray:
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[str(source.SOPInstanceUID)], segment_numbers=[1])
    return pixels[0, :, :, 0]


def test_metadata_codes_are_the_codedict_ones():
    from pydicom.sr.codedict import codes

    (segment,) = METADATA["dicom_seg"]["segments"]
    for key, code in {"category": codes.SCT.AnatomicalStructure, "type": codes.SCT.Head}.items():
        assert (segment[key]["value"], segment[key]["scheme"], segment[key]["meaning"]) == (code.value, code.scheme_designator, code.meaning)
    assert segment["label_value"] == 1 and METADATA["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] == segment["label"]


def test_writer_on_a_real_ultrasound_export_with_a_known_mask(hc18_image, tmp_path):
    """The annotated head of a real image, written as a SEG of its YBR export and read back pixel for pixel."""
    from pydicom.sr.codedict import codes

    image, head = hc18_image
    source_path = _ultrasound_export(tmp_path / "exam_001.dcm", image)
    case = _loaded(source_path)
    assert case["image"].shape[1:3] == (image.shape[1], image.shape[0])  # the reader's (x, y) layout
    case["pred"] = torch.as_tensor(head.T[None].astype(np.float32))

    columns = DicomSegWriter(tmp_path / "out", metadata=METADATA)(case)

    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    assert columns == {"dicom_seg": "exam_001_seg.dcm", "source_sop_instance_uid": source.SOPInstanceUID}
    seg_path = tmp_path / "out" / "exam_001_seg.dcm"
    raw, seg = pydicom.dcmread(seg_path), hd.seg.segread(seg_path)
    assert raw.SOPClassUID == pydicom.uid.SegmentationStorage and raw.SegmentationType == "BINARY"
    assert (seg.StudyInstanceUID, seg.Rows, seg.Columns) == (source.StudyInstanceUID, source.Rows, source.Columns)
    (referenced,) = raw.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert [r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence] == [source.SOPInstanceUID]
    (segment,) = raw.SegmentSequence
    assert segment.SegmentLabel == "fetal head" and segment.SegmentAlgorithmType == "AUTOMATIC"
    description = seg.get_segment_description(1)
    assert (description.segmented_property_category, description.segmented_property_type) == (codes.SCT.AnatomicalStructure, codes.SCT.Head)
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (METADATA["name"], METADATA["version"])
    np.testing.assert_array_equal(_seg_frame(seg_path, source), head)
    assert "FrameOfReferenceUID" not in raw  # an ultrasound image has none: the SEG is tied to its pixels


def test_image_without_study_uids_or_with_a_mask_off_its_pixels(hc18_image, tmp_path, caplog):
    image, head = hc18_image
    case = _loaded(_ultrasound_export(tmp_path / "no_study.dcm", image, photometric="RGB", with_study=False))
    case["pred"] = torch.as_tensor(head.T[None].astype(np.float32))
    writer = DicomSegWriter(tmp_path / "out", metadata=METADATA)
    with caplog.at_level("WARNING"):
        assert writer(case) == {"dicom_seg": "skipped: the DICOM image has no StudyInstanceUID"}
    assert "no_study: no DICOM SEG: the DICOM image has no StudyInstanceUID" in caplog.text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    case = _loaded(_ultrasound_export(tmp_path / "turned.dcm", image))
    case["pred"] = torch.as_tensor(head[None].astype(np.float32))  # (rows, columns): not the reader's layout
    with pytest.raises(ValueError, match=r"turned: mask of shape \[1, 540, 800\] does not lie on the DICOM image's 540 x 800 pixels"):
        writer(case)


@pytest.mark.slow
def test_cli_writes_a_seg_per_dicom_image_and_keys_the_table_by_sop_instance_uid(hc18_image, tmp_path):
    """The real bundle CLI over an ultrasound DICOM and a PNG: a SEG equal to the written mask, the HC row keyed by UID."""
    image, _ = hc18_image
    bundle = copy_bundle(BUNDLE, tmp_path / "bundle")
    write_initial_checkpoint(bundle)
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    source_path = _ultrasound_export(inputs / "exam_002.dcm", image, photometric="RGB")
    Image.fromarray(image).save(inputs / "exam_003.png")
    args = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
            "--bundle_root", ".", "--input_dir", str(inputs), "--output_dir", str(outputs), "--image_size", "64",
            "--postprocess", "none", "--dicom_seg", "true"]  # fmt: skip
    result = subprocess.run(args, cwd=bundle, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    rows = {row["image"]: row for row in csv.DictReader(open(outputs / "head_circumference.csv"))}
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    dicom_row, png_row = rows["exam_002.dcm"], rows["exam_003.png"]
    assert (dicom_row["dicom_seg"], dicom_row["source_sop_instance_uid"]) == ("exam_002_seg.dcm", source.SOPInstanceUID)
    assert (png_row["dicom_seg"], png_row["source_sop_instance_uid"]) == ("skipped: PNG input is not DICOM", "")
    assert float(dicom_row["pixel_size_mm"]) == pytest.approx(0.15)  # from the region calibration
    mask = pydicom.dcmread(outputs / dicom_row["mask"]).pixel_array > 0
    np.testing.assert_array_equal(_seg_frame(outputs / "exam_002_seg.dcm", source), mask)
    assert not any(PATIENT.split("^")[0] in p.name for p in outputs.iterdir())
    assert PATIENT.split("^")[0] not in (outputs / "head_circumference.csv").read_text() + result.stdout + result.stderr
