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
    photometric: str = "MONOCHROME2",
    planar_configuration: int = 0,
    colour_table: bool = True,
) -> Path:
    """
    A single-frame 8-bit ultrasound DICOM of ``array`` (``(rows, columns)`` gray, or ``(rows, columns, 3)`` RGB for
    the colour ``photometric`` interpretations), with ``PixelSpacing`` (row, column in mm) or an ultrasound region
    calibration (``PhysicalDeltaX/Y`` in cm), and a patient name to check that no identifier leaks into outputs.

    ``photometric``: ``MONOCHROME2``; ``MONOCHROME1`` (stores 255 - gray: 0 is white); ``RGB`` (``planar_configuration``
    0: RGBRGB..., 1: all R, then G, then B); ``YBR_FULL`` and ``YBR_FULL_422`` made by pydicom's own conversion (422:
    one Cb/Cr pair per two pixels of a row, as scanners store it); ``PALETTE COLOR``: the gray values stored as indices
    into a colour table that maps index i to gray 255 - i (``colour_table=False``: the table is left out).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import convert_color_space
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
    ds.Rows, ds.Columns = array.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3 if array.ndim == 3 else 1), photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if photometric == "MONOCHROME1":
        array = 255 - array
    elif photometric == "PALETTE COLOR":
        array = 255 - array  # indices into the table below, which maps them back
        if colour_table:
            for colour in ("Red", "Green", "Blue"):
                setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 8])
                setattr(ds, f"{colour}PaletteColorLookupTableData", (255 - np.arange(256, dtype=np.uint8)).tobytes())
    elif photometric.startswith("YBR"):
        array = convert_color_space(array, "RGB", "YBR_FULL")
    if array.ndim == 3:
        ds.PlanarConfiguration = planar_configuration
    if photometric == "YBR_FULL_422":
        y, cb, cr = (array[..., c].reshape(array.shape[0], -1, 2) for c in range(3))
        cb, cr = (c.mean(-1).round().astype(np.uint8) for c in (cb, cr))
        ds.PixelData = np.stack([y[..., 0], y[..., 1], cb, cr], axis=-1).tobytes()  # Y1 Y2 Cb Cr per pixel pair
    else:
        ds.PixelData = (np.moveaxis(array, -1, 0) if array.ndim == 3 and planar_configuration else array).tobytes()
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    if us_region_delta_cm is not None:
        region = Dataset()
        region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = 3, 3  # cm
        region.PhysicalDeltaX, region.PhysicalDeltaY = float(us_region_delta_cm[0]), float(us_region_delta_cm[1])
        ds.SequenceOfUltrasoundRegions = DicomSequence([region])
    ds.save_as(path, enforce_file_format=True)
    return path
