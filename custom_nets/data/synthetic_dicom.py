"""
Write a volume as a single-frame DICOM CT series (one file per axial slice), for demos and tests of
the DICOM input path without real patient data.

Command line (a small synthetic chest-like phantom)::

    python -m custom_nets.data.synthetic_dicom --output_dir /tmp/dicom_case
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_dicom_series", "make_synthetic_dicom_series"]


def write_dicom_series(
    volume: np.ndarray,
    folder: str | os.PathLike,
    spacing: Sequence[float] = (1.0, 1.0, 2.5),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    series_uid: str | None = None,
    patient_name: str = "Synthetic^Phantom",
    modality: str = "CT",
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> list[str]:
    """
    Write ``volume`` ``(I, J, K)`` (x, y, z index order, Hounsfield units for CT) as ``K`` CT or MR slices
    with the identity orientation: voxel ``(i, j, k)`` lies at LPS ``origin + (i * sx, j * sy, k * sz)``.

    Args:
        volume: int16-range values.
        folder: destination folder (created).
        spacing: ``(sx, sy, sz)`` in mm; ``sz`` is the distance between slice positions.
        origin: LPS position of voxel ``(0, 0, 0)``.
        series_uid: SeriesInstanceUID; a new one when ``None``.
        patient_name: PatientName written into every file (tests check it never leaks into outputs).
        modality: ``"CT"`` or ``"MR"`` (SOP class and Modality).
        study_uid, frame_of_reference_uid: new ones when ``None``; pass the same ones to write several
            series of one study on one grid (e.g. the MRI sequences of a brain case).

    Returns:
        the slice file paths, in slice order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = study_uid or generate_uid(), frame_of_reference_uid or generate_uid()
    data = np.asarray(volume)
    paths = []
    for k in range(data.shape[2]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = modality
        ds.PatientName, ds.PatientID = patient_name, "SYNTH-0001"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{origin[2] + k * spacing[2]:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [f"{spacing[1]:.4f}", f"{spacing[0]:.4f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{spacing[2]:.4f}"
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T.astype(np.int16)).tobytes()  # rows = y, columns = x
        path = folder / f"slice_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(os.fspath(path))
    return paths


def make_synthetic_dicom_series(
    output_dir: str,
    shape: Sequence[int] = (64, 64, 16),
    spacing: Sequence[float] = (0.7, 0.7, 2.5),
    origin: Sequence[float] = (-22.4, -30.0, -120.0),
    seed: int = 0,
) -> str:
    """
    Write a small chest-like phantom (air, body ellipse, two lungs, one nodule) as a DICOM series
    folder and return it.
    """
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    size = np.asarray(shape, dtype=np.float32)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[((grid[0] - size[0] / 2) / (0.45 * size[0])) ** 2 + ((grid[1] - size[1] / 2) / (0.4 * size[1])) ** 2 <= 1] = 40
    for side in (-1, 1):
        cx = size[0] * (0.5 + side * 0.2)
        lung = ((grid[0] - cx) / (0.15 * size[0])) ** 2 + ((grid[1] - size[1] / 2) / (0.28 * size[1])) ** 2 <= 1
        hu[lung] = -850
    nodule = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, (size[0] * 0.3, size[1] * 0.5, size[2] * 0.5), spacing))
    hu[nodule <= 16.0] = 30  # a 8 mm nodule in the right lung
    hu += rng.normal(0, 15, shape).astype(np.float32)
    write_dicom_series(np.round(hu).astype(np.int16), output_dir, spacing, origin)
    return os.fspath(output_dir)


if __name__ == "__main__":
    import fire

    fire.Fire(make_synthetic_dicom_series)
