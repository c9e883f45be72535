"""
Read 3D medical volumes with their geometry, and write masks that overlay them exactly.

One case is one file (NIfTI ``.nii``/``.nii.gz``, NRRD ``.nrrd``/``.nhdr``, MetaImage ``.mhd``/``.mha``)
or one folder holding one DICOM series. Reading goes through MONAI's ``LoadImage``: NIfTI with
``NibabelReader`` (so the affine is the one nibabel gives), everything else with ``ITKReader``
(DICOM series through GDCM), all as float32 and channel-first ``MetaTensor`` with ``affine``
(RAS) and ``original_affine`` in its metadata.

Before any voxel is read, :func:`check_volume_input` looks at the headers and fails with a one-line
:class:`VolumeInputError` that names the case: a MetaImage header without its data file, a folder
with several DICOM series or a missing slice, an unsupported format. After reading, non-finite
voxels are an error too. DICOM tags are never copied into metadata, messages or file names:
cases are named after the file or folder.

:func:`write_mask_like` writes a NIfTI mask with the shape and affine of the volume it was predicted
from (for a NIfTI input, also its qform/sform codes), through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import logging
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

from custom_nets.data.atomic_write import atomic_path
from custom_nets.errors import InputError

__all__ = [
    "VolumeInputError",
    "VOLUME_SUFFIXES",
    "volume_format",
    "case_name",
    "list_volume_inputs",
    "dicom_series_files",
    "check_metaimage",
    "volume_shape",
    "check_volume_input",
    "read_volume",
    "LoadVolumed",
    "write_mask_like",
]

logger = logging.getLogger(__name__)

#: File suffixes read as one volume each, by format.
VOLUME_SUFFIXES: dict[str, tuple[str, ...]] = {
    "nifti": (".nii.gz", ".nii"),
    "nrrd": (".nrrd", ".nhdr"),
    "metaimage": (".mhd", ".mha"),
}

# MetaImage element types and their sizes in bytes, to check a data file's length without reading it.
_MET_TYPE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip

# DICOM tag keys ("0010|0010") as ITK names them: dropped from metadata so no identifier travels on.
_DICOM_TAG_KEY = re.compile(r"^[0-9a-fA-F]{4}\|[0-9a-fA-F]{4}$")


class VolumeInputError(InputError):
    """
    A volume that cannot be used as it is; the message is one line that starts with the case name.

    Raised ``from None`` when it wraps a reader's error (whose first line it quotes), so that batch
    inference, which reports the innermost cause of a failure, reports this message.
    """


def _fail(case: str, problem: str) -> VolumeInputError:
    return VolumeInputError(f"{case}: {problem}".replace("\n", " "))


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

    Raises:
        VolumeInputError: ``input_dir`` is not a folder or holds no case.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise _fail(str(input_dir), "input folder not found")
    suffixes = tuple(s for group in VOLUME_SUFFIXES.values() for s in group)
    cases = [
        p
        for p in sorted(input_dir.iterdir())
        if not p.name.startswith(".") and (p.is_dir() or p.name.lower().endswith(suffixes))
    ]
    if not cases:
        raise _fail(str(input_dir), "no volume (NIfTI, NRRD, MetaImage file or DICOM series folder) in the folder")
    return cases


def dicom_series_files(folder: str | os.PathLike, spacing_tolerance: float = 0.01) -> list[str]:
    """
    The slice files of the single DICOM image series in ``folder``, sorted along the slice normal,
    after checking that the series is one regular stack.

    Files that are not DICOM, and DICOM objects without an image plane (RTSTRUCT, SR, DICOMDIR), are
    ignored. Only headers are read.

    Args:
        folder: the series folder (not searched recursively).
        spacing_tolerance: largest accepted deviation of a gap between neighbouring slices from the
            median gap, as a fraction of the median gap.

    Raises:
        VolumeInputError: no image slice, several image series, slices of different size or
            orientation, two slices at one position, or uneven slice gaps (a missing slice).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    case = folder.name
    tags = ["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns", "NumberOfFrames"]
    series: dict[str, list[tuple[str, Any]]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue  # not DICOM (or not readable as DICOM): not part of a series
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "Rows" not in ds:
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
    slices = next(iter(series.values()))
    if len(slices) < 2:
        raise _fail(case, "the DICOM series has a single slice; a volume needs at least two")
    first = slices[0][1]
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    size = (int(first.Rows), int(first.Columns))
    for _, ds in slices[1:]:
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise _fail(case, f"DICOM slices of different sizes ({size} and {(int(ds.Rows), int(ds.Columns))})")
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


def check_metaimage(path: str | os.PathLike) -> None:
    """
    Check that a MetaImage header (``.mhd``) names a data file that exists and is long enough.

    ``.mha`` files (header and data in one) and data kept ``LOCAL`` or as a file ``LIST`` are only
    checked for existence of the header.

    Raises:
        VolumeInputError: the data file is missing or shorter than the header's size needs.
    """
    path = Path(path)
    case = case_name(path)
    if path.suffix.lower() != ".mhd":
        return
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="latin-1") as f:
            for line in f:
                key, sep, value = line.partition("=")
                if sep:
                    fields[key.strip()] = value.strip()
    except OSError as e:
        raise _fail(case, f"cannot read MetaImage header {path}: {e.strerror}") from None
    data_file = fields.get("ElementDataFile")
    if not data_file:
        raise _fail(case, f"MetaImage header {path.name} has no ElementDataFile entry")
    if data_file.upper() == "LOCAL" or data_file.upper().startswith("LIST") or " " in data_file:
        return  # data inside the header file, or a list/pattern of files: left to ITK
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


def volume_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The spatial shape of a volume in the order the readers return it (i, j, k), from headers only."""
    fmt = volume_format(path)
    case = case_name(path)
    try:
        if fmt == "nifti":
            return tuple(int(s) for s in nib.load(os.fspath(path)).shape[:3])
        if fmt == "dicom":
            import pydicom

            files = dicom_series_files(path)
            ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            return int(ds.Columns), int(ds.Rows), len(files)
        import itk

        check_metaimage(path)
        io = itk.ImageIOFactory.CreateImageIO(os.fspath(path), itk.CommonEnums.IOFileMode_ReadMode)
        if io is None:
            raise _fail(case, f"ITK cannot read {Path(path).name}")
        io.SetFileName(os.fspath(path))
        io.ReadImageInformation()
        return tuple(int(io.GetDimensions(i)) for i in range(min(io.GetNumberOfDimensions(), 3)))
    except VolumeInputError:
        raise
    except Exception as e:  # nibabel/ITK raise many types for damaged headers
        raise _fail(case, f"cannot read the header of {Path(path).name}: {_one_line(e)}") from None


def check_volume_input(path: str | os.PathLike) -> str:
    """
    Check one case from its headers (format, MetaImage data file, DICOM series consistency) and
    return its format; no voxel data are read.

    Raises:
        VolumeInputError: see :func:`volume_format`, :func:`check_metaimage`, :func:`dicom_series_files`.
    """
    fmt = volume_format(path)
    if fmt == "dicom":
        dicom_series_files(path)
    elif fmt == "metaimage":
        check_metaimage(path)
    return fmt


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


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


def read_volume(path: str | os.PathLike | Sequence[str | os.PathLike], case: str | None = None) -> MetaTensor:
    """
    Read one case as a channel-first float32 ``MetaTensor`` ``(C, I, J, K)`` with its geometry.

    A list of paths (one per channel, e.g. MRI sequences) must hold volumes of one format and one
    shape; they are stacked in the given order. Metadata: MONAI's (``affine``, ``original_affine``,
    ``spatial_shape``, ``space``...) plus ``case``, ``source_format`` and ``source_path`` (the first
    path); ``filename_or_obj`` is the path, or for several channel files in one folder that folder
    (the case folder names the outputs). DICOM tag entries are dropped.

    Args:
        path: a volume file, a DICOM series folder, or a list of them.
        case: name used in error messages and metadata; defaults to the case name of the (first) path.

    Raises:
        VolumeInputError: unreadable or inconsistent input, or non-finite voxels (one line, names the case).

    Example::

        ct = read_volume("scans/lung1.nrrd")            # (1, 512, 512, 48), float32
        mri = read_volume(["p1/flair.nii.gz", "p1/t1ce.nii.gz"], case="p1")  # (2, 240, 240, 155)
    """
    paths = [Path(p) for p in ([path] if isinstance(path, (str, os.PathLike)) else path)]
    if not paths:
        raise VolumeInputError("read_volume: no path given")
    case = case or case_name(paths[0])
    formats = []
    for p in paths:
        try:
            formats.append(check_volume_input(p))
        except VolumeInputError as e:
            if str(e).startswith(f"{case}:"):
                raise
            raise _fail(case, str(e)) from None
    if len(set(formats)) > 1:
        raise _fail(case, f"channels in different formats ({', '.join(formats)}); convert them to one format")
    if len(paths) > 1:
        shapes = [volume_shape(p) for p in paths]
        if len(set(shapes)) > 1:
            listing = ", ".join(f"{p.name} {'x'.join(map(str, s))}" for p, s in zip(paths, shapes))
            raise _fail(case, f"volumes of different shapes: {listing}")
    loader = LoadImage(reader=_reader_for(formats[0]), image_only=True, dtype=np.float32, ensure_channel_first=True)
    try:
        image = loader([os.fspath(p) for p in paths] if len(paths) > 1 else os.fspath(paths[0]))
    except Exception as e:  # readers raise RuntimeError/OSError/ValueError... for damaged files
        raise _fail(case, f"cannot read {paths[0].name}: {_one_line(e)}") from None
    if image.dtype != torch.float32:
        image = image.float()
    if image.ndim != 4:
        raise _fail(case, f"expected a 3D volume, got data of shape {tuple(image.shape)}")
    if formats[0] == "dicom":
        expected = len(dicom_series_files(paths[0]))  # headers only; GDCM may group slices differently
        if image.shape[-1] != expected:
            raise _fail(case, f"ITK read {image.shape[-1]} slices from a series of {expected}")
    if not bool(torch.isfinite(image).all()):
        bad = int((~torch.isfinite(image)).sum())
        raise _fail(case, f"{bad} voxel(s) are NaN or infinite")
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
        allow_missing_keys: skip keys that are absent.

    Example::

        LoadVolumed(keys=["image", "label"])({"image": ["c1/flair.nii.gz", "c1/t1ce.nii.gz"], "label": "c1/seg.nii.gz"})
    """

    def __init__(self, keys: KeysCollection, case_key: str = "case", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get(self.case_key)
        for key in self.key_iterator(d):
            d[key] = read_volume(d[key], case=None if case is None else str(case))
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
