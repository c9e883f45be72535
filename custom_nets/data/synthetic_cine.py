"""
A synthetic ultrasound cine loop: a fetal-head-like ellipse that moves and grows in speckle, written
as a folder of numbered frames, a multi-frame DICOM (gray, RGB, YBR_FULL or YBR_FULL_422, the common
ultrasound exports) or a video (PyAV, extra ``[video]``), for demos and tests of stream mode.

Command line::

    python -m custom_nets.data.synthetic_cine --output /tmp/cine.dcm --num_frames 30
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from custom_nets.atomic_write import atomic_path
from custom_nets.data.formats import DICOM_SUFFIXES, VIDEO_SUFFIXES
from custom_nets.ellipse import Ellipse

__all__ = ["cine_ellipses", "render_frame", "synthetic_cine", "write_frames", "write_multiframe_dicom", "write_video", "main"]

#: Photometric interpretations :func:`write_multiframe_dicom` writes (what ultrasound scanners export, uncompressed).
PHOTOMETRICS = ("MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422")


def cine_ellipses(num_frames: int, height: int, width: int) -> list[Ellipse]:
    """The head in each frame: it drifts to the right, grows by a quarter and turns slowly (pixel units)."""
    short = min(height, width)
    ellipses = []
    for t in np.linspace(0.0, 1.0, int(num_frames)):
        semi_major = short * (0.24 + 0.06 * t)
        ellipses.append(Ellipse(height * 0.5, width * (0.42 + 0.16 * t), semi_major, semi_major * 0.8, 0.3 + 0.4 * t))
    return ellipses


def render_frame(ellipse: Ellipse, tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """
    One B-mode-like frame (uint8 ``(H, W)``): ``tissue`` background, a bright skull ring along
    ``ellipse``, a darker brain with a midline echo, multiplicative speckle drawn from ``rng``.
    """
    shape = tissue.shape
    ring = max(2.0, 0.06 * ellipse.semi_minor)
    outer = ellipse.to_mask(shape)
    brain = ellipse._replace(semi_major=ellipse.semi_major - ring, semi_minor=ellipse.semi_minor - ring).to_mask(shape)
    intensity = np.where(brain, 0.2, tissue)
    intensity = np.where(outer & ~brain, 0.9, intensity)
    d0, d1 = np.meshgrid(np.arange(shape[0]) - ellipse.center_0, np.arange(shape[1]) - ellipse.center_1, indexing="ij")
    midline = np.abs(-d0 * math.sin(ellipse.angle) + d1 * math.cos(ellipse.angle)) < 1.0
    intensity = ndimage.gaussian_filter(np.where(brain & midline, 0.6, intensity), sigma=1.0)
    speckle = rng.rayleigh(scale=0.8, size=shape)  # speckle decorrelates from frame to frame; the tissue does not
    return np.clip(intensity * speckle * 255 / 1.6, 0, 255).astype(np.uint8)


def synthetic_cine(
    num_frames: int = 12, height: int = 96, width: int = 128, seed: int = 0
) -> tuple[np.ndarray, list[Ellipse], np.ndarray]:
    """
    A cine loop of a moving, growing head.

    Args:
        num_frames: number of frames.
        height: frame height in pixels.
        width: frame width in pixels.
        seed: random seed (the same seed gives the same loop).

    Returns:
        frames (uint8 ``(T, H, W)``), the head ellipse of each frame (pixels) and the filled head
        masks (bool ``(T, H, W)``).

    Example::

        frames, ellipses, masks = synthetic_cine(30, 270, 400)
        ellipses[-1].perimeter * 0.2  # head circumference in mm of the last frame at 0.2 mm per pixel
    """
    rng = np.random.default_rng(seed)
    tissue = ndimage.gaussian_filter(rng.random((int(height), int(width))), sigma=min(height, width) / 40)
    tissue = 0.25 + 0.5 * (tissue - tissue.min()) / max(float(np.ptp(tissue)), 1e-6)
    ellipses = cine_ellipses(num_frames, int(height), int(width))
    frames = np.stack([render_frame(e, tissue, rng) for e in ellipses])
    masks = np.stack([e.to_mask((int(height), int(width))) for e in ellipses])
    return frames, ellipses, masks


def write_frames(frames: np.ndarray, folder: str | os.PathLike, prefix: str = "frame_", suffix: str = ".png") -> list[str]:
    """
    Write ``frames`` (``(T, H, W)`` gray or ``(T, H, W, 3)`` RGB, uint8) as ``<prefix><index><suffix>``
    without zero padding (``frame_2`` before ``frame_10`` only in natural order, as stream mode sorts).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames):
        path = folder / f"{prefix}{index}{suffix}"
        with atomic_path(path) as tmp:
            Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(tmp)
        paths.append(os.fspath(path))
    return paths


def write_multiframe_dicom(
    frames: np.ndarray,
    path: str | os.PathLike,
    photometric: str = "MONOCHROME2",
    pixel_size_mm: float | None = 0.2,
    calibration: str = "region",
    frame_time_ms: float | None = 40.0,
    patient_name: str = "Synthetic^Cine",
) -> str:
    """
    Write ``frames`` as one uncompressed multi-frame ultrasound DICOM.

    Args:
        frames: uint8 ``(T, H, W)`` (gray) or ``(T, H, W, 3)`` (RGB); gray frames written as colour get R = G = B.
        path: the ``.dcm`` file.
        photometric: one of :data:`PHOTOMETRICS`; YBR data are made with pydicom's own colour conversion
            (YBR_FULL_422 then keeps one Cb/Cr pair per two pixels of a row, as scanners store it).
        pixel_size_mm: square pixel size, or None for a file without any.
        calibration: ``"region"`` (ultrasound region calibration, PhysicalDeltaX/Y in cm, as scanners
            write it) or ``"pixel_spacing"`` (PixelSpacing).
        frame_time_ms: FrameTime (ms between frames), or None.
        patient_name: PatientName.

    Example::

        frames, _, _ = synthetic_cine(20)
        write_multiframe_dicom(frames, "/tmp/cine_ybr.dcm", photometric="YBR_FULL_422")
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import convert_color_space
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {', '.join(PHOTOMETRICS)}, got {photometric!r}")
    data = np.asarray(frames, dtype=np.uint8)
    if photometric == "MONOCHROME2":
        if data.ndim == 4:
            raise ValueError("MONOCHROME2 needs gray frames (T, H, W)")
    elif data.ndim == 3:
        data = np.repeat(data[..., None], 3, axis=-1)
    if photometric.startswith("YBR"):
        data = np.stack([convert_color_space(f, "RGB", "YBR_FULL") for f in data])
    if photometric == "YBR_FULL_422":
        if data.shape[2] % 2:
            raise ValueError("YBR_FULL_422 needs an even number of columns")
        y = data[..., 0].reshape(*data.shape[:2], -1, 2)
        cb = data[..., 1].reshape(*data.shape[:2], -1, 2).mean(-1).round().astype(np.uint8)
        cr = data[..., 2].reshape(*data.shape[:2], -1, 2).mean(-1).round().astype(np.uint8)
        pixel_bytes = np.stack([y[..., 0], y[..., 1], cb, cr], axis=-1).tobytes()  # Y1 Y2 Cb Cr per pixel pair
    else:
        pixel_bytes = np.ascontiguousarray(data).tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundMultiFrameImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "US", patient_name, "SYNTH-CINE"
    ds.NumberOfFrames = int(data.shape[0])
    ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[2])
    ds.SamplesPerPixel = 1 if photometric == "MONOCHROME2" else 3
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frame_time_ms is not None:
        ds.FrameTime = f"{frame_time_ms:g}"
        ds.FrameIncrementPointer = 0x00181063  # FrameTime
    if pixel_size_mm is not None and calibration == "pixel_spacing":
        ds.PixelSpacing = [f"{pixel_size_mm:.6g}", f"{pixel_size_mm:.6g}"]
    elif pixel_size_mm is not None:
        region = Dataset()
        region.RegionSpatialFormat, region.RegionDataType = 1, 1  # 2D tissue
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = ds.Columns - 1, ds.Rows - 1
        region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
        region.PhysicalDeltaX = region.PhysicalDeltaY = pixel_size_mm / 10.0
        ds.SequenceOfUltrasoundRegions = [region]
    ds.PixelData = pixel_bytes
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return os.fspath(path)


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: int = 25, codec: str = "mpeg4") -> str:
    """
    Write ``frames`` (uint8 ``(T, H, W)`` or ``(T, H, W, 3)``, even sides) as a video with PyAV
    (``pip install 'custom_nets[video]'``); lossy, like a scanner's screen recording.

    Example::

        write_video(synthetic_cine(25)[0], "/tmp/cine.mp4", fps=25)
    """
    import av

    data = np.asarray(frames, dtype=np.uint8)
    if data.ndim == 3:
        data = np.repeat(data[..., None], 3, axis=-1)
    with atomic_path(path) as tmp, av.open(os.fspath(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = int(data.shape[2]), int(data.shape[1]), "yuv420p"
        stream.bit_rate = 4_000_000  # high enough that the speckle survives
        for frame in data:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return os.fspath(path)


def main(output: str, num_frames: int = 30, height: int = 270, width: int = 400, pixel_size_mm: float = 0.2, seed: int = 0) -> str:
    """
    Write a synthetic cine loop to ``output``: a folder of PNG frames (no suffix), a multi-frame
    DICOM (``.dcm``, with ultrasound region calibration) or a video (``.mp4``/``.avi``, needs PyAV).
    """
    frames, _, _ = synthetic_cine(num_frames, height, width, seed)
    suffix = Path(output).suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return write_multiframe_dicom(frames, output, pixel_size_mm=pixel_size_mm)
    if suffix in VIDEO_SUFFIXES:
        return write_video(frames, output)
    write_frames(frames, output)
    return output


if __name__ == "__main__":
    import fire

    fire.Fire(main)
