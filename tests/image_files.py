"""Small real image files (PNG, NIfTI, DICOM) written for tests; not a test module."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image


def write_png(path: Path, array: np.ndarray) -> Path:
    """An 8-bit PNG of ``array`` (``(H, W)`` or ``(H, W, 3)``)."""
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def write_nifti_2d(path: Path, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> Path:
    """A 2D NIfTI image with pixel size ``spacing`` (mm) along array axes 0 and 1."""
    affine = np.diag([float(spacing[0]), float(spacing[1]), 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), str(path))
    return path


def write_dicom_2d(
    path: Path,
    array: np.ndarray,
    pixel_spacing: Sequence[float] | None = None,
    us_region_delta_cm: Sequence[float] | None = None,
    patient_name: str = "Doe^Jane",
) -> Path:
    """
    A single-frame 8-bit ultrasound DICOM of ``array`` (``(rows, columns)``), with ``PixelSpacing`` (row, column
    in mm) or an ultrasound region calibration (``PhysicalDeltaX/Y`` in cm), and a patient name to check
    that no identifier leaks into outputs.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    array = np.asarray(array, dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # ultrasound image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = patient_name, "PID-0001", "US"
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    if us_region_delta_cm is not None:
        region = Dataset()
        region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = 3, 3  # cm
        region.PhysicalDeltaX, region.PhysicalDeltaY = float(us_region_delta_cm[0]), float(us_region_delta_cm[1])
        ds.SequenceOfUltrasoundRegions = DicomSequence([region])
    ds.PixelData = array.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
