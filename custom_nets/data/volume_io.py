"""
Read 3D medical volumes with their geometry, and write masks that overlay them exactly.

One case is one file (NIfTI ``.nii``/``.nii.gz``, NRRD ``.nrrd``/``.nhdr``, MetaImage ``.mhd``/``.mha``)
or one folder holding one DICOM series. Reading goes through MONAI's ``LoadImage``: NIfTI with
``NibabelReader`` (so the affine is the one nibabel gives), everything else with ``ITKReader``
(DICOM series through GDCM), all as float32 and channel-first ``MetaTensor`` with ``affine``
(RAS) and ``original_affine`` in its metadata.

Before any voxel is read, :func:`check_volume_input` looks at the headers and fails with a one-line
:class:`VolumeInputError` that names the case and the file: a MetaImage header without its data file,
a folder with several DICOM series, a missing, corrupt or truncated slice, an unsupported format, a
2D image or a file holding several volumes (one 3D volume per file and channel, unless the caller
asks for stacked channels: the MRI sequences of a case in one 4D NIfTI, as a MONAI Label study is).
Several channel files of one case must share one voxel grid (shape and affine, :func:`check_same_grid`).
After reading, non-finite voxels are an error too. ``docs/bad_inputs.md`` lists every case. DICOM tags are
never copied into metadata, messages or file names: cases are named after the file or folder.

:func:`write_mask_like` writes a NIfTI mask with the shape and affine of the volume it was predicted
from (for a NIfTI input, also its qform/sform codes), through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader
from monai.transforms import LoadImage, MapTransform

from custom_nets.atomic_write import atomic_path
from custom_nets.data.formats import DICOM_SERIES_FILE_SUFFIXES, METAIMAGE_DATA_SUFFIXES, METAIMAGE_SUFFIXES, VOLUME_SUFFIXES
from custom_nets.errors import InputError, describe_error

__all__ = [
    "VolumeInputError",
    "GRID_AFFINE_TOLERANCE",
    "volume_format",
    "case_name",
    "list_volume_inputs",
    "dicom_series_files",
    "check_metaimage",
    "nrrd_data_problem",
    "volume_grid",
    "volume_shape",
    "check_same_grid",
    "check_volume_input",
    "read_volume",
    "LoadVolumed",
    "write_mask_like",
]

logger = logging.getLogger(__name__)

# MetaImage element types and their sizes in bytes, to check a data file's length without reading it.
_MET_TYPE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip

# NRRD "type" names (the spec's synonyms included) and their bytes per value.
_NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}  # fmt: skip

# DICOM tag keys ("0010|0010") as ITK names them: dropped from metadata so no identifier travels on.
_DICOM_TAG_KEY = re.compile(r"^[0-9a-fA-F]{4}\|[0-9a-fA-F]{4}$")

# Uncompressed transfer syntaxes, whose pixel data length is rows x columns x samples x bytes per sample.
_UNCOMPRESSED_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")

#: Largest accepted difference between two affines (voxel -> world, mm) of volumes that must overlay.
GRID_AFFINE_TOLERANCE = 1e-3


class VolumeInputError(InputError):
    """
    A volume that cannot be used as it is; the message is one line that starts with the case name.

    Raised ``from None`` when it wraps a reader's error (whose first line it quotes), so that batch
    inference, which reports the innermost cause of a failure, reports this message.
    """


def _fail(case: str, problem: str) -> VolumeInputError:
    return VolumeInputError(f"{case}: {problem}".replace("\n", " "))


def _for_case(case: str, path: Path, error: VolumeInputError) -> VolumeInputError:
    """``error`` about one file of ``case`` (e.g. one MRI sequence), as ``case: <file>: problem``."""
    text = str(error)
    if text.startswith(f"{case}:"):
        return error
    own = f"{case_name(path)}: "
    problem = text[len(own) :] if text.startswith(own) else text
    return _fail(case, problem if path.name in problem else f"{path.name}: {problem}")


def volume_format(path: str | os.PathLike) -> str:
    """
    The format of one case: ``"nifti"``, ``"nrrd"``, ``"metaimage"`` or ``"dicom"`` (a folder).

    Raises:
        VolumeInputError: the path does not exist or its suffix is not a supported volume format.
    """
    path = Path(path)
    if path.is_dir():
        return "dicom"
    if not path.exists():
        raise _fail(str(path), "no such file or folder")
    name = path.name.lower()
    for fmt, suffixes in VOLUME_SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    known = ", ".join(s for suffixes in VOLUME_SUFFIXES.values() for s in suffixes)
    raise _fail(str(path), f"unsupported volume format (expected {known} or a DICOM series folder)")


def case_name(path: str | os.PathLike) -> str:
    """The case name of a volume path: the file name without its volume suffix, or the folder name."""
    path = Path(path)
    name = path.name
    for suffixes in VOLUME_SUFFIXES.values():
        for suffix in suffixes:
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
    return name


def list_volume_inputs(input_dir: str | os.PathLike) -> list[Path]:
    """
    The cases in ``input_dir``, sorted: every file with a volume suffix and every sub-folder (read as a
    DICOM series). Data files of MetaImage headers (``.raw``, ``.zraw``), hidden entries and other files
    are not cases.

    Skipped entries (other than MetaImage data files) are logged in one line, so a scan saved with an
    unexpected suffix does not vanish unnoticed.

    Raises:
        VolumeInputError: ``input_dir`` is not a folder or holds no case.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise _fail(str(input_dir), "input folder not found")
    suffixes = tuple(s for group in VOLUME_SUFFIXES.values() for s in group)
    cases, skipped = [], []
    for p in sorted(input_dir.iterdir()):
        if not p.name.startswith(".") and (p.is_dir() or p.name.lower().endswith(suffixes)):
            cases.append(p)
        elif p.suffix.lower() not in METAIMAGE_DATA_SUFFIXES:
            skipped.append(p.name)
    if skipped:
        logger.info("%s: skipped %d entry(ies) that are not volumes: %s", input_dir, len(skipped), ", ".join(skipped))
    if not cases:
        raise _fail(str(input_dir), "no volume (NIfTI, NRRD, MetaImage file or DICOM series folder) in the folder")
    return cases


def dicom_series_files(folder: str | os.PathLike, spacing_tolerance: float = 0.01) -> list[str]:
    """
    The slice files of the single DICOM image series in ``folder``, sorted along the slice normal,
    after checking that the series is one regular stack.

    Files that are not DICOM, and DICOM objects without an image plane (RTSTRUCT, SR, DICOMDIR), are
    ignored; a file named ``*.dcm``/``*.dicom``/``*.ima`` (or starting like DICOM) that cannot be parsed
    is a corrupt slice and an error. Only headers are read.

    Args:
        folder: the series folder (not searched recursively).
        spacing_tolerance: largest accepted deviation of a gap between neighbouring slices from the
            median gap, as a fraction of the median gap.

    Raises:
        VolumeInputError: a corrupt DICOM file, no image slice, several image series, slices of
            different size or orientation, two slices at one position, or uneven slice gaps (a missing slice).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    case = folder.name
    tags = ["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns", "NumberOfFrames",
            "PixelSpacing"]  # fmt: skip
    series: dict[str, list[tuple[str, Any]]] = {}
    unplaced: dict[str, list[str]] = {}  # slices of a series without ImagePositionPatient/ImageOrientationPatient
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as e:
            if path.suffix.lower() in DICOM_SERIES_FILE_SUFFIXES or _starts_like_dicom(path):
                reason = "no DICOM header" if isinstance(e, InvalidDicomError) else describe_error(e)
                raise _fail(case, f"corrupt DICOM file {path.name} ({reason})") from None
            continue  # not DICOM: a stray file, not part of a series
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "Rows" not in ds:
            if "Rows" in ds and "NumberOfFrames" not in ds:  # a single-frame image without its place
                unplaced.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path.name)
            continue  # no image plane: RTSTRUCT, SR, DICOMDIR, multi-frame enhanced objects
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((str(path), ds))
    if not series:
        raise _fail(case, "no DICOM image slices in the folder (single-frame CT/MR series expected)")
    if len(series) > 1:
        sizes = sorted((len(v) for v in series.values()), reverse=True)
        raise _fail(
            case,
            f"{len(series)} DICOM image series in one folder ({', '.join(map(str, sizes))} slices); "
            "put each series in its own folder",
        )
    uid, slices = next(iter(series.items()))
    if unplaced.get(uid):  # skipping them would look like missing slices
        names = unplaced[uid]
        raise _fail(
            case, f"DICOM slice(s) {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} of the series have no "
            "ImagePositionPatient or ImageOrientationPatient: the slices cannot be put in order"
        )  # fmt: skip
    if len(slices) < 2:
        raise _fail(case, "the DICOM series has a single slice; a volume needs at least two")
    first = slices[0][1]
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    size = (int(first.Rows), int(first.Columns))
    pixel_spacing = _pixel_spacing(case, slices[0])
    for path, ds in slices[1:]:
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise _fail(case, f"DICOM slices of different sizes ({size} and {(int(ds.Rows), int(ds.Columns))})")
        other_spacing = _pixel_spacing(case, (path, ds))
        if not np.allclose(other_spacing, pixel_spacing, rtol=1e-4, atol=1e-6):
            raise _fail(
                case, f"DICOM slice {Path(path).name} has pixel spacing {other_spacing[0]:g} x {other_spacing[1]:g} mm, the "
                f"series {pixel_spacing[0]:g} x {pixel_spacing[1]:g} mm: one volume needs one pixel spacing"
            )  # fmt: skip
        other = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        if not np.allclose(other, orientation, atol=1e-4):
            raise _fail(case, "DICOM slices with different orientations (ImageOrientationPatient) in one series")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.asarray([np.dot(normal, [float(v) for v in ds.ImagePositionPatient]) for _, ds in slices])
    order = np.argsort(positions, kind="stable")
    gaps = np.diff(positions[order])
    if np.any(gaps < 1e-3):
        raise _fail(case, "two DICOM slices at the same position (duplicate slice)")
    median = float(np.median(gaps))
    if np.any(np.abs(gaps - median) > spacing_tolerance * median + 1e-4):
        raise _fail(
            case,
            f"inconsistent DICOM slice spacing (gaps from {gaps.min():.4g} to {gaps.max():.4g} mm, "
            f"median {median:.4g} mm): a missing slice?",
        )
    return [slices[i][0] for i in order]


def _pixel_spacing(case: str, item: tuple[str, Any]) -> tuple[float, float]:
    """A slice's PixelSpacing (row, column) in mm; refused when missing, zero or not finite."""
    path, ds = item
    try:
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        spacing = ()
    if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
        found = "none" if not spacing else " x ".join(f"{v:g}" for v in spacing)
        raise _fail(case, f"DICOM slice {Path(path).name} has no usable pixel spacing ({found}); no measurement in mm is possible")
    return spacing  # type: ignore[return-value]


def _starts_like_dicom(path: Path) -> bool:
    """Whether a file has the DICOM preamble's ``DICM`` marker at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _short_dicom_slices(files: Sequence[str]) -> list[str]:
    """Names of uncompressed DICOM slices whose pixel data is shorter than rows x columns x samples x bytes."""
    import pydicom

    short = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            if str(ds.file_meta.get("TransferSyntaxUID", "")) not in _UNCOMPRESSED_SYNTAXES:
                continue
            needed = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
            if len(ds.get("PixelData", b"")) < needed:
                short.append(Path(path).name)
        except Exception:  # unreadable in full: also a damaged slice
            short.append(Path(path).name)
    return short


def check_metaimage(path: str | os.PathLike) -> None:
    """
    Check that a MetaImage header (``.mhd``, or a ``.mha`` that names a separate data file) names a data
    file inside its own folder that exists and is long enough.

    ``.mha`` files with their data inside (``LOCAL``) and data kept as a file ``LIST`` are only checked
    for existence of the header.

    Raises:
        VolumeInputError: the data file lies outside the header's folder (``../secret.raw``, an absolute
            path), is missing, or is shorter than the header's size needs.
    """
    path = Path(path)
    case = case_name(path)
    suffix = path.suffix.lower()
    if suffix not in METAIMAGE_SUFFIXES:
        return
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="latin-1") as f:
            for line in f:
                key, sep, value = line.partition("=")
                if sep:
                    fields[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile":
                    break  # the last header field; in a .mha the binary data follow
    except OSError as e:
        raise _fail(case, f"cannot read MetaImage header {path}: {e.strerror}") from None
    data_file = fields.get("ElementDataFile", "")
    if data_file.upper() == "LOCAL" or (suffix == ".mha" and not data_file):
        return  # data inside the header file
    if not data_file:
        raise _fail(case, f"MetaImage header {path.name} has no ElementDataFile entry")
    # ITK opens whatever path a header names: a header from elsewhere must not make the bundle read (and
    # write a mask of) a file outside the input folder, e.g. "../secret.raw" or "/home/x/scan.raw"
    folder = os.path.abspath(path.parent)
    if os.path.commonpath([folder, os.path.abspath(os.path.join(folder, data_file))]) != folder:
        raise _fail(case, f"MetaImage header {path.name} points to data file {data_file} outside its folder {path.parent}; "
                          "refused: put the data file beside the header")  # fmt: skip
    if data_file.upper().startswith("LIST") or " " in data_file:
        return  # a list or pattern of files: left to ITK
    data_path = path.parent / data_file
    if not data_path.is_file():
        raise _fail(case, f"MetaImage header {path.name} points to data file {data_file}, which does not exist")
    compressed = fields.get("CompressedData", "False").lower() == "true"
    element_bytes = _MET_TYPE_BYTES.get(fields.get("ElementType", ""))
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return
    if not compressed and element_bytes and dims:
        expected = int(np.prod(dims)) * channels * element_bytes
        actual = data_path.stat().st_size
        if actual < expected:
            raise _fail(case, f"MetaImage data file {data_file} is truncated ({actual} bytes, header needs {expected})")


def volume_grid(path: str | os.PathLike, channels: int = 1) -> tuple[tuple[int, ...], np.ndarray | None]:
    """
    The voxel grid of one case from its headers only: the spatial shape in the order the readers return
    it (i, j, k) and the voxel -> world affine in RAS (as MONAI's readers give it; ``None`` for a DICOM
    series, whose geometry is checked slice by slice instead).

    Args:
        path: a volume file or a DICOM series folder.
        channels: how many 3D volumes the file must hold: 1 (one volume per file and channel), or more for
            channels stacked on the 4th axis of a NIfTI (``(I, J, K, C)``, e.g. the sequences of a BraTS case).

    Raises:
        VolumeInputError: an unreadable header, a 2D image (fewer than 3 dimensions), or a file that holds
            another number of volumes or vector voxels than ``channels`` (e.g. a 4D NIfTI when 1 is expected).
    """
    fmt = volume_format(path)
    path = Path(path)
    case = case_name(path)
    try:
        if fmt == "dicom":
            import pydicom

            files = dicom_series_files(path)
            ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            return (int(ds.Columns), int(ds.Rows), len(files)), None
        if fmt == "nifti":
            header = nib.load(os.fspath(path))
            shape, components, affine = tuple(int(s) for s in header.shape), 1, np.asarray(header.affine, dtype=np.float64)
        else:
            import itk

            check_metaimage(path)
            io = itk.ImageIOFactory.CreateImageIO(os.fspath(path), itk.CommonEnums.IOFileMode_ReadMode)
            if io is None:
                raise _fail(case, f"ITK cannot read {path.name}")
            io.SetFileName(os.fspath(path))
            io.ReadImageInformation()
            ndim = io.GetNumberOfDimensions()
            shape, components = tuple(int(io.GetDimensions(i)) for i in range(ndim)), int(io.GetNumberOfComponents())
            affine = np.eye(4)
            if ndim == 3:
                direction = np.array([io.GetDirection(i) for i in range(3)], dtype=np.float64).T  # columns: axes
                affine[:3, :3] = direction * np.array([io.GetSpacing(i) for i in range(3)])
                affine[:3, 3] = [io.GetOrigin(i) for i in range(3)]
                affine[:2] *= -1  # ITK's LPS -> RAS, as MONAI's ITKReader
    except VolumeInputError:
        raise
    except Exception as e:  # nibabel/ITK raise many types for damaged headers
        problem = nrrd_data_problem(path) if fmt == "nrrd" else None  # ITK only says "Error reading"
        raise _fail(case, problem or f"cannot read the header of {path.name}: {describe_error(e)}") from None
    if len(shape) < 3:
        raise _fail(case, f"{path.name} is a 2D image ({'x'.join(map(str, shape))}); this bundle segments 3D volumes")
    extra = int(np.prod(shape[3:])) * components
    if channels == 1 and extra > 1:
        raise _fail(
            case,
            f"{path.name} holds {extra} volumes or channels (shape {'x'.join(map(str, shape))}"
            f"{f', {components} components per voxel' if components > 1 else ''}); one 3D volume per file is expected",
        )
    if channels > 1 and (fmt != "nifti" or len(shape) != 4 or extra != channels):
        raise _fail(
            case,
            f"{path.name} holds {extra} volume(s) (shape {'x'.join(map(str, shape))}, {fmt}); expected a NIfTI of "
            f"{channels} channels stacked on its 4th axis (I x J x K x {channels})",
        )
    _check_affine(case, path.name, affine)
    return shape[:3], affine


def _check_affine(case: str, name: str, affine: np.ndarray) -> None:
    """
    Refuse a voxel -> world matrix that makes every mm figure wrong (non-finite, zero or singular: a voxel
    size of 0 along some axis), and warn about a sheared one (its axes not at right angles), whose voxels
    are not boxes: volumes in mm3 stay right, distances along the grid axes do not.
    """
    if not np.all(np.isfinite(affine)):
        raise _fail(case, f"the voxel-to-world matrix (affine) of {name} is NaN or infinite; fix the header's geometry")
    axes = affine[:3, :3]
    sizes = np.linalg.norm(axes, axis=0)
    if np.any(sizes <= 1e-6) or abs(np.linalg.det(axes)) <= 1e-9 * max(float(np.prod(sizes)), 1e-30):
        spacing = " x ".join(f"{v:.4g}" for v in sizes)
        raise _fail(
            case, f"the voxel-to-world matrix (affine) of {name} is zero or singular (voxel size {spacing} mm): "
            "no measurement in mm is possible; fix the header's spacing and direction"
        )  # fmt: skip
    cosines = (axes.T @ axes) / np.outer(sizes, sizes)
    shear = float(np.max(np.abs(cosines - np.eye(3))))
    if shear > 1e-3:
        angle = math.degrees(math.asin(min(shear, 1.0)))
        logger.warning(f"{case}: {name} has a sheared voxel grid (axes {angle:.2g} degrees off a right angle): "
                       "distances along the grid axes are not the mm figures a box-shaped voxel would give")  # fmt: skip


def volume_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The spatial shape of a volume in the order the readers return it (i, j, k), from headers only (:func:`volume_grid`)."""
    return volume_grid(path)[0]


def check_same_grid(
    paths: Sequence[str | os.PathLike],
    case: str | None = None,
    tolerance: float = GRID_AFFINE_TOLERANCE,
    channels: int = 1,
) -> None:
    """
    Check from headers, reading each once, that every path is one 3D volume (:func:`volume_grid`) and
    that volumes which must overlay voxel for voxel (the MRI sequences of a case, its label, its brain
    mask) share one shape and one affine: no entry of two affines (voxel -> world, mm) differs by more
    than ``tolerance``. DICOM series are compared by shape only.

    Args:
        paths: the volumes; the first is the reference.
        case: name used in messages; defaults to the case name of the first path.
        tolerance: largest accepted difference of affine entries.
        channels: volumes the first file must hold (see :func:`volume_grid`); the others hold one each.

    Raises:
        VolumeInputError: one line naming the case and the file: a volume :func:`volume_grid` refuses,
            or two files and how they differ.

    Example::

        check_same_grid(["p1/flair.nii.gz", "p1/t1ce.nii.gz", "p1/seg.nii.gz"], case="p1")
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return
    case = case or case_name(paths[0])
    grids = []
    for i, p in enumerate(paths):
        try:
            grids.append(volume_grid(p, channels if i == 0 else 1))
        except VolumeInputError as e:
            raise _for_case(case, p, e) from None
    (shape0, affine0), name0 = grids[0], paths[0].name
    for p, (shape, affine) in zip(paths[1:], grids[1:]):
        if shape != shape0:
            raise _fail(
                case,
                f"volumes of different shapes: {name0} {'x'.join(map(str, shape0))}, {p.name} {'x'.join(map(str, shape))}; "
                "they must overlay voxel for voxel",
            )
        if affine is not None and affine0 is not None:
            difference = float(np.abs(affine - affine0).max())
            if difference > tolerance:
                raise _fail(
                    case,
                    f"{p.name} is not on the voxel grid of {name0}: their affines (voxel -> world) differ by up to "
                    f"{difference:.4g} mm (tolerance {tolerance:g}); resample one onto the other",
                )


def check_volume_input(path: str | os.PathLike) -> str:
    """
    Check one case from its headers (format, MetaImage data file, DICOM series consistency, one 3D
    volume per file) and return its format; no voxel data are read.

    Raises:
        VolumeInputError: see :func:`volume_format`, :func:`check_metaimage`, :func:`dicom_series_files`,
            :func:`volume_grid`.
    """
    fmt = volume_format(path)
    volume_grid(path)
    return fmt


class _Float32NibabelReader(NibabelReader):
    """``NibabelReader`` that applies NIfTI scaling (scl_slope/inter) in float32, not nibabel's float64."""

    def _get_array_data(self, img, filename):
        raw = np.asanyarray(img.dataobj.get_unscaled()) if hasattr(img.dataobj, "get_unscaled") else img.get_fdata()
        # at most one full-size copy (none for a float32 .nii.gz); a memory map is copied so the file stays as is
        data = raw.astype(np.float32, copy=isinstance(raw, np.memmap))
        slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
        if slope is not None and slope != 1.0:
            data *= np.float32(slope)
        if inter is not None and inter != 0.0:
            data += np.float32(inter)
        return data


def _reader_for(fmt: str):
    return _Float32NibabelReader() if fmt == "nifti" else ITKReader()


def nrrd_data_problem(path: str | os.PathLike) -> str | None:
    """
    What is wrong with the data of an NRRD file (``.nrrd`` with its data attached, or a ``.nhdr`` naming a data
    file) that ITK could not read, in words, or None when nothing is found: a header without ``sizes`` or
    with an unknown ``type``, a missing data file, raw data shorter than the header needs, or a gzip stream
    that ends early or holds less than the header needs. Run after a failed read: ITK only says that it
    found no suitable reader.
    """
    import zlib

    path = Path(path)
    fields: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            magic = f.readline()
            if not magic.startswith(b"NRRD"):
                return f"{path.name} does not start with an NRRD header (NRRD000x)"
            for raw_line in f:
                line = raw_line.decode("latin-1").rstrip("\r\n")
                if not line:
                    break  # the blank line that ends the header; attached data follow
                if line.startswith("#"):
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    fields[key.strip().lower()] = value.lstrip("=").strip()
            header_end = f.tell()
    except OSError as e:
        return f"cannot read {path.name}: {e.strerror}"
    if "sizes" not in fields:
        return f"NRRD header of {path.name} has no 'sizes' field"
    element_bytes = _NRRD_TYPE_BYTES.get(fields.get("type", "").lower())
    if element_bytes is None:
        return f"NRRD header of {path.name} has an unknown type {fields.get('type', '')!r}"
    try:
        expected = int(np.prod([int(v) for v in fields["sizes"].split()])) * element_bytes
    except ValueError:
        return f"NRRD header of {path.name} has unreadable sizes {fields['sizes']!r}"
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file:
        data_path, offset = path.parent / data_file, 0
        if not data_path.is_file():
            return f"NRRD header {path.name} points to data file {data_file}, which does not exist"
    else:
        data_path, offset = path, header_end
    encoding = fields.get("encoding", "raw").lower()
    with open(data_path, "rb") as f:
        f.seek(offset)
        data = f.read()
    if encoding == "raw" and len(data) < expected:
        return f"NRRD data of {path.name} is truncated ({len(data)} bytes, header needs {expected})"
    if encoding in ("gzip", "gz"):
        stream = zlib.decompressobj(wbits=31)
        try:
            size = len(stream.decompress(data))
        except zlib.error as e:
            return f"NRRD data of {path.name} is not valid gzip ({e})"
        if not stream.eof or size < expected:
            return f"NRRD data of {path.name} is truncated (the gzip stream holds {size} bytes, header needs {expected})"
    return None


def read_volume(
    path: str | os.PathLike | Sequence[str | os.PathLike], case: str | None = None, stacked_channels: int = 1
) -> MetaTensor:
    """
    Read one case as a channel-first float32 ``MetaTensor`` ``(C, I, J, K)`` with its geometry.

    A list of paths (one per channel, e.g. MRI sequences) must hold volumes of one format and one
    shape; they are stacked in the given order. One path with ``stacked_channels`` > 1 must be a 4D
    NIfTI with that many channels on its last axis (the sequences already stacked, as in a MONAI Label
    study). Metadata: MONAI's (``affine``, ``original_affine``, ``spatial_shape``, ``space``...) plus
    ``case``, ``source_format`` and ``source_path`` (the first path); ``filename_or_obj`` is the path, or
    for several channel files in one folder that folder (the case folder names the outputs). DICOM tag
    entries are dropped.

    Args:
        path: a volume file, a DICOM series folder, or a list of them.
        case: name used in error messages and metadata; defaults to the case name of the (first) path.
        stacked_channels: channels a single file holds (1: a 3D volume); ignored for a list of several paths.

    Raises:
        VolumeInputError: unreadable or inconsistent input (see :func:`check_volume_input`), channel files
            on different voxel grids (:func:`check_same_grid`), or non-finite voxels; one line that names
            the case and the file.

    Example::

        ct = read_volume("scans/lung1.nrrd")            # (1, 512, 512, 48), float32
        mri = read_volume(["p1/flair.nii.gz", "p1/t1ce.nii.gz"], case="p1")  # (2, 240, 240, 155)
        study = read_volume("p1_flair_t1ce.nii.gz", stacked_channels=2)    # the same, from one 4D NIfTI
    """
    paths = [Path(p) for p in ([path] if isinstance(path, (str, os.PathLike)) else path)]
    if not paths:
        raise VolumeInputError("read_volume: no path given")
    channels = stacked_channels if len(paths) == 1 else len(paths)
    case = case or case_name(paths[0])
    formats = []
    for p in paths:
        try:
            formats.append(volume_format(p))
        except VolumeInputError as e:
            raise _for_case(case, p, e) from None
    if len(set(formats)) > 1:
        raise _fail(case, f"channels in different formats ({', '.join(formats)}); convert them to one format")
    check_same_grid(paths, case, channels=channels if len(paths) == 1 else 1)  # every header once, one voxel grid
    loader = LoadImage(reader=_reader_for(formats[0]), image_only=True, dtype=np.float32, ensure_channel_first=True)
    try:
        image = loader([os.fspath(p) for p in paths] if len(paths) > 1 else os.fspath(paths[0]))
    except Exception as e:  # readers raise RuntimeError/OSError/ValueError... for damaged files
        short = _short_dicom_slices(dicom_series_files(paths[0])) if formats[0] == "dicom" else []
        if short:
            raise _fail(case, f"truncated DICOM slice(s) {', '.join(short)} (pixel data shorter than the header says)") from None
        problem = next(filter(None, map(nrrd_data_problem, paths)), None) if formats[0] == "nrrd" else None
        if problem:
            raise _fail(case, problem) from None
        raise _fail(case, f"cannot read {paths[0].name}: {describe_error(e)}") from None
    if image.dtype != torch.float32:
        image = image.float()
    if image.ndim != 4 or image.shape[0] != channels:
        raise _fail(case, f"expected {channels} 3D volume(s), read data of shape {tuple(image.shape)} from {paths[0].name}")
    if formats[0] == "dicom":
        files = dicom_series_files(paths[0])  # headers only; GDCM may group slices differently
        if image.shape[-1] != len(files):
            short = _short_dicom_slices(files)
            if short:
                raise _fail(case, f"truncated DICOM slice(s) {', '.join(short)} (pixel data shorter than the header says)")
            raise _fail(case, f"ITK read {image.shape[-1]} slices from a series of {len(files)}")
    # min and max per channel are finite iff every voxel is (NaN propagates, an infinity is an extreme):
    # one reduction pass without a boolean volume, twice as fast as isfinite on a 512x512x300 CT
    plain = image.as_subclass(torch.Tensor)
    extremes = [torch.aminmax(plain[c]) for c in range(plain.shape[0])]
    bad_channels = [c for c, (lo, hi) in enumerate(extremes) if not bool(torch.isfinite(lo) & torch.isfinite(hi))]
    if bad_channels:
        channel = bad_channels[0]
        bad = int((~torch.isfinite(plain[channel])).sum())
        where = paths[channel].name if len(paths) > 1 else paths[0].name + (f" (channel {channel})" if channels > 1 else "")
        raise _fail(case, f"{where}: {bad} voxel(s) are NaN or infinite; fix or mask them before segmentation")
    for key in [k for k in image.meta if isinstance(k, str) and _DICOM_TAG_KEY.match(k)]:
        del image.meta[key]
    image.meta["case"] = case
    image.meta["source_format"] = formats[0]
    image.meta["source_path"] = os.fspath(paths[0])
    # the case's name for writers and metric tables: the file, or the folder that holds all the channels
    parents = {p.parent for p in paths}
    image.meta["filename_or_obj"] = os.fspath(paths[0] if len(paths) == 1 or len(parents) > 1 else paths[0].parent)
    return image


class LoadVolumed(MapTransform):
    """
    Dictionary transform that reads volumes with :func:`read_volume`: each key holds a path or a list
    of paths (channels). Errors name the case given by ``case_key`` when the dictionary has one.

    Args:
        keys: keys of the paths to read.
        case_key: key of the case name used in error messages and metadata.
        stacked_channels: by key, the channels that one file under that key holds on its 4th axis (e.g.
            ``{"image": 4}``: the four MRI sequences of a case in one 4D NIfTI, a MONAI Label study); a list of
            paths under that key is read as before. Keys not named hold one 3D volume per file.
        allow_missing_keys: skip keys that are absent.

    Example::

        LoadVolumed(keys=["image", "label"])({"image": ["c1/flair.nii.gz", "c1/t1ce.nii.gz"], "label": "c1/seg.nii.gz"})
        LoadVolumed(keys="image", stacked_channels={"image": 2})({"image": "c1_flair_t1ce.nii.gz"})
    """

    def __init__(
        self,
        keys: KeysCollection,
        case_key: str = "case",
        allow_missing_keys: bool = False,
        stacked_channels: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.case_key = case_key
        self.stacked_channels = dict(stacked_channels or {})

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get(self.case_key)
        for key in self.key_iterator(d):
            d[key] = read_volume(d[key], case=None if case is None else str(case), stacked_channels=self.stacked_channels.get(key, 1))
        return d


def write_mask_like(
    mask: np.ndarray | torch.Tensor,
    reference: Mapping[str, Any] | MetaTensor,
    path: str | os.PathLike,
    dtype: np.dtype | type = np.uint8,
) -> Path:
    """
    Write ``mask`` as NIfTI so that it overlays the volume it came from: same shape, and the affine the
    reader gave for that volume (``original_affine``); for a NIfTI source also its qform/sform codes.
    The file appears complete or not at all (temporary file, then ``os.replace``).

    Args:
        mask: ``(I, J, K)`` or ``(1, I, J, K)`` array in the source volume's voxel grid.
        reference: the source volume (``MetaTensor``) or its metadata, as given by :func:`read_volume`
            (after any inverted transforms, the grid must be the original one).
        path: output file; ``.nii.gz`` or ``.nii``.
        dtype: stored data type.

    Raises:
        ValueError: the mask does not have the source's spatial shape.

    Example::

        image = read_volume("ct/dicom_series")
        write_mask_like(mask, image, "out/ct_seg.nii.gz")
    """
    meta = reference.meta if isinstance(reference, MetaTensor) else reference
    case = str(meta.get("case", "mask"))
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    shape = tuple(int(s) for s in np.asarray(meta["spatial_shape"]).tolist())
    if tuple(array.shape) != shape:
        raise ValueError(f"{case}: mask shape {tuple(array.shape)} differs from the source volume's {shape}")
    affine = np.asarray(meta.get("original_affine", meta.get("affine")), dtype=np.float64)
    image = nib.Nifti1Image(array.astype(dtype, copy=False), affine)
    source = str(meta.get("source_path", ""))
    if meta.get("source_format") == "nifti" and os.path.isfile(source):
        # keep the source's qform/sform and their codes so every viewer places the mask where the scan is
        header = nib.load(source).header
        qform, qcode = header.get_qform(coded=True)
        sform, scode = header.get_sform(coded=True)
        image.set_qform(qform if qform is not None else affine, int(qcode))
        image.set_sform(sform if sform is not None else affine, int(scode))
        image.header.set_xyzt_units(*header.get_xyzt_units())
    else:
        image.set_qform(affine, 1)
        image.set_sform(affine, 1)
        image.header.set_xyzt_units("mm")
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(image, os.fspath(tmp))
    return path
