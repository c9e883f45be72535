"""
Check that a file is one usable 2D image before a 2D bundle reads it, with a one-line error that names it.

MONAI's ``LoadImaged`` reads what it can: a truncated PNG fails deep in a decoder (``struct.error``), a
3D NIfTI volume goes through and fails later in ``Resized``, a palette PNG gives palette indices as
intensities, NaN pixels of a float image turn the whole scaled image into NaN. :func:`check_image_2d`
catches these first. It is a separate check, not a loader: the bundle's ``preprocessing`` stays plain
MONAI so that MONAI Label and the TorchScript configs keep using it unchanged
(:class:`custom_nets.engines.folder_inference.FolderInference` calls it as ``input_check``).

Accepted: PNG, JPEG, BMP or TIFF pictures with 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)
channels, 8 or 16 bits or float; single-frame DICOM (gray or RGB); 2D NIfTI (trailing axes of size 1
allowed). ``docs/bad_inputs.md`` lists what is refused and why.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np

from custom_nets.errors import InputError, describe_error

__all__ = ["ImageInputError", "PICTURE_SUFFIXES", "check_image_2d"]

#: Suffixes read with PIL; the rest of ``IMAGE_SUFFIXES`` are NIfTI and DICOM.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# PIL modes and their channel counts that the 2D bundles turn into one gray channel (alpha dropped).
_PIL_MODES = {"1": 1, "L": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1, "LA": 2, "RGB": 3, "RGBA": 4}


class ImageInputError(InputError):
    """A file that is not one usable 2D image; the message is one line that starts with its path."""


def _fail(path: Path, problem: str) -> ImageInputError:
    return ImageInputError(f"{path}: {problem}".replace("\n", " "))


def _shape_text(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _check_finite(path: Path, array: np.ndarray) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise _fail(path, f"{bad} pixel(s) are NaN or infinite; fix or mask them before segmentation")


def _check_picture(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1))
            mode = im.mode
            if im.format == "PNG":
                # every chunk's CRC, no decompression: catches truncated and corrupt files, and the image
                # is decoded once, by the bundle's loader (decoding dominated the check's time)
                im.verify()
                array = None
            else:
                im.load()  # decode everything: a truncated file fails here with PIL's own words
                array = np.asarray(im) if mode == "F" else None
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


def _check_nifti(path: Path) -> None:
    import nibabel as nib

    try:
        image = nib.load(os.fspath(path))
        array = np.asanyarray(image.dataobj)  # 2D images are small: read them, a truncated file fails here
    except Exception as e:  # nibabel raises many types for damaged files
        raise _fail(path, f"cannot read the image ({describe_error(e)})") from None
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 2 or math.prod(shape[2:]) > 1:
        kind = "a 3D volume" if len(shape) == 3 else f"{len(shape)}D data"
        raise _fail(path, f"is {kind} of shape {_shape_text(shape)}; this bundle segments 2D images")
    _check_finite(path, array)


def _check_dicom(path: Path) -> None:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1))
        array = ds.pixel_array  # decodes: truncated or undecodable pixel data fails here
    except Exception as e:  # pydicom raises many types for damaged files
        raise _fail(path, f"cannot read the DICOM image ({describe_error(e)})") from None
    if frames > 1:
        raise _fail(path, f"multi-frame DICOM ({frames} frames); one 2D image per file is expected")
    if samples not in (1, 3) or array.ndim != (2 if samples == 1 else 3):
        raise _fail(path, f"DICOM pixel data of shape {_shape_text(array.shape)}; a gray or RGB 2D image is expected")
    _check_finite(path, np.asarray(array))


def check_image_2d(path: str | os.PathLike) -> Path:
    """
    Check that ``path`` is one readable 2D image a 2D bundle can segment; return it. PNG files are
    checked chunk by chunk against their checksums without being decompressed; other formats are decoded.

    Refused, each with one line that starts with the path: a missing file; a file that does not decode
    (truncated, corrupt, not an image despite its suffix); a 3D volume or several frames/pages; a palette
    image; an unsupported pixel mode; NaN or infinite pixels of a float image.

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
        _check_picture(path)
    elif name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    elif name.endswith((".dcm", ".dicom")):
        _check_dicom(path)
    else:
        raise _fail(path, f"unsupported image format (expected {', '.join(PICTURE_SUFFIXES)}, .nii, .nii.gz or .dcm)")
    return path
