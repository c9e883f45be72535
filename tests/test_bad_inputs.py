"""
Bad inputs across the three bundles, through the library functions the bundles call (fast): each case
asserts the one-line message (the file and the problem) or the documented handling of docs/bad_inputs.md.
The same cases through the real ``python -m monai.bundle`` CLI are in ``test_bad_inputs_cli.py``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from custom_nets.atomic_write import atomic_path
from custom_nets.data import brats, hc18, synthetic_brats
from custom_nets.data.brats import BraTSCaseError, ConvertBraTSLabelsToRegionsd
from custom_nets.data.hc18 import IMAGE_FOLDER, HC18DataError
from custom_nets.data.image2d import Image2DReader, check_image_2d
from custom_nets.data.synthetic_dicom import write_dicom_series
from custom_nets.data.synthetic_hc18 import generate
from custom_nets.data.volume_io import VolumeInputError, list_volume_inputs, read_volume
from custom_nets.engines.folder_inference import FolderInference, check_output_dir, list_images
from custom_nets.errors import InputError
from custom_nets.metrics.head_circumference import HeadCircumference
from image_files import write_dicom_2d, write_nifti_2d, write_png

RNG = np.random.default_rng(0)
PICTURE = (RNG.random((48, 64)) * 255).astype(np.uint8)
VOLUME = (RNG.random((16, 16, 6)) * 1400 - 1000).astype(np.float32)
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _one_line_naming(message: str, name: str, phrase: str) -> None:
    assert "\n" not in message, message
    assert name in message, f"{name!r} not named in: {message}"
    assert phrase in message, f"{phrase!r} not in: {message}"


# ----- 2D images (fetal head bundle): custom_nets.data.image2d.check_image_2d ---------------------------


def _truncated_png(folder: Path) -> Path:
    data = write_png(folder / "trunc.png", PICTURE).read_bytes()
    (folder / "trunc.png").write_bytes(data[: len(data) // 2])
    return folder / "trunc.png"


def _corrupt_png(folder: Path) -> Path:
    (folder / "corrupt.png").write_bytes(os.urandom(400))
    return folder / "corrupt.png"


def _corrupt_dicom_2d(folder: Path) -> Path:
    data = write_dicom_2d(folder / "us.dcm", PICTURE, pixel_spacing=(0.2, 0.2)).read_bytes()
    (folder / "us.dcm").write_bytes(data[:300])
    return folder / "us.dcm"


def _volume_as_2d(folder: Path) -> Path:
    nib.save(nib.Nifti1Image(VOLUME, AFFINE), folder / "ct.nii.gz")
    return folder / "ct.nii.gz"


def _nan_tiff(folder: Path) -> Path:
    image = PICTURE.astype(np.float32)
    image[3, 4] = np.nan
    Image.fromarray(image).save(folder / "nan.tif")
    return folder / "nan.tif"


def _inf_nifti_2d(folder: Path) -> Path:
    image = PICTURE.astype(np.float32)
    image[0, 0] = np.inf
    return write_nifti_2d(folder / "inf.nii.gz", image)


def _palette_png(folder: Path) -> Path:
    Image.fromarray(PICTURE).convert("P").save(folder / "palette.png")
    return folder / "palette.png"


def _multipage_tiff(folder: Path) -> Path:
    pages = [Image.fromarray(PICTURE), Image.fromarray(PICTURE[::-1].copy())]
    pages[0].save(folder / "cine.tif", save_all=True, append_images=pages[1:])
    return folder / "cine.tif"


def _text_with_image_name(folder: Path) -> Path:
    (folder / "notes.png").write_text("this is not a picture")
    return folder / "notes.png"


def _palette_dicom_without_table(folder: Path) -> Path:
    return write_dicom_2d(folder / "palette.dcm", PICTURE, photometric="PALETTE COLOR", colour_table=False)


def _nifti_scale_overflow(folder: Path) -> Path:
    data = np.zeros((48, 64), np.float32)
    data[10:30, 20:40] = 255
    image = nib.Nifti1Image(data, np.diag([0.2, 0.2, 1.0, 1.0]))
    image.header.set_slope_inter(1e38, 0.0)  # 255 x 1e38 is finite in float64, infinite in float32
    nib.save(image, folder / "slope.nii.gz")
    return folder / "slope.nii.gz"


def _float_range_overflow(folder: Path) -> Path:
    image = np.where(PICTURE > 127, 3e38, -3e38).astype(np.float32)  # each value fits float32, their range does not
    Image.fromarray(image).save(folder / "range.tif")
    return folder / "range.tif"


def _nifti_nan_pixel_size(folder: Path) -> Path:
    image = nib.Nifti1Image(PICTURE.astype(np.float32), None)
    image.header.set_zooms((float("nan"), 0.2))
    nib.save(image, folder / "nan_pixdim.nii.gz")
    return folder / "nan_pixdim.nii.gz"


def _dicom_2d_retagged(folder: Path, name: str, **tags) -> Path:
    """A 2D DICOM written correctly, then given header values a broken export would have."""
    import pydicom

    path = write_dicom_2d(folder / name, PICTURE)
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def _cut_picture(folder: Path, name: str) -> Path:
    """A picture (JPEG, BMP, TIFF) cut in half, as an interrupted copy leaves it."""
    Image.fromarray(PICTURE).save(folder / name)
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _empty(folder: Path, name: str) -> Path:
    (folder / name).write_bytes(b"")
    return folder / name


@pytest.mark.parametrize(
    "make, phrase",
    [
        (_truncated_png, "cannot read the image (OSError: Truncated File Read"),
        (_corrupt_png, "cannot read the image (UnidentifiedImageError"),
        (_text_with_image_name, "cannot read the image"),
        (_corrupt_dicom_2d, "cannot read the DICOM image"),
        (_volume_as_2d, "is a 3D volume of shape 16x16x6; this bundle segments 2D images"),
        (_nan_tiff, "1 pixel(s) are NaN or infinite"),
        (_inf_nifti_2d, "1 pixel(s) are NaN or infinite"),
        (_palette_png, "palette (indexed-colour) image"),
        (_multipage_tiff, "2 frames or pages in one file"),
        (lambda folder: folder / "missing.png", "no such file"),
        (_palette_dicom_without_table, "PALETTE COLOR DICOM without its colour table"),
        (lambda folder: write_png(folder / "dot.png", PICTURE[:1, :1]), "image of 1x1 pixels is too small (at least 16 pixels a side)"),
        (lambda folder: write_png(folder / "strip.png", np.zeros((1, 4000))), "image of 1x4000 pixels is too small"),
        (_nifti_scale_overflow, "pixel values from 0 to 2.55e+40 overflow the 32-bit floats"),
        (_float_range_overflow, "pixel values from -3e+38 to 3e+38 overflow the 32-bit floats"),
        (_nifti_nan_pixel_size, "the NIfTI header's geometry (pixdim, qform or sform) is NaN or infinite"),
        (lambda folder: _dicom_2d_retagged(folder, "hsv.dcm", PhotometricInterpretation="HSV"),
         "photometric interpretation HSV is not supported"),
        (lambda folder: _dicom_2d_retagged(folder, "bits.dcm", BitsStored=20), "cannot read the DICOM image (ValueError: A (0028,0101) 'Bits Stored'"),
        (lambda folder: _pil(folder / "cmyk.tif", Image.fromarray(np.stack([PICTURE] * 4, -1), "CMYK")), "image mode CMYK is not supported"),
        (lambda folder: _empty(folder, "empty.png"), "cannot read the image (UnidentifiedImageError"),
        (lambda folder: _empty(folder, "empty.dcm"), "cannot read the DICOM image (InvalidDicomError"),
        (lambda folder: _cut_picture(folder, "cut.jpg"), "cannot read the image (OSError: image file is truncated"),
        (lambda folder: _cut_picture(folder, "cut.bmp"), "cannot read the image (OSError: image file is truncated"),
        (lambda folder: _cut_picture(folder, "cut.tif"), "cannot read the image (OSError: image file is truncated"),
    ],
    ids=["truncated-png", "corrupt-png", "text-named-png", "corrupt-dicom", "3d-to-2d-bundle", "nan", "inf",
         "palette", "multi-page", "missing", "palette-dicom-without-table", "1x1", "1x4000-strip", "scl-slope-overflow",
         "float32-range-overflow", "nan-pixdim", "dicom-hsv", "dicom-bits-stored-over-allocated", "cmyk-tiff",
         "empty-png", "empty-dicom", "truncated-jpeg", "truncated-bmp", "truncated-tiff"],  # fmt: skip
)
def test_bad_2d_image_is_one_line_naming_the_file(tmp_path, make, phrase):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        check_image_2d(path)
    _one_line_naming(str(info.value), str(path), phrase)


def _pil(path: Path, image: Image.Image) -> Path:
    image.save(path)
    return path


@pytest.mark.parametrize(
    "make",
    [
        lambda f: write_png(f / "gray.png", PICTURE),
        lambda f: _pil(f / "gray alpha.png", Image.fromarray(np.stack([PICTURE, PICTURE], -1), mode="LA")),
        lambda f: _pil(f / "rgba.png", Image.fromarray(np.dstack([PICTURE] * 3 + [np.full_like(PICTURE, 255)]), mode="RGBA")),
        lambda f: _pil(f / "sixteen.png", Image.fromarray(PICTURE.astype(np.uint16) * 200)),
        lambda f: write_nifti_2d(f / "slice.nii.gz", PICTURE[..., None]),
        lambda f: write_png(f / "Patiënt data scan 01.png", PICTURE),
    ],
    ids=["gray", "gray-alpha", "rgba", "16-bit", "nifti-HxWx1", "spaces-and-non-ascii"],
)
def test_usable_2d_image_passes_the_check(tmp_path, make):
    path = make(tmp_path)
    assert check_image_2d(path) == path


# pixel pairs along a row share one colour, so YBR_FULL_422 (one Cb/Cr pair per two pixels) loses nothing
COLOUR = np.repeat((RNG.random((48, 32, 3)) * 255).astype(np.uint8), 2, axis=1)


@pytest.mark.parametrize(
    "photometric, planar, tolerance",
    [("RGB", 0, 0), ("RGB", 1, 0), ("YBR_FULL", 0, 1), ("YBR_FULL_422", 0, 1), ("PALETTE COLOR", 0, 0), ("MONOCHROME1", 0, 0)],
    ids=["rgb", "rgb-planar-1", "ybr-full", "ybr-full-422", "palette-with-table", "monochrome1"],
)
def test_ultrasound_dicom_reads_as_the_png_of_its_picture(tmp_path, photometric, planar, tolerance):
    """What the 2D bundle's LoadImaged reads from each DICOM export: the PNG of the same picture, pixel size in the affine."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    picture = COLOUR if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") else PICTURE
    dicom = write_dicom_2d(tmp_path / "us.dcm", picture, pixel_spacing=(0.2, 0.3), photometric=photometric, planar_configuration=planar)
    assert check_image_2d(dicom) == dicom
    load = Compose([LoadImaged("image", reader=Image2DReader()), EnsureChannelFirstd("image")])
    image, expected = (load({"image": str(p)})["image"] for p in (dicom, write_png(tmp_path / "us.png", picture)))
    assert image.shape[-1] == 1  # one slice, as ITK's reader gave a DICOM (the bundle drops the axis)
    image = image[..., 0]
    assert image.shape[1:] == expected.shape[1:] == (64, 48)  # MONAI's 2D (x = column, y = row)
    gray, expected_gray = image[:3].mean(0), expected[:3].mean(0)  # as the bundle turns colour into gray
    assert float((gray - expected_gray).abs().max()) <= tolerance
    assert np.allclose(np.abs(np.diag(np.asarray(image.meta["affine"]))[:2]), (0.3, 0.2))  # x = column spacing


def _jpeg_with_orientation(path: Path, picture: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    Image.fromarray(picture).save(path, exif=exif, quality=95)
    return path


@pytest.mark.parametrize(
    "orientation, displayed",
    [(6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)), (3, lambda a: np.rot90(a, 2)), (2, np.fliplr)],
    ids=["6-rotate-90-cw", "8-rotate-90-ccw", "3-rotate-180", "2-mirror"],
)
def test_jpeg_exif_orientation_reads_as_displayed(tmp_path, orientation, displayed):
    """A JPEG stored sideways with an EXIF orientation tag is read as a viewer shows it, not as stored."""
    from monai.transforms import LoadImage

    jpeg = _jpeg_with_orientation(tmp_path / "phone.jpg", PICTURE, orientation)
    assert check_image_2d(jpeg) == jpeg
    stored = np.asarray(Image.open(jpeg))  # the decoded pixels in stored order
    image = LoadImage(image_only=True, reader=Image2DReader())(str(jpeg))
    np.testing.assert_array_equal(np.asarray(image).T, displayed(stored))  # MONAI's 2D arrays are (x, y)


def _zero_pixdim_nifti(path: Path) -> Path:
    image = nib.Nifti1Image(PICTURE.astype(np.float32), None)
    image.header.set_zooms((0.0, 0.0))  # stored as 0; nibabel reads it back as 1 mm
    nib.save(image, path)
    return path


def test_nifti_pixel_size_0_gets_no_head_circumference(tmp_path):
    """nibabel reads pixdim 0 as 1 mm: the HC is refused with a note, never guessed; a pixel-size CSV row still measures it."""
    from monai.transforms import EnsureChannelFirst, LoadImage

    path = _zero_pixdim_nifti(tmp_path / "zero.nii.gz")
    image = EnsureChannelFirst()(LoadImage(image_only=True)(str(path)))
    pred = torch.zeros_like(image)
    pred[:, 10:38, 12:50] = 1
    row = HeadCircumference()({"image": image, "pred": pred})
    assert row["hc_mm"] is None and row["pixel_size_mm"] is None
    assert row["hc_note"].startswith("invalid pixel size 0 x 0 mm in the NIfTI header (pixdim)"), row
    measured = HeadCircumference(pixel_sizes={"zero.nii.gz": 0.1})({"image": image, "pred": pred})
    assert measured["pixel_size_mm"] == pytest.approx(0.1) and measured["hc_mm"] > 0


def test_dicom_without_pixel_size_gets_no_head_circumference(tmp_path):
    """Its affine says 1 mm (MONAI's readers put 1 mm there): the header decides, and it has no pixel size."""
    from monai.transforms import EnsureChannelFirst, LoadImage

    path = write_dicom_2d(tmp_path / "us.dcm", PICTURE)
    image = EnsureChannelFirst()(LoadImage(image_only=True)(str(path)))[..., 0]
    pred = torch.zeros_like(image)
    pred[:, 10:50, 12:38] = 1
    row = HeadCircumference()({"image": image, "pred": pred})
    assert row["hc_mm"] is None and row["hc_note"].startswith("no pixel size"), row


# ----- 3D volumes (brain MRI and lung CT bundles): custom_nets.data.volume_io.read_volume ---------------


def _nifti(path: Path, data: np.ndarray = VOLUME, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _truncated_nifti_gz(folder: Path) -> Path:
    data = _nifti(folder / "trunc.nii.gz").read_bytes()
    (folder / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    return folder / "trunc.nii.gz"


def _truncated_nifti(folder: Path) -> Path:
    data = _nifti(folder / "short.nii").read_bytes()
    (folder / "short.nii").write_bytes(data[: len(data) // 2])
    return folder / "short.nii"


def _corrupt_nifti(folder: Path) -> Path:
    (folder / "corrupt.nii.gz").write_bytes(os.urandom(300))
    return folder / "corrupt.nii.gz"


def _nifti_2d(folder: Path) -> Path:
    return _nifti(folder / "flat.nii.gz", VOLUME[..., 0])


def _nifti_two_volumes(folder: Path) -> Path:
    return _nifti(folder / "twochan.nii.gz", np.stack([VOLUME, VOLUME], -1))


def _nifti_nan(folder: Path) -> Path:
    data = VOLUME.copy()
    data[2, 3, 4] = np.nan
    return _nifti(folder / "nan.nii.gz", data)


def _nifti_inf(folder: Path) -> Path:
    data = VOLUME.copy()
    data[0, 0, 0] = -np.inf
    return _nifti(folder / "inf.nii.gz", data)


def _dicom_series(folder: Path, depth: int = 6, uid: str | None = None) -> Path:
    write_dicom_series(VOLUME[..., :depth].astype(np.int16), folder, spacing=(0.8, 0.8, 2.5), series_uid=uid)
    return folder


def _dicom_corrupt_slice(folder: Path) -> Path:
    _dicom_series(folder / "corrupt_slice")
    (folder / "corrupt_slice" / "slice_0002.dcm").write_bytes(os.urandom(200))
    return folder / "corrupt_slice"


def _dicom_truncated_slice(folder: Path) -> Path:
    _dicom_series(folder / "short_slice")
    path = folder / "short_slice" / "slice_0003.dcm"
    path.write_bytes(path.read_bytes()[:-300])
    return folder / "short_slice"


def _dicom_two_series(folder: Path) -> Path:
    _dicom_series(folder / "two_series", uid="1.2.826.0.1.3680043.8.498.1")
    _dicom_series(folder / "other", depth=3, uid="1.2.826.0.1.3680043.8.498.2")
    for i, path in enumerate(sorted((folder / "other").iterdir())):
        shutil.move(path, folder / "two_series" / f"other_{i}.dcm")
    return folder / "two_series"


def _dicom_one_slice_of_other_pixel_spacing(folder: Path) -> Path:
    import pydicom

    _dicom_series(folder / "mixed_spacing")
    path = folder / "mixed_spacing" / "slice_0003.dcm"
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [0.6, 0.6]
    ds.save_as(path)
    return folder / "mixed_spacing"


def _nifti_zero_affine(folder: Path) -> Path:
    """sform and qform both zero (nibabel then reads pixdim 0): every voxel at the origin."""
    header = nib.Nifti1Header()
    header.set_data_shape(VOLUME.shape)
    header.set_data_dtype(VOLUME.dtype)
    header["pixdim"][1:4] = 0
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = 0
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(VOLUME, None, header=header), folder / "zero.nii.gz")
    return folder / "zero.nii.gz"


def _dicom_single_slice(folder: Path) -> Path:
    return _dicom_series(folder / "one_slice", depth=1)


def _truncated(path: Path, keep: float = 0.5) -> Path:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return path


def _nrrd_truncated_raw(folder: Path) -> Path:
    return _truncated(_itk_write(folder / "raw.nrrd"))


def _nrrd_truncated_gzip(folder: Path) -> Path:
    import itk

    path = folder / "gz.nrrd"
    itk.imwrite(itk.image_from_array(np.ascontiguousarray(VOLUME.T)), os.fspath(path), compression=True)
    return _truncated(path, 0.7)


def _nhdr_truncated_data(folder: Path) -> Path:
    header = _itk_write(folder / "det.nhdr")
    _truncated(next(p for p in folder.iterdir() if p.name.startswith("det.") and p.suffix != ".nhdr"))
    return header


def _nrrd_edited(folder: Path, name: str, old: bytes, new: bytes) -> Path:
    path = _itk_write(folder / name)
    path.write_bytes(path.read_bytes().replace(old, new, 1))
    return path


def _nhdr_without_data(folder: Path) -> Path:
    header = _itk_write(folder / "nodata.nhdr")
    for data in folder.glob("nodata.*"):
        if data.suffix != ".nhdr":
            data.unlink()
    return header


def _metaimage_data(folder: Path, problem: str) -> Path:
    header = _itk_write(folder / f"{problem}.mhd")
    data = folder / f"{problem}.raw"
    if problem == "missing":
        data.unlink()
    else:
        _truncated(data)
    return header


def _dicom_retagged_slice(folder: Path, name: str, edit) -> Path:
    """A DICOM series whose slice_0001.dcm a broken export changed: ``edit(dataset)``."""
    import pydicom

    series = _dicom_series(folder / name)
    path = series / "slice_0001.dcm"
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)
    return series


def _cut_rows(ds) -> None:
    ds.PixelData = ds.pixel_array[:8].tobytes()
    ds.Rows = 8


def _dicom_missing_slice(folder: Path) -> Path:
    series = _dicom_series(folder / "gap")
    (series / "slice_0002.dcm").unlink()
    return series


def _dicom_duplicate_slice(folder: Path) -> Path:
    series = _dicom_series(folder / "dup")
    shutil.copy(series / "slice_0001.dcm", series / "slice_0001 copy.dcm")
    return series


@pytest.mark.parametrize(
    "make, name, phrase",
    [
        (_nrrd_truncated_raw, "raw.nrrd", "NRRD data of raw.nrrd is truncated ("),
        (_nrrd_truncated_gzip, "gz.nrrd", "NRRD data of gz.nrrd is truncated (the gzip stream holds"),
        (_nhdr_truncated_data, "det.nhdr", "NRRD data of det.nhdr is truncated ("),
        (_truncated_nifti_gz, "trunc.nii.gz", "cannot read trunc.nii.gz: EOFError"),
        (_truncated_nifti, "short.nii", "cannot read short.nii"),
        (_corrupt_nifti, "corrupt.nii.gz", "cannot read the header of corrupt.nii.gz"),
        (_nifti_2d, "flat.nii.gz", "is a 2D image (16x16); this bundle segments 3D volumes"),
        (_nifti_two_volumes, "twochan.nii.gz", "holds 2 volumes or channels (shape 16x16x6x2)"),
        (_nifti_nan, "nan.nii.gz", "1 voxel(s) are NaN or infinite"),
        (_nifti_inf, "inf.nii.gz", "1 voxel(s) are NaN or infinite"),
        (_dicom_corrupt_slice, "slice_0002.dcm", "corrupt DICOM file slice_0002.dcm (no DICOM header)"),
        (_dicom_truncated_slice, "slice_0003.dcm", "truncated DICOM slice(s) slice_0003.dcm"),
        (_dicom_two_series, "two_series", "2 DICOM image series in one folder (6, 3 slices)"),
        (_dicom_single_slice, "one_slice", "has a single slice; a volume needs at least two"),
        (_dicom_one_slice_of_other_pixel_spacing, "mixed_spacing",
         "DICOM slice slice_0003.dcm has pixel spacing 0.6 x 0.6 mm, the series 0.8 x 0.8 mm"),
        (_nifti_zero_affine, "zero.nii.gz", "the voxel-to-world matrix (affine) of zero.nii.gz is zero or singular"),
        (lambda folder: _empty(folder, "empty.nii.gz"), "empty.nii.gz", "cannot read the header of empty.nii.gz: ImageFileError: Empty file"),
        (_nhdr_without_data, "nodata.nhdr", "NRRD header nodata.nhdr points to data file nodata.raw, which does not exist"),
        (lambda folder: _nrrd_edited(folder, "type.nrrd", b"type: float", b"type: quux"), "type.nrrd",
         "NRRD header of type.nrrd has an unknown type 'quux'"),
        (lambda folder: _nrrd_edited(folder, "sizes.nrrd", b"sizes:", b"extent:"), "sizes.nrrd", "NRRD header of sizes.nrrd has no 'sizes' field"),
        (lambda folder: _metaimage_data(folder, "missing"), "missing.mhd", "MetaImage header missing.mhd points to data file missing.raw, which does not exist"),
        (lambda folder: _metaimage_data(folder, "cut"), "cut.raw", "MetaImage data file cut.raw is truncated (3072 bytes, header needs 6144)"),
        (_dicom_missing_slice, "gap", "inconsistent DICOM slice spacing (gaps from 2.5 to 5 mm, median 2.5 mm): a missing slice?"),
        (_dicom_duplicate_slice, "dup", "two DICOM slices at the same position (duplicate slice)"),
        (lambda folder: _dicom_retagged_slice(folder, "nopos", lambda ds: delattr(ds, "ImagePositionPatient")), "nopos",
         "DICOM slice(s) slice_0001.dcm of the series have no ImagePositionPatient or ImageOrientationPatient"),
        (lambda folder: _dicom_retagged_slice(folder, "nospacing", lambda ds: delattr(ds, "PixelSpacing")), "nospacing",
         "DICOM slice slice_0001.dcm has no usable pixel spacing (none)"),
        (lambda folder: _dicom_retagged_slice(folder, "rows", _cut_rows), "rows", "DICOM slices of different sizes ((16, 16) and (8, 16))"),
    ],
    ids=["truncated-nrrd", "truncated-nrrd-gzip", "truncated-nhdr-data", "truncated-nii-gz", "truncated-nii", "corrupt-nifti", "2d-to-3d-bundle", "two-channels", "nan", "inf",
         "dicom-corrupt-slice", "dicom-truncated-slice", "dicom-two-series", "dicom-single-slice",
         "dicom-mixed-pixel-spacing", "nifti-zero-affine", "empty-nifti", "nhdr-without-data", "nrrd-unknown-type",
         "nrrd-without-sizes", "metaimage-without-raw", "metaimage-truncated-raw", "dicom-missing-slice",
         "dicom-duplicate-slice", "dicom-slice-without-position", "dicom-slice-without-pixel-spacing",
         "dicom-slice-of-other-size"],  # fmt: skip
)
def test_bad_volume_is_one_line_naming_the_file(tmp_path, make, name, phrase):
    path = make(tmp_path)
    with pytest.raises(VolumeInputError) as info:
        read_volume(path)
    _one_line_naming(str(info.value), name, phrase)


@pytest.mark.parametrize(
    "make, suffix",
    [
        (lambda p: _nifti(p.with_suffix(".nii.gz")), ".nii.gz"),
        (lambda p: _itk_write(p.with_suffix(".nrrd")), ".nrrd"),
        (lambda p: _itk_write(p.with_suffix(".mhd")), ".mhd"),
        (lambda p: _dicom_series(p), ""),
    ],
    ids=["nifti", "nrrd", "metaimage", "dicom-folder"],
)
def test_path_with_spaces_and_non_ascii_reads(tmp_path, make, suffix):
    folder = tmp_path / "Patiënt data"
    folder.mkdir()
    path = make(folder / "scän 01")
    image = read_volume(path)
    assert tuple(image.shape[1:]) == VOLUME.shape and image.meta["case"] == "scän 01"


def _itk_write(path: Path) -> Path:
    import itk

    itk.imwrite(itk.image_from_array(np.ascontiguousarray(VOLUME.T)), os.fspath(path), compression=False)
    return path


@pytest.mark.parametrize("suffix", [".mhd", ".mha"])
@pytest.mark.parametrize("absolute", [False, True], ids=["dot-dot", "absolute"])
def test_metaimage_data_file_outside_its_folder_is_refused(tmp_path, suffix, absolute):
    """A header from elsewhere must not make the bundle read a file outside the input folder (path escape)."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(np.ascontiguousarray(VOLUME.T).tobytes())  # readable data: only the path is wrong
    inputs = tmp_path / "in"
    inputs.mkdir()
    data_file = str(secret) if absolute else "../secret.raw"
    header = inputs / f"scan{suffix}"
    header.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = 16 16 6\nElementType = MET_FLOAT\nElementDataFile = {data_file}\n")
    with pytest.raises(VolumeInputError) as info:
        read_volume(header)
    _one_line_naming(str(info.value), f"scan{suffix}", f"points to data file {data_file} outside its folder")


def test_channels_on_different_grids_are_refused(tmp_path):
    flair = _nifti(tmp_path / "flair.nii.gz")
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0  # the second sequence is 2 mm off: not co-registered
    t1ce = _nifti(tmp_path / "t1ce.nii.gz", affine=shifted)
    with pytest.raises(VolumeInputError) as info:
        read_volume([flair, t1ce], case="patient_07")
    _one_line_naming(str(info.value), "t1ce.nii.gz", "is not on the voxel grid of flair.nii.gz")
    assert str(info.value).startswith("patient_07:")


# ----- training/evaluation datalists: labels, masks, sequences -----------------------------------------


@pytest.fixture(scope="module")
def brats_source(tmp_path_factory) -> Path:
    return Path(synthetic_brats.generate(str(tmp_path_factory.mktemp("brats")), num_cases=3, shape=(16, 16, 8), seed=3))


@pytest.fixture
def brats_copy(brats_source, tmp_path) -> Path:
    return Path(shutil.copytree(brats_source, tmp_path / "brats"))


def _relabel(dataset: Path, change) -> Path:
    path = dataset / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz"
    image = nib.load(path)
    data, affine = change(np.asarray(image.dataobj).astype(np.float32), image.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _with_value(value):
    def change(data, affine):
        data[0, 0, 0] = value
        return data, affine

    return change


def _shift(data, affine):
    affine[2, 3] += 1.0
    return data, affine


@pytest.mark.parametrize(
    "change, phrase",
    [
        (_with_value(3), "has label values [3] outside brats2020 (allowed [0, 1, 2, 4])"),
        (_with_value(7), "has label values [7] outside brats2020"),
        (_with_value(0.5), "has non-integer label values (e.g. 0.5)"),
        (lambda data, affine: (data[:, :, :-1], affine), "volumes of different shapes"),
        (_shift, "BraTS20_Training_002_seg.nii.gz is not on the voxel grid of BraTS20_Training_002_t1.nii.gz"),
    ],
    ids=["label-3-under-brats2020", "label-7", "interpolated-label", "label-shape-mismatch", "label-affine-mismatch"],
)
def test_bad_brats_label_stops_the_datalist_naming_the_file(brats_copy, tmp_path, change, phrase):
    _relabel(brats_copy, change)
    datalist = tmp_path / "datalist.json"
    with pytest.raises(InputError) as info:
        brats.datalist(brats_copy, datalist, label_convention="brats2020")
    _one_line_naming(str(info.value), "BraTS20_Training_002_seg.nii.gz", phrase)
    assert str(info.value).startswith("BraTS20_Training_002:")
    assert not datalist.exists()


def test_brats_case_missing_a_sequence_stops_the_datalist(brats_copy, tmp_path):
    (brats_copy / "BraTS20_Training_003" / "BraTS20_Training_003_flair.nii.gz").unlink()
    with pytest.raises(BraTSCaseError) as info:
        brats.datalist(brats_copy, tmp_path / "datalist.json")
    _one_line_naming(str(info.value), "BraTS20_Training_003", "missing MRI sequence(s) flair")
    assert not (tmp_path / "datalist.json").exists()


def test_brats_empty_label_is_allowed(brats_copy, tmp_path):
    _relabel(brats_copy, lambda data, affine: (np.zeros_like(data), affine))  # a case without tumour
    datalist = brats.datalist(brats_copy, tmp_path / "datalist.json", label_convention="brats2020")
    assert sum(len(part) for part in datalist.values()) == 3


def test_label_values_refused_at_training_time_name_the_label_file(brats_source):
    label_path = Path(brats_source) / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz"
    label = read_volume(label_path, case="BraTS20_Training_001")
    label[0, 0, 0, 0] = 3
    with pytest.raises(BraTSCaseError) as info:
        ConvertBraTSLabelsToRegionsd(keys="label", convention="brats2020")({"label": label})
    _one_line_naming(str(info.value), "BraTS20_Training_001_seg.nii.gz", "label values [3] are not part of brats2020")


@pytest.fixture(scope="module")
def hc18_source(tmp_path_factory) -> Path:
    return Path(generate(str(tmp_path_factory.mktemp("hc18") / "synthetic"), num_images=4, height=48, width=64, seed=1))


def test_hc18_empty_annotation_is_refused_naming_the_file(hc18_source, tmp_path):
    dataset = Path(shutil.copytree(hc18_source, tmp_path / "hc18"))
    annotation = dataset / IMAGE_FOLDER / "002_HC_Annotation.png"
    write_png(annotation, np.zeros((48, 64), np.uint8))
    with pytest.raises(HC18DataError) as info:
        hc18.datalist(dataset, tmp_path / "datalist.json")
    _one_line_naming(str(info.value), str(annotation), "the annotation is empty (no head drawn)")
    assert not (tmp_path / "datalist.json").exists()


def test_hc18_annotation_with_other_values_counts_every_non_zero_pixel_as_head(hc18_source, tmp_path):
    dataset = Path(shutil.copytree(hc18_source, tmp_path / "hc18"))
    annotation = dataset / IMAGE_FOLDER / "002_HC_Annotation.png"
    values = np.asarray(Image.open(annotation))
    graded = np.where(values > 0, 128, 0).astype(np.uint8)
    graded.flat[np.flatnonzero(values > 0)[::2]] = 7  # anti-aliased or multi-valued annotation
    write_png(annotation, graded)
    datalist = hc18.datalist(dataset, tmp_path / "datalist.json")
    item = next(i for part in datalist.values() for i in part if i["image"].endswith("002_HC.png"))
    assert np.array_equal(np.asarray(Image.open(item["label"])), (values > 0).astype(np.uint8))


# ----- batch inference engine: output folder, non-image files, constant images, partial files ----------


class _CountingNet(torch.nn.Module):
    """Two-class logits, bright pixels foreground; counts its calls (the network is not what is tested here)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20


def _png_runner(inputs: Path, out: Path, network=None, case_outputs=None, input_dir=None) -> FolderInference:
    from monai.transforms import AsDiscreted, Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

    from custom_nets.engines.case_writers import MaskWriter

    return FolderInference(
        inputs=list_images(inputs),
        network=network or _CountingNet(),
        preprocessing=Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScaleIntensityd("image")]),
        postprocessing=AsDiscreted("pred", argmax=True),
        case_outputs=case_outputs if case_outputs is not None else [MaskWriter(out)],
        results_csv=out / "results.csv",
        input_check=check_image_2d,
        exit_code_on_failure=None,
        input_dir=input_dir,
    )


@pytest.fixture
def png_inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    write_png(folder / "a.png", PICTURE)
    write_png(folder / "b.png", 255 - PICTURE)
    return folder


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
        (folder / ".probe").unlink()
        return True
    except OSError:
        return False


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no file can be created in: mode 0o555, and for root (who ignores modes) the immutable attribute."""
    folder = tmp_path / "read only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if _writable(folder) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if _writable(folder):
        folder.chmod(0o755)
        pytest.skip("cannot make a read-only folder here (root on a file system without chattr +i)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def _blocked_by_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "out.txt").write_text("a file where the output folder should go")
    return tmp_path / "out.txt" / "masks", "output folder is not writable (Not a directory)"


def _is_a_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "results").write_text("a file")
    return tmp_path / "results", "a file of that name is in the way"


@pytest.mark.parametrize("make", [_blocked_by_file, _is_a_file], ids=["parent-is-a-file", "output-is-a-file"])
def test_unusable_output_folder_stops_before_the_first_case(png_inputs, tmp_path, make):
    out, phrase = make(tmp_path)
    net = _CountingNet()
    with pytest.raises(InputError) as info:
        _png_runner(png_inputs, out, network=net).run()
    _one_line_naming(str(info.value), str(out), phrase)
    assert net.calls == 0


def test_read_only_output_folder_stops_before_the_first_case(png_inputs, read_only_dir):
    net = _CountingNet()
    with pytest.raises(InputError) as info:
        _png_runner(png_inputs, read_only_dir, network=net).run()
    _one_line_naming(str(info.value), str(read_only_dir), "output folder is not writable")
    assert net.calls == 0 and not any(read_only_dir.iterdir())


@pytest.mark.parametrize("inside", ["", "masks", "masks/run 2"], ids=["same-folder", "inside", "nested"])
def test_output_folder_in_the_input_folder_stops_before_the_first_case(png_inputs, inside):
    out = png_inputs / inside if inside else png_inputs
    net = _CountingNet()
    with pytest.raises(InputError) as info:
        _png_runner(png_inputs, out, network=net, input_dir=png_inputs).run()
    _one_line_naming(str(info.value), str(out), "is the input folder" if not inside else f"is inside the input folder {png_inputs}")
    assert net.calls == 0 and sorted(p.name for p in png_inputs.iterdir()) == ["a.png", "b.png"]


def test_output_folder_beside_the_input_folder_is_accepted(png_inputs, tmp_path):
    assert check_output_dir(tmp_path / "in masks", input_dir=png_inputs) == tmp_path / "in masks"


def test_check_output_dir_creates_a_missing_folder_with_spaces_and_non_ascii(tmp_path):
    folder = tmp_path / "Patiënt data" / "masks 01"
    assert check_output_dir(folder) == folder and folder.is_dir() and not any(folder.iterdir())


@pytest.mark.parametrize("lister", [list_images, list_volume_inputs], ids=["2d-folder", "volume-folder"])
def test_non_image_files_are_skipped_and_logged(tmp_path, caplog, lister):
    write_png(tmp_path / "scan.png", PICTURE)
    _nifti(tmp_path / "scan.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.INFO):
        cases = [Path(p).name for p in lister(tmp_path)]
    assert "notes.txt" not in cases and ".DS_Store" not in cases
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "notes.txt" in skipped[0] and ".DS_Store" in skipped[0] and str(tmp_path) in skipped[0]


def test_constant_image_gives_an_empty_mask_and_a_note(png_inputs, tmp_path, caplog):
    write_png(png_inputs / "blank.png", np.full((48, 64), 200, np.uint8))  # the bright-is-head net would fill it
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        rows = {r["image"]: r for r in _png_runner(png_inputs, out).run()}
    assert rows["blank.png"]["status"] == "ok" and rows["blank.png"]["note"] == "constant image: empty mask"
    mask = np.asarray(Image.open(out / "blank_mask.png"))
    assert mask.shape == (48, 64) and not mask.any()
    assert any("blank.png" in r.getMessage() and "constant image" in r.getMessage() for r in caplog.records)
    assert "note" not in rows["a.png"] and np.asarray(Image.open(out / "a_mask.png")).any()


def test_failed_case_leaves_no_partial_file_and_the_batch_goes_on(png_inputs, tmp_path):
    _truncated_png(png_inputs)

    def half_written(case):  # an output that fails in the middle of writing b.png's file
        name = Path(case["image"].meta["filename_or_obj"]).stem
        with atomic_path(tmp_path / "out" / f"{name}.bin") as tmp:
            tmp.write_bytes(b"half")
            if name == "b":
                raise OSError("disk full")
        return {"bin": f"{name}.bin"}

    out = tmp_path / "out"
    rows = {r["image"]: r["status"] for r in _png_runner(png_inputs, out, case_outputs=[half_written]).run()}
    assert rows["a.png"] == "ok"
    assert rows["b.png"] == "failed: OSError: disk full"
    assert rows["trunc.png"].startswith(f"failed: {png_inputs / 'trunc.png'}: cannot read the image")
    # nothing half-written, no temp file; the journal is what lets --skip_existing continue a killed run
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "results.csv", "results.journal.jsonl", "results.lock"]


def _huge_png(folder: Path) -> Path:
    """10000x10000 zeros: about 100 kB on disk, 100 million pixels once decoded."""
    return _pil(folder / "huge.png", Image.new("L", (10000, 10000)))


def _huge_nifti_header(folder: Path) -> Path:
    """A NIfTI header that promises 20000x20000 pixels, with no data behind it: refused from the header alone."""
    path = folder / "huge.nii"
    header = nib.Nifti1Header()
    header.set_data_shape((20000, 20000))
    header.set_data_dtype(np.uint8)
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\0" * 4)
    return path


def _huge_dicom_header(folder: Path) -> Path:
    import pydicom

    path = write_dicom_2d(folder / "huge.dcm", PICTURE)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 10000, 8000  # the header promises more than the file holds: no decoder may run
    ds.save_as(path)
    return path


@pytest.mark.parametrize("make", [_huge_png, _huge_nifti_header, _huge_dicom_header], ids=["png", "nifti", "dicom"])
def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, make):
    """The NIfTI and DICOM headers promise pixels their files do not hold: a decoder would fail with 'cannot read'."""
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        check_image_2d(path)
    _one_line_naming(str(info.value), str(path), "pixels is too large (at most 40 million pixels, --max_pixels); downsample it first")


def test_the_pixel_limit_is_a_setting(tmp_path):
    path = write_png(tmp_path / "frame.png", np.zeros((300, 400)))
    assert check_image_2d(path) == path
    with pytest.raises(InputError, match=r"image of 300x400 pixels is too large \(at most 100000 pixels, --max_pixels\)"):
        check_image_2d(path, max_pixels=100_000)


def test_a_sheared_voxel_grid_is_read_with_a_warning(tmp_path, caplog):
    sheared = AFFINE.copy()
    sheared[0, 1] = 0.3 * AFFINE[1, 1]  # the j axis leans towards i: voxels are parallelepipeds
    path = _nifti(tmp_path / "sheared.nii.gz", affine=sheared)
    with caplog.at_level(logging.WARNING, logger="custom_nets.data.volume_io"):
        image = read_volume(path)
    assert tuple(image.shape[1:]) == VOLUME.shape
    assert any("sheared.nii.gz has a sheared voxel grid" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="custom_nets.data.volume_io"):
        read_volume(_nifti(tmp_path / "straight.nii.gz"))
    assert not any("sheared" in r.getMessage() for r in caplog.records)
