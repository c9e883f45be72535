"""Volume reading with geometry, mask writing that overlays the input, and one-line errors for bad inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_nets.data.synthetic_dicom import write_dicom_series
from custom_nets.data.volume_io import (
    LoadVolumed,
    VolumeInputError,
    check_volume_input,
    list_volume_inputs,
    read_volume,
    volume_shape,
    write_mask_like,
)

DICOM_CASE = "lung_ct/acrin_flt_breast_001"


def _itk_geometry(path):
    import itk

    image = itk.imread(str(path))
    return (
        tuple(int(s) for s in itk.size(image)),
        np.asarray(image.GetOrigin()),
        np.asarray(image.GetSpacing()),
        itk.array_from_matrix(image.GetDirection()),
    )


def _write_mhd(path: Path, shape=(8, 9, 10)):
    import itk

    image = itk.image_from_array(np.zeros(shape[::-1], dtype=np.int16))
    image.SetOrigin([1.0, 2.0, 3.0])
    itk.imwrite(image, str(path), compression=False)
    return path


@pytest.fixture
def dicom_series(tmp_path):
    """A small synthetic DICOM series: 12 slices of 16x20 pixels, 2.5 mm apart."""
    volume = np.arange(16 * 20 * 12, dtype=np.int16).reshape(16, 20, 12) % 500
    folder = tmp_path / "series_a"
    write_dicom_series(volume, folder, spacing=(0.8, 0.9, 2.5), origin=(-10.0, -20.0, -30.0))
    return folder, volume


def test_dicom_series_matches_its_nifti_conversion(shared_data):
    image = read_volume(shared_data / DICOM_CASE / "dicom")
    reference = nib.load(shared_data / DICOM_CASE / "ct.nii.gz")
    assert tuple(image.shape) == (1, *reference.shape)
    np.testing.assert_allclose(image.meta["original_affine"], reference.affine, atol=1e-4)
    np.testing.assert_array_equal(image[0].numpy(), np.asarray(reference.dataobj, dtype=np.float32))


def test_dicom_mask_overlays_the_nifti_conversion(shared_data, tmp_path):
    image = read_volume(shared_data / DICOM_CASE / "dicom")
    out = write_mask_like((image[0] > 0).numpy(), image, tmp_path / "mask.nii.gz")
    written, reference = nib.load(out), nib.load(shared_data / DICOM_CASE / "ct.nii.gz")
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)
    assert written.get_data_dtype() == np.uint8


def test_dicom_identifiers_stay_out_of_metadata(shared_data):
    import pydicom

    header = pydicom.dcmread(sorted((shared_data / DICOM_CASE / "dicom").glob("1-*.dcm"))[0], stop_before_pixels=True)
    image = read_volume(shared_data / DICOM_CASE / "dicom")
    text = repr(dict(image.meta))
    for identifier in (str(header.PatientName), str(header.PatientID), str(header.SeriesInstanceUID)):
        if identifier:
            assert identifier not in text


def test_nrrd_geometry_equals_itk(shared_data):
    path = shared_data / "lung_ct" / "lung1_image.nrrd"
    size, origin, spacing, direction = _itk_geometry(path)
    image = read_volume(path)
    assert tuple(image.shape[1:]) == size
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.meta["original_affine"]  # RAS -> LPS
    np.testing.assert_allclose(lps_affine[:3, :3], direction @ np.diag(spacing), atol=1e-5)
    np.testing.assert_allclose(lps_affine[:3, 3], origin, atol=1e-4)


def test_nrrd_mask_has_the_input_geometry_in_itk(shared_data, tmp_path):
    path = shared_data / "lung_ct" / "lung1_image.nrrd"
    image = read_volume(path)
    out = write_mask_like((image[0] > -500).numpy(), image, tmp_path / "lung1_seg.nii.gz")
    for got, expected in zip(_itk_geometry(out), _itk_geometry(path)):
        np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(expected, dtype=float), atol=1e-4)


def test_synthetic_dicom_series_geometry(dicom_series):
    folder, volume = dicom_series
    image = read_volume(folder)
    np.testing.assert_array_equal(image[0].numpy(), volume.astype(np.float32))
    expected = np.array([[-0.8, 0, 0, 10.0], [0, -0.9, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.meta["original_affine"], expected, atol=1e-4)
    assert volume_shape(folder) == volume.shape


def test_nifti_mask_keeps_source_qform_and_sform(tmp_path):
    affine = np.array([[0.0, -1.2, 0.0, 30.0], [0.9, 0.0, 0.0, -40.0], [0.0, 0.0, 3.0, 5.0], [0, 0, 0, 1]])
    source = nib.Nifti1Image(np.ones((6, 7, 5), dtype=np.int16), affine)
    source.set_qform(affine, code=1)
    source.set_sform(affine, code=4)
    nib.save(source, tmp_path / "scan.nii.gz")
    image = read_volume(tmp_path / "scan.nii.gz")
    written = nib.load(write_mask_like(np.zeros((6, 7, 5)), image, tmp_path / "out" / "scan_seg.nii.gz"))
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 4


def test_scaled_nifti_is_read_as_float32_with_scaling(tmp_path):
    raw = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    source = nib.Nifti1Image(raw, np.eye(4))
    source.header.set_slope_inter(2.0, -1024.0)
    nib.save(source, tmp_path / "ct.nii.gz")
    image = read_volume(tmp_path / "ct.nii.gz")
    assert image.dtype == torch.float32
    np.testing.assert_allclose(image[0].numpy(), raw * 2.0 - 1024.0)


def test_mask_of_wrong_shape_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    image = read_volume(tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="differs from the source volume"):
        write_mask_like(np.zeros((4, 4, 3)), image, tmp_path / "m.nii.gz")
    assert not (tmp_path / "m.nii.gz").exists()


def test_load_volumed_stacks_channels_in_order(tmp_path):
    for i, name in enumerate(("flair", "t1ce")):
        nib.save(nib.Nifti1Image(np.full((5, 6, 7), i + 1, dtype=np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    data = LoadVolumed(keys="image")({"case": "p1", "image": [str(tmp_path / "flair.nii.gz"), str(tmp_path / "t1ce.nii.gz")]})
    assert tuple(data["image"].shape) == (2, 5, 6, 7)
    assert data["image"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert data["image"].meta["case"] == "p1"


def test_list_volume_inputs_skips_data_files_and_hidden_entries(tmp_path, dicom_series):
    _write_mhd(tmp_path / "scan.mhd")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), dtype=np.float32), np.eye(4)), tmp_path / "b.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.nii.gz").write_text("x")
    names = [p.name for p in list_volume_inputs(tmp_path)]
    assert names == ["b.nii.gz", "scan.mhd", "series_a"]


# ----- bad inputs: a one-line VolumeInputError naming the case -----


def _two_series(folder: Path) -> Path:
    write_dicom_series(np.zeros((8, 8, 4), dtype=np.int16), folder, series_uid="1.2.3.4.1")
    write_dicom_series(np.zeros((8, 8, 3), dtype=np.int16), folder / "tmp", series_uid="1.2.3.4.2")
    for i, f in enumerate(sorted((folder / "tmp").iterdir())):
        shutil.move(f, folder / f"other_{i}.dcm")
    (folder / "tmp").rmdir()
    return folder


def _missing_slice(folder: Path) -> Path:
    write_dicom_series(np.zeros((8, 8, 6), dtype=np.int16), folder)
    (folder / "slice_0003.dcm").unlink()
    return folder


def _mhd_without_raw(folder: Path) -> Path:
    folder.mkdir()
    path = _write_mhd(folder / "case_mhd.mhd")
    path.with_suffix(".raw").unlink()
    return path


def _truncated_raw(folder: Path) -> Path:
    folder.mkdir()
    path = _write_mhd(folder / "case_short.mhd")
    raw = path.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:100])
    return path


def _nan_voxels(folder: Path) -> Path:
    folder.mkdir()
    data = np.zeros((4, 4, 4), dtype=np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), folder / "case_nan.nii.gz")
    return folder / "case_nan.nii.gz"


def _unsupported(folder: Path) -> Path:
    folder.mkdir()
    (folder / "case_txt.txt").write_text("not an image")
    return folder / "case_txt.txt"


def _no_dicom(folder: Path) -> Path:
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here")
    return folder


@pytest.mark.parametrize(
    "make, case, message",
    [
        (_two_series, "case_two_series", "2 DICOM image series"),
        (_missing_slice, "case_gap", "missing slice"),
        (_mhd_without_raw, "case_mhd", "does not exist"),
        (_truncated_raw, "case_short", "truncated"),
        (_nan_voxels, "case_nan", "NaN"),
        (_unsupported, "case_txt.txt", "unsupported volume format"),
        (_no_dicom, "case_empty", "no DICOM image slices"),
    ],
)
def test_bad_input_raises_one_line_error_naming_the_case(tmp_path, make, case, message):
    path = make(tmp_path / case)
    with pytest.raises(VolumeInputError, match=message) as info:
        read_volume(path)
    text = str(info.value)
    assert "\n" not in text
    assert case in text


def test_sequences_of_different_shapes_raise(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), dtype=np.float32), np.eye(4)), tmp_path / "flair.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 8), dtype=np.float32), np.eye(4)), tmp_path / "t1ce.nii.gz")
    with pytest.raises(VolumeInputError, match="different shapes") as info:
        read_volume([tmp_path / "flair.nii.gz", tmp_path / "t1ce.nii.gz"], case="patient_07")
    assert str(info.value).startswith("patient_07:")


def test_header_check_accepts_a_good_series(dicom_series):
    folder, _ = dicom_series
    assert check_volume_input(folder) == "dicom"
