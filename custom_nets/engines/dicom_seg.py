"""
DICOM Segmentation output of :class:`custom_nets.engines.folder_inference.FolderInference` for volumes
read from a DICOM series and 2D images read from a single-frame DICOM: ``<case>_seg.dcm``, a DICOM SEG
object written with highdicom that a PACS can take back, beside the mask (which stays the default output).

highdicom is an optional dependency (``pip install 'custom_nets[dicom]'``), imported only when a SEG is
written. A bundle turns the writer on with ``--dicom_seg true``; :func:`dicom_seg_outputs` is the config
hook that adds it to the case outputs and, when highdicom is missing, stops the run before the first case
with one line naming the extra.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom_nets.atomic_write import atomic_path
from custom_nets.data.formats import DICOM_SUFFIXES
from custom_nets.data.volume_io import dicom_series_files
from custom_nets.engines.case_writers import split_suffix
from custom_nets.errors import InputError
from custom_nets.flags import as_flag

__all__ = ["DicomSegUnavailableError", "require_highdicom", "dicom_seg_outputs", "frames_on_source_slices", "DicomSegWriter"]

logger = logging.getLogger(__name__)

#: Patient and study attributes that highdicom's warnings may quote; their values are redacted from logged warnings.
_IDENTIFYING = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber", "ReferringPhysicianName",
    "InstitutionName", "StudyID", "OperatorsName",
)  # fmt: skip

# Type 2 attributes (present, possibly empty) of the patient and study modules that highdicom copies from the
# source; a series written without them (e.g. by a converter) gets them empty in the SEG, as DICOM allows
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime")

# largest distance (in voxels) between a source pixel centre and the mask voxel it is mapped onto
_GRID_TOLERANCE = 1e-2


class DicomSegUnavailableError(InputError):
    """``--dicom_seg true`` without highdicom installed; the message names the extra to install."""


def require_highdicom():
    """
    The ``highdicom`` module.

    Raises:
        DicomSegUnavailableError: highdicom is not installed (one line: ``pip install 'custom_nets[dicom]'``).
    """
    try:
        import highdicom
    except ImportError:
        raise DicomSegUnavailableError(
            "--dicom_seg true needs highdicom, which is not installed: pip install 'custom_nets[dicom]'"
        ) from None
    return highdicom


def dicom_seg_outputs(enabled: Any, writer: DicomSegWriter) -> list[DicomSegWriter]:
    """
    ``[writer]`` when ``enabled`` (``True`` or ``"true"``), else ``[]``: the config hook that adds the DICOM
    SEG writer to a bundle's case outputs. When enabled it checks, before the first case, that highdicom
    is installed and that the bundle's metadata describes the segments (:meth:`DicomSegWriter.check`).

    Example (``inference.json``)::

        "case_outputs": "$[@mask_writer] + custom_nets.engines.dicom_seg.dicom_seg_outputs(@dicom_seg, @dicom_seg_writer)"
    """
    if not as_flag(enabled, "dicom_seg"):
        return []
    writer.check()
    return [writer]


def _unit_axis(vector: np.ndarray) -> np.ndarray | None:
    """``vector`` rounded to a signed unit axis (e.g. ``(0, -1, 0)``), or ``None`` when it is not one."""
    rounded = np.round(vector)
    if np.abs(rounded).sum() == 1 and np.abs(vector - rounded).max() < _GRID_TOLERANCE:
        return rounded.astype(np.int64)
    return None


def frames_on_source_slices(mask: np.ndarray, affine: np.ndarray, headers: Sequence[Any]) -> np.ndarray:
    """
    The mask as frames of the source slices: ``frames[n]`` is ``(Rows, Columns)`` and lies pixel for pixel
    on ``headers[n]``. Each source slice is found in the mask's voxel grid from its own geometry
    (ImagePositionPatient, ImageOrientationPatient, PixelSpacing), not from its place in the file list, so
    the result does not depend on how a reader ordered or flipped the slices.

    Args:
        mask: ``(I, J, K)`` label map on the scan's voxel grid (e.g. after ``Invertd``).
        affine: the grid's voxel -> world affine in RAS (``original_affine`` of MONAI's readers).
        headers: pydicom datasets of the source slices (headers are enough).

    Raises:
        ValueError: a source slice does not fall on the mask's grid (another scan, or a resampled mask).
    """
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    shape = np.asarray(mask.shape)
    frames = []
    for n, ds in enumerate(headers):
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        origin = to_voxel[:3, :3] @ (np.asarray([float(v) for v in ds.ImagePositionPatient]) * lps_to_ras) + to_voxel[:3, 3]
        along_row = _unit_axis(to_voxel[:3, :3] @ (orientation[:3] * lps_to_ras * column_spacing))  # column index + 1
        along_column = _unit_axis(to_voxel[:3, :3] @ (orientation[3:] * lps_to_ras * row_spacing))  # row index + 1
        start = np.round(origin)
        if along_row is None or along_column is None or np.abs(origin - start).max() > _GRID_TOLERANCE:
            raise ValueError(f"source slice {n + 1} of {len(headers)} does not lie on the mask's voxel grid")
        rows, columns = np.arange(int(ds.Rows)), np.arange(int(ds.Columns))
        index = (  # (3, Rows, Columns): the voxel under each pixel
            start.astype(np.int64)[:, None, None]
            + along_column[:, None, None] * rows[None, :, None]
            + along_row[:, None, None] * columns[None, None, :]
        )
        if index.min() < 0 or np.any(index.reshape(3, -1).max(axis=1) >= shape):
            raise ValueError(f"source slice {n + 1} of {len(headers)} reaches outside the mask's voxel grid {tuple(shape)}")
        frames.append(mask[index[0], index[1], index[2]])
    return np.stack(frames)


def _with_type2_attributes(ds: Any) -> Any:
    """``ds`` with the type 2 attributes that highdicom copies, empty where the source lacks them (in memory only)."""
    for keyword in _TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _code(spec: Any, where: str):
    """A highdicom ``Code`` from ``{"value", "scheme", "meaning"}`` in the bundle's metadata."""
    from pydicom.sr.coding import Code

    if not isinstance(spec, Mapping) or not all(spec.get(k) for k in ("value", "scheme", "meaning")):
        raise InputError(f"metadata.json: {where} must be a code {{\"value\", \"scheme\", \"meaning\"}}, got {spec!r}")
    return Code(str(spec["value"]), str(spec["scheme"]), str(spec["meaning"]))


class DicomSegWriter:
    """
    Write a case's label map as a DICOM Segmentation object (``<output_dir>/<case><postfix>.dcm``, BINARY,
    one segment per label of the bundle's metadata) that references the DICOM it was predicted from:

    - a volume read from a DICOM series (CT, MRI): its Study Instance UID, Series Instance UID, the SOP
      Instance UIDs of the source slices (one frame per source slice, found by image position) and its
      Frame of Reference UID;
    - a 2D image read from a single-frame DICOM (an ultrasound export, gray, RGB or YBR): its Study and
      Series Instance UIDs and SOP Instance UID, one frame on the image pixel for pixel (and its Frame of
      Reference when it has one); the results row also gets ``source_sop_instance_uid``, so that a results
      table (e.g. ``head_circumference.csv``) is keyed by the image a PACS knows.

    Segment labels, the
    coded segmented property category and type and the anatomic region come from ``metadata["dicom_seg"]``;
    the algorithm identification is the bundle's ``name`` and ``version``. highdicom copies the patient and
    study modules from the source, as the standard requires; nothing identifying goes into file names or
    logs (highdicom's warnings are logged with those values redacted). The file is written atomically.

    Inputs that are not DICOM (NIfTI, NRRD, PNG...), series without one Frame of Reference and one study,
    and DICOM images without their study, series or instance UIDs get no SEG: the results column says why
    in one line and a warning is logged; the mask of the case is written as usual. A multi-frame
    ultrasound DICOM (a cine) gets none either: highdicom writes a SEG of an image without a Frame of
    Reference for one frame only.

    Args:
        output_dir: output folder (created when missing).
        metadata: the bundle's ``metadata.json`` (in a config: ``"@_meta_"``), with ``name``, ``version`` and
            ``dicom_seg#segments``: a list of ``{"label_value", "label", "category", "type", "anatomy"}``,
            the last three codes ``{"value", "scheme", "meaning"}`` (``anatomy`` optional).
        pred_key: key of the label map on the input's grid: ``(1, I, J, K)`` for a volume, ``(1, columns, rows)``
            for a 2D image (the 2D reader's ``(x, y)`` layout).
        image_key: key of the loaded input (``read_volume`` metadata: ``source_format``, ``source_path``,
            ``original_affine``, ``case``; a 2D image: ``filename_or_obj``).
        postfix: added to the case name.
        series_number: Series Number of the SEG series.
        manufacturer: written as the SEG's Manufacturer (the software that made it).

    Returns from a call ``{"dicom_seg": <file name>}`` (a 2D image: and ``"source_sop_instance_uid"``), or
    ``{"dicom_seg": "skipped: <why>"}``.

    Example::

        writer = DicomSegWriter("out", metadata=json.load(open("configs/metadata.json")))
        writer({"image": read_volume("ct/series_folder"), "pred": mask})  # {"dicom_seg": "series_folder_seg.dcm"}
    """

    #: the result columns that name a file this writer wrote (removed again when a later output of the case fails)
    file_columns = ("dicom_seg",)

    def __init__(
        self,
        output_dir: str | os.PathLike,
        metadata: Mapping[str, Any] | None = None,
        pred_key: str = "pred",
        image_key: str = "image",
        postfix: str = "_seg",
        series_number: int = 900,
        manufacturer: str = "custom_nets",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.metadata = dict(metadata or {})
        self.pred_key, self.image_key, self.postfix = pred_key, image_key, postfix
        self.series_number, self.manufacturer = int(series_number), manufacturer

    def check(self) -> None:
        """Import highdicom and build the segment descriptions, so a bad setup stops a run before its first case."""
        self._descriptions()

    def _descriptions(self) -> list[tuple[int, Any]]:
        """
        ``(label value, highdicom SegmentDescription)`` per segment, in segment-number order; built for each
        case, since each segment gets a new Tracking UID (it names one finding, not a label of the bundle).
        """
        hd = require_highdicom()
        from pydicom.sr.codedict import codes

        name, version = self.metadata.get("name"), self.metadata.get("version")
        segments = (self.metadata.get("dicom_seg") or {}).get("segments")
        if not name or not version or not segments:
            raise InputError("metadata.json: --dicom_seg true needs 'name', 'version' and 'dicom_seg#segments' (one entry per label)")
        algorithm = hd.AlgorithmIdentificationSequence(name=str(name), family=codes.cid7162.ArtificialIntelligence, version=str(version))
        described = []
        for number, spec in enumerate(segments, start=1):
            where = f"dicom_seg#segments#{number - 1}"
            if int(spec.get("label_value", 0)) <= 0 or not spec.get("label"):
                raise InputError(f"metadata.json: {where} needs a positive 'label_value' and a 'label'")
            anatomy = [_code(spec["anatomy"], f"{where}#anatomy")] if spec.get("anatomy") else None
            description = hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=str(spec["label"]),
                segmented_property_category=_code(spec.get("category"), f"{where}#category"),
                segmented_property_type=_code(spec.get("type"), f"{where}#type"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=str(spec["label"]),
                anatomic_regions=anatomy,
            )
            described.append((int(spec["label_value"]), description))
        return described

    def _skip(self, case: str, reason: str) -> dict[str, str]:
        logger.warning(f"{case}: no DICOM SEG: {reason}; the NIfTI mask is written as usual")
        return {"dicom_seg": f"skipped: {reason}"}

    def __call__(self, case: Mapping[str, Any]) -> dict[str, str]:
        meta = getattr(case.get(self.image_key), "meta", None) or {}
        filename = str(meta.get("filename_or_obj", ""))
        from_series = meta.get("source_format") == "dicom"
        if not from_series and not filename.lower().endswith(DICOM_SUFFIXES):
            name, suffix = split_suffix(filename)
            kind = meta.get("source_format") or suffix.lstrip(".").upper() or "this"
            return self._skip(str(meta.get("case") or name or "case"), f"{kind} input is not DICOM")
        segments = self._descriptions()
        labels = torch.as_tensor(case[self.pred_key]).detach().cpu().numpy()
        if from_series:
            return self._series(meta, labels, segments)
        return self._single_image(filename, labels, segments)

    def _series(self, meta: Mapping[str, Any], labels: np.ndarray, segments: list[tuple[int, Any]]) -> dict[str, str]:
        """A volume read from a DICOM series: one SEG frame per source slice."""
        import pydicom

        name = str(meta.get("case", "case"))
        files = dicom_series_files(meta["source_path"])
        headers = [_with_type2_attributes(pydicom.dcmread(f, stop_before_pixels=True)) for f in files]
        for keyword, what in (("FrameOfReferenceUID", "Frame of Reference"), ("StudyInstanceUID", "study")):
            values = {str(ds.get(keyword, "") or "") for ds in headers}
            if "" in values:
                return self._skip(name, f"the DICOM series has slices without a {keyword} ({what})")
            if len(values) > 1:
                return self._skip(name, f"the DICOM series mixes {len(values)} {keyword}s ({what})")
        labels = labels[0] if labels.ndim == 4 else labels
        frames = frames_on_source_slices(labels, np.asarray(meta["original_affine"]), headers)
        path = self._write(name, headers, frames, segments)
        return {"dicom_seg": path.name}

    def _single_image(self, filename: str, labels: np.ndarray, segments: list[tuple[int, Any]]) -> dict[str, str]:
        """
        A 2D image read from a single-frame DICOM (e.g. an ultrasound export): one SEG frame on the source
        image, pixel for pixel; the results row also gets the source's SOP Instance UID, the key under
        which a PACS finds the image the row's measurements (e.g. the head circumference) were made on.
        """
        import pydicom

        name = split_suffix(filename)[0]
        ds = _with_type2_attributes(pydicom.dcmread(filename, stop_before_pixels=True))
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not str(ds.get(keyword, "") or ""):
                return self._skip(name, f"the DICOM image has no {keyword}")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return self._skip(name, f"the DICOM image has {ds.NumberOfFrames} frames; one frame is expected")
        if "FrameOfReferenceUID" not in ds and "PixelSpacing" in ds:
            # highdicom 0.28 copies PixelSpacing of an image without a Frame of Reference into pixel measures
            # without SliceThickness and then refuses to read its own SEG; this SEG lies on the source image
            # pixel for pixel, so it needs no spacing of its own (the header in memory only, never the file)
            del ds.PixelSpacing
        picture = np.squeeze(labels)
        if picture.ndim != 2 or picture.T.shape != (int(ds.Rows), int(ds.Columns)):
            raise ValueError(f"{name}: mask of shape {list(labels.shape)} does not lie on the DICOM image's {ds.Rows} x {ds.Columns} pixels")
        # the 2D reader lays a DICOM out as (x = column, y = row): the SEG frame is (rows, columns)
        path = self._write(name, [ds], picture.T[None], segments)
        return {"dicom_seg": path.name, "source_sop_instance_uid": str(ds.SOPInstanceUID)}

    def _write(self, name: str, headers: list[Any], frames: np.ndarray, segments: list[tuple[int, Any]]) -> Path:
        """``frames`` ``(n, Rows, Columns)``, one per source header, as ``<name><postfix>.dcm``: BINARY, one segment per label."""
        unknown = sorted(set(np.unique(frames).tolist()) - {0} - {value for value, _ in segments})
        if unknown:
            values = ", ".join(f"{v:g}" for v in unknown)
            raise ValueError(f"{name}: label value(s) {values} have no segment in metadata.json dicom_seg#segments")
        stacked = np.stack([frames == value for value, _ in segments], axis=-1).astype(np.uint8)  # (frames, rows, cols, segments)
        descriptions = [d for _, d in segments]
        path = self.output_dir / f"{name}{self.postfix}.dcm"
        hd = require_highdicom()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seg = hd.seg.Segmentation(
                source_images=headers,
                pixel_array=stacked,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=self.series_number,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=self.manufacturer,
                manufacturer_model_name=str(self.metadata["name"])[:64],
                software_versions=str(self.metadata["version"]),
                device_serial_number="0",
                series_description=f"{self.metadata['name']} {self.metadata['version']}"[:64],
                content_description="automatic segmentation, research use only",
            )
        secrets = [str(ds.get(k)) for ds in headers[:1] for k in _IDENTIFYING if str(ds.get(k) or "").strip()]
        for warning in caught:
            text = str(warning.message)
            for secret in secrets:
                text = text.replace(secret, "<redacted>")
            logger.debug(f"highdicom: {text}")
        with atomic_path(path) as tmp:
            seg.save_as(tmp, enforce_file_format=True)
        return path
