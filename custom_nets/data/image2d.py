"""
Check that a file is one usable 2D image before a 2D bundle reads it, with a one-line error that names it.

MONAI's ``LoadImaged`` reads what it can: a truncated PNG fails deep in a decoder (``struct.error``), a
3D NIfTI volume goes through and fails later in ``Resized``, a palette PNG gives palette indices as
intensities, NaN pixels of a float image turn the whole scaled image into NaN. :func:`check_image_2d`
catches these first. It is a separate check, not a loader: the bundle's ``preprocessing`` stays plain
MONAI so that MONAI Label and the TorchScript configs keep using it unchanged
(:class:`custom_nets.engines.folder_inference.FolderInference` calls it as ``input_check``).

Accepted: PNG, JPEG, BMP or TIFF pictures with 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)
channels, 8 or 16 bits or float; single-frame DICOM (:data:`DICOM_PHOTOMETRICS`); 2D NIfTI (trailing axes
of size 1 allowed); at least :data:`MIN_SIDE` pixels a side. ``docs/bad_inputs.md`` lists what is refused
and why.

DICOM is read by pydicom, never by a native decoder before its header is checked: MONAI's default reader
for ``.dcm`` (ITK, i.e. GDCM) reads a colour DICOM as a one-slice RGB volume and aborts the whole process
on a PALETTE COLOR DICOM without its table. :class:`Image2DReader` gives the bundle's ``LoadImaged`` the
DICOM frame of :func:`decode_dicom_frame` (shared with stream mode) and leaves every other file to MONAI.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data.image_reader import ImageReader

from custom_nets.data.formats import DICOM_SUFFIXES, NIFTI_SUFFIXES, PICTURE_SUFFIXES
from custom_nets.errors import InputError, describe_error

__all__ = [
    "ImageInputError",
    "DICOM_PHOTOMETRICS",
    "MIN_SIDE",
    "MAX_PIXELS",
    "check_image_2d",
    "check_dicom_photometric",
    "decode_dicom_frame",
    "dicom_pixel_size",
    "Image2DReader",
]

#: DICOM photometric interpretations read: gray, colour (to RGB by pydicom), palette with its table (to RGB).
DICOM_PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")

#: Fewest pixels a side: smaller images (a 1x1 pixel, a 1x4000 strip) hold no head and break resizing and the ellipse fit.
MIN_SIDE = 16
#: Most pixels of one 2D image (an 8K frame has 33 million): a 10000x10000 PNG compresses to 1 MB but takes
#: minutes and 9 GB to segment at full size; it is refused from its header, before anything is decoded.
MAX_PIXELS = 40_000_000

# PIL modes and their channel counts that the 2D bundles turn into one gray channel (alpha dropped).
_PIL_MODES = {"1": 1, "L": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1, "LA": 2, "RGB": 3, "RGBA": 4}


class ImageInputError(InputError):
    """A file that is not one usable 2D image; the message is one line that starts with its path."""


def _fail(path: Path, problem: str) -> ImageInputError:
    return ImageInputError(f"{path}: {problem}".replace("\n", " "))


def _shape_text(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _check_finite(path: Path, array: np.ndarray) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        return
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise _fail(path, f"{bad} pixel(s) are NaN or infinite; fix or mask them before segmentation")
    # the bundle computes in float32: a larger value (e.g. NIfTI scl_slope 1e38) or value range becomes
    # infinite there, and min-max scaling then gives NaN and an empty mask
    low, high = float(array.min()), float(array.max())
    if max(-low, high, high - low) > np.finfo(np.float32).max:
        raise _fail(path, f"pixel values from {low:.3g} to {high:.3g} overflow the 32-bit floats the bundle computes in "
                          "(a wrong scale factor, e.g. NIfTI scl_slope?)")  # fmt: skip


def _check_pixel_count(path: Path, shape: Sequence[int], max_pixels: int) -> None:
    count = math.prod(int(v) for v in shape)
    if count > max_pixels:
        limit = f"{max_pixels / 1e6:g} million" if max_pixels >= 1_000_000 else str(max_pixels)
        raise _fail(
            path, f"image of {_shape_text(tuple(shape))} pixels is too large (at most {limit} pixels, --max_pixels); "
            "downsample it first"
        )


def _check_picture(path: Path, max_pixels: int) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1))
            mode, (width, height) = im.mode, im.size
            _check_pixel_count(path, (height, width), max_pixels)
            if im.format == "PNG":
                # every chunk's CRC, no decompression: catches truncated and corrupt files, and the image
                # is decoded once, by the bundle's loader (decoding dominated the check's time)
                im.verify()
                array = None
            else:
                im.load()  # decode everything: a truncated file fails here with PIL's own words
                array = np.asarray(im) if mode == "F" else None
    except ImageInputError:
        raise
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as e:
        raise _fail(path, f"cannot read the image ({describe_error(e)})") from None
    if frames > 1:
        raise _fail(path, f"{frames} frames or pages in one file; one 2D image per file is expected")
    if mode == "P" or mode == "PA":
        raise _fail(path, "palette (indexed-colour) image: its pixel values are colour indices; save it as grayscale")
    if mode not in _PIL_MODES:
        raise _fail(path, f"image mode {mode} is not supported (gray, gray+alpha, RGB or RGBA expected)")
    if array is not None:
        _check_finite(path, array)
    return height, width


def _check_nifti(path: Path, max_pixels: int) -> tuple[int, int]:
    import nibabel as nib

    try:
        image = nib.load(os.fspath(path))
        _check_pixel_count(path, image.shape, max_pixels)  # from the header, before the data is read
        array = np.asanyarray(image.dataobj)  # 2D images are small: read them, a truncated file fails here
    except ImageInputError:
        raise
    except Exception as e:  # nibabel raises many types for damaged files
        raise _fail(path, f"cannot read the image ({describe_error(e)})") from None
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 2 or math.prod(shape[2:]) > 1:
        kind = "a 3D volume" if len(shape) == 3 else f"{len(shape)}D data"
        raise _fail(path, f"is {kind} of shape {_shape_text(shape)}; this bundle segments 2D images")
    if not np.isfinite(image.affine).all():  # a NaN pixdim or sform: no mask can be written with it
        raise _fail(path, "the NIfTI header's geometry (pixdim, qform or sform) is NaN or infinite; fix the header")
    _check_finite(path, array)
    return shape[0], shape[1]


def check_dicom_photometric(ds: Any, path: str | os.PathLike) -> None:
    """
    Refuse, from the header alone and before any decoder runs, DICOM pixel data that cannot become a gray
    or RGB picture: a photometric interpretation not in :data:`DICOM_PHOTOMETRICS`, or PALETTE COLOR
    without its colour table (its values are colour indices, and GDCM aborts the process on it).

    Raises:
        ImageInputError: the path and the problem, in one line.
    """
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in DICOM_PHOTOMETRICS:
        raise _fail(Path(path), f"photometric interpretation {photometric or 'missing'} is not supported ({', '.join(DICOM_PHOTOMETRICS)})")
    tables = [(f"{c}PaletteColorLookupTableData" in ds or f"Segmented{c}PaletteColorLookupTableData" in ds)
              and f"{c}PaletteColorLookupTableDescriptor" in ds for c in ("Red", "Green", "Blue")]  # fmt: skip
    if photometric == "PALETTE COLOR" and not all(tables):
        raise _fail(Path(path), "PALETTE COLOR DICOM without its colour table: its pixel values are colour indices, not intensities")


def decode_dicom_frame(src: Any, ds: Any, index: int | None = None) -> np.ndarray:
    """
    One frame (``index``; None: a single-frame file's image) of DICOM pixel data as intensities, gray
    ``(rows, columns)`` or RGB ``(rows, columns, 3)``: YBR is converted to RGB by pydicom, PALETTE COLOR
    through its table (pydicom's ``apply_color_lut``), MONOCHROME1 (0 is white) inverted within its stored
    range so that bright means bright, as in MONOCHROME2. Check ``ds`` with :func:`check_dicom_photometric` first.

    Args:
        src: the file (path or open binary file) that ``ds``, its header, was read from.
        ds: the header (``pydicom.dcmread(..., stop_before_pixels=True)`` is enough).
        index: the frame of a multi-frame file.
    """
    from pydicom.pixels import apply_color_lut, pixel_array

    array = pixel_array(src, index=index)  # YBR comes out as RGB (pydicom's own conversion)
    photometric = str(ds.PhotometricInterpretation)
    if photometric == "PALETTE COLOR":
        return apply_color_lut(array, ds)
    if photometric == "MONOCHROME1" and np.issubdtype(array.dtype, np.integer):
        bits = int(ds.BitsStored)
        low = -(1 << (bits - 1)) if int(ds.get("PixelRepresentation", 0)) else 0
        return (2 * low + (1 << bits) - 1 - array.astype(np.int64)).astype(array.dtype)  # low + high - value
    return array


def dicom_pixel_size(ds: Any) -> tuple[float, float] | None:
    """
    (x = column, y = row) pixel size in mm of a DICOM header, MONAI's array axis order for 2D DICOM:
    ``PixelSpacing`` (row, column) or, for ultrasound, the calibration of its first region (``PhysicalDeltaX/Y``
    in cm when the units code is 3). None when neither holds a finite size above 0: never a guessed 1 mm.
    """
    if "PixelSpacing" in ds:
        row, column = (float(v) for v in ds.PixelSpacing)
        size = (column, row)
    elif ds.get("SequenceOfUltrasoundRegions"):
        region = ds.SequenceOfUltrasoundRegions[0]
        if region.get("PhysicalUnitsXDirection") != 3 or region.get("PhysicalUnitsYDirection") != 3:
            return None
        size = (abs(float(region.PhysicalDeltaX)) * 10.0, abs(float(region.PhysicalDeltaY)) * 10.0)
    else:
        return None
    return size if all(math.isfinite(s) and s > 0 for s in size) else None


def _read_dicom_2d(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[Any, np.ndarray]:
    """The header and the decoded single frame of a 2D DICOM, every refusal one line naming the file."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # pydicom raises many types for damaged files
        raise _fail(path, f"cannot read the DICOM image ({describe_error(e)})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise _fail(path, f"multi-frame DICOM ({frames} frames); one 2D image per file is expected")
    if "Rows" not in ds or "PhotometricInterpretation" not in ds:  # a file cut short in its header
        raise _fail(path, "cannot read the DICOM image (no image header: a truncated or non-image DICOM file)")
    check_dicom_photometric(ds, path)  # before any decoder sees the pixel data
    _check_pixel_count(path, (int(ds.Rows), int(getattr(ds, "Columns", 0) or 0)), max_pixels)
    try:
        array = decode_dicom_frame(path, ds)  # truncated or undecodable pixel data fails here
    except Exception as e:  # pydicom raises many types for damaged pixel data
        raise _fail(path, f"cannot read the DICOM image ({describe_error(e)})") from None
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise _fail(path, f"DICOM pixel data of shape {_shape_text(array.shape)}; a gray or RGB 2D image is expected")
    return ds, array


def _check_dicom(path: Path, max_pixels: int) -> tuple[int, int]:
    _, array = _read_dicom_2d(path, max_pixels)
    _check_finite(path, array)
    return array.shape[0], array.shape[1]


def check_image_2d(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Path:
    """
    Check that ``path`` is one readable 2D image a 2D bundle can segment; return it. PNG files are
    checked chunk by chunk against their checksums without being decompressed; other formats are decoded.

    Refused, each with one line that starts with the path: a missing file; a file that does not decode
    (truncated, corrupt, not an image despite its suffix); a 3D volume or several frames/pages; a palette
    image (PNG, or DICOM without its colour table); an unsupported pixel mode or photometric interpretation;
    NaN or infinite pixels of a float image, or values that overflow float32; a NaN or infinite NIfTI
    geometry; fewer than :data:`MIN_SIDE` pixels a side; more than ``max_pixels`` (default :data:`MAX_PIXELS`)
    pixels, from the header, before decoding.

    Raises:
        ImageInputError: the path and the problem, in one line.

    Example::

        check_image_2d("scans/001_HC.png")        # PosixPath('scans/001_HC.png')
        check_image_2d("scans/volume.nii.gz")     # ImageInputError: scans/volume.nii.gz: is a 3D volume of shape 48x64x5; ...
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file")
    name = path.name.lower()
    if name.endswith(PICTURE_SUFFIXES):
        size = _check_picture(path, max_pixels)
    elif name.endswith(NIFTI_SUFFIXES):
        size = _check_nifti(path, max_pixels)
    elif name.endswith(DICOM_SUFFIXES):
        size = _check_dicom(path, max_pixels)
    else:
        raise _fail(path, f"unsupported image format (expected {', '.join(PICTURE_SUFFIXES)}, .nii, .nii.gz or .dcm)")
    if min(size) < MIN_SIDE:
        raise _fail(path, f"image of {_shape_text(size)} pixels is too small (at least {MIN_SIDE} pixels a side)")
    return path


class Image2DReader(ImageReader):
    """
    The 2D bundles' reader for MONAI's ``LoadImage(d)``: a single-frame DICOM through pydicom
    (:func:`decode_dicom_frame`: gray, or RGB from colour and palette data), every other file through the
    reader MONAI itself picks by suffix (``PILReader``, ``NibabelReader``, ``ITKReader`` for TIFF).

    A picture with an EXIF orientation tag (e.g. 6: stored sideways, shown turned 90 degrees) comes out as it
    is displayed (PIL's ``ImageOps.exif_transpose``); masks of it are written in that displayed orientation.

    A DICOM comes out as ITK's reader gave it before: one slice ``(x = column, y = row, 1)``, colour last,
    its pixel size (:func:`dicom_pixel_size`) in an affine in RAS (1 mm when it has none: the head
    circumference takes the pixel size from the header, never from this affine).

    Example (``inference.json``)::

        {"_target_": "LoadImaged", "keys": "image", "reader": "$custom_nets.data.image2d.Image2DReader()"}
    """

    def __init__(self) -> None:
        from monai.transforms import LoadImage

        super().__init__()
        self.monai_readers = LoadImage().readers[::-1]  # MONAI's own, in the order it tries them

    def verify_suffix(self, filename: Any) -> bool:
        return True

    def read(self, data: Any, **kwargs: Any) -> tuple[Any, dict]:
        # nothing is read here but in get_data: LoadImage tries its other readers (GDCM among them) on a
        # file that a designated reader fails to read, and a refused DICOM must reach no native decoder
        return data, kwargs

    def get_data(self, img: tuple[Any, dict]) -> tuple[np.ndarray, dict]:
        data, kwargs = img
        path = Path(os.fspath(data if isinstance(data, (str, os.PathLike)) else data[0]))
        if not path.name.lower().endswith(DICOM_SUFFIXES):
            reader = next(r for r in self.monai_readers if r.verify_suffix(data))  # ITKReader takes any file
            from PIL import Image, ImageOps

            image = reader.read(data, **kwargs)
            if isinstance(image, Image.Image):
                # a camera or phone JPEG is often stored sideways with an EXIF orientation tag: segment the
                # picture as it is displayed, so that the mask (written without the tag) overlays what one sees
                ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of a picture without the tag
            return reader.get_data(image)
        ds, array = _read_dicom_2d(path)
        x, y = dicom_pixel_size(ds) or (1.0, 1.0)
        # laid out as ITK's reader gave a DICOM: one slice (x = column, y = row, 1), LPS turned into RAS;
        # a 2D layout would make ITK write the mask DICOM without PixelSpacing
        affine = np.diag([-x, -y, 1.0, 1.0])
        meta = {"affine": affine, "original_affine": affine.copy(), "spatial_shape": np.asarray([*array.shape[1::-1], 1]),
                "original_channel_dim": -1 if array.ndim == 3 else float("nan"), "space": "RAS"}  # fmt: skip
        return np.ascontiguousarray(np.expand_dims(np.swapaxes(array, 0, 1), 2)), meta
