"""
Stream mode: the fetal-head bundle over an ultrasound cine loop, frame by frame, with the head
circumference (mm) of every frame, per-frame latency and frames/s.

Sources (:func:`open_source`): a folder of frames in order (PNG/JPEG, natural sort: ``frame_2`` before
``frame_10``), a multi-frame DICOM (gray, RGB, YBR_FULL, YBR_FULL_422, PALETTE COLOR with its table;
decoded as the folder inference decodes a single-frame one, :func:`custom_nets.data.image2d.decode_dicom_frame`:
colour to RGB by pydicom, then to one gray channel by the bundle's own preprocessing), or a video file
(mp4/avi/mov/mkv; needs PyAV, ``pip install 'custom_nets[video]'``).

One source of truth: :class:`StreamInference` builds the bundle's ``preprocessing``, ``fast_network``,
``inferer``, ``postprocessing`` and ``head_circumference`` from its ``configs/inference.json`` with
MONAI's ``ConfigParser`` and runs its ``initialize`` (weights). A decoded frame enters the bundle's own
``LoadImaged`` through a reader that serves the in-memory picture to MONAI's ``PILReader``, so it
reaches the network exactly as a PNG of it would (MONAI reads 2D pictures as ``(x, y)``); the rest of
``preprocessing`` then runs unchanged (``Compose(..., start=1)``) and ``Invertd`` inverts it as usual.

Keeping up: a reader thread decodes the next frames into a bounded queue while the network runs. For a
file source every frame is processed (the reader waits when the queue is full). With ``live=True`` the
source is replayed at its own frame rate, as a scanner would deliver it; when the model is slower, the
queue keeps the newest frames, older waiting ones are dropped and reported (``status`` ``dropped``), and
``lag_ms`` (frame arrival to its HC) says how far behind the results are.

Command line::

    python -m custom_nets stream --bundle bundles/fetal_head_us_segmentation --source cine.dcm --output_dir /tmp/out
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.image_reader import ImageReader, PILReader
from monai.transforms import LoadImaged
from PIL import Image, ImageDraw

from custom_nets.atomic_write import atomic_path, write_csv_atomic, write_json_atomic
from custom_nets.data.formats import DICOM_SUFFIXES, FRAME_SUFFIXES, VIDEO_SUFFIXES
# the picture modes and DICOM decoding of the 2D bundles: one definition for folder and stream
from custom_nets.data.image2d import _PIL_MODES, check_dicom_photometric, decode_dicom_frame, dicom_pixel_size
from custom_nets.engines.folder_inference import check_output_dir, one_line_error
from custom_nets.errors import InputError, describe_error, input_error_in
from custom_nets.flags import as_flag, env_flag

__all__ = [
    "VideoUnavailableError",
    "Frame",
    "FrameSource",
    "FolderSource",
    "DicomSource",
    "VideoSource",
    "open_source",
    "StreamInference",
    "FrameResult",
    "overlay_picture",
    "StreamReport",
    "run_stream",
    "stream_command",
]

logger = logging.getLogger(__name__)

RESULTS_CSV = "head_circumference_frames.csv"
SUMMARY_JSON = "stream_summary.json"


class VideoUnavailableError(InputError):
    """A video source without PyAV installed; the message names the file and the missing extra."""


@dataclass
class Frame:
    """
    One decoded frame: ``picture`` is a PIL image as decoded (gray, gray+alpha, RGB(A)), or None with
    ``error`` (one line) when it could not be decoded; ``time_s`` is the source time when known.
    """

    index: int
    picture: Image.Image | None
    time_s: float | None = None
    error: str | None = None
    arrived: float = field(default_factory=time.perf_counter)


class FrameSource:
    """Frames of a cine loop in order; ``spacing_mm`` is (x = column, y = row) pixel size or None, ``fps`` the frame rate or None."""

    path: Path
    spacing_mm: tuple[float, float] | None = None
    fps: float | None = None
    num_frames: int | None = None
    # what a user should know about the pixel size when there is none (said in the one warning)
    no_spacing_reason: str = "the source carries no pixel size"

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def frame_name(self, index: int) -> str:
        """The name a frame is known by (its metadata ``filename_or_obj``)."""
        return f"{self.path}#frame={index}"


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _check_mode(picture: Image.Image, what: str) -> Image.Image:
    if picture.mode not in _PIL_MODES:
        raise InputError(f"{what}: image mode {picture.mode} is not supported (gray, gray+alpha, RGB or RGBA expected)")
    return picture


class FolderSource(FrameSource):
    """
    The PNG/JPEG frames of a folder, in natural order (``frame_2`` before ``frame_10``).

    Args:
        folder: the folder (not recursive; other files are skipped).
        fps: frame rate, for the ``time_s`` column and live replay (a folder carries none).

    Example::

        for frame in FolderSource("/data/cine_frames", fps=25): print(frame.index, frame.picture.size)
    """

    no_spacing_reason = "a folder of PNG/JPEG frames carries no pixel size"

    def __init__(self, folder: str | os.PathLike, fps: float | None = None) -> None:
        self.path = Path(folder)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: frame folder not found")
        self.files = sorted(
            (p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FRAME_SUFFIXES),
            key=lambda p: _natural_key(p.name),
        )
        if not self.files:
            raise InputError(f"{self.path}: no frame ({', '.join(FRAME_SUFFIXES)}) in the folder")
        self.fps = float(fps) if fps else None
        self.num_frames = len(self.files)

    def frame_name(self, index: int) -> str:
        return str(self.files[index])

    def __iter__(self) -> Iterator[Frame]:
        for index, path in enumerate(self.files):
            time_s = index / self.fps if self.fps else None
            try:
                with Image.open(path) as im:
                    im.load()  # decode here, in the reader thread
                    picture = _check_mode(im, str(path))
            except InputError as e:
                yield Frame(index, None, time_s, str(e))
                continue
            except Exception as e:  # PIL raises many types for damaged files
                yield Frame(index, None, time_s, f"{path}: cannot read the frame ({describe_error(e)})")
                continue
            yield Frame(index, picture, time_s)


def _dicom_times(ds: Any, count: int) -> tuple[list[float] | None, float | None]:
    """Per-frame times in s and the frame rate from FrameTimeVector, FrameTime or CineRate (None when absent)."""
    if "FrameTimeVector" in ds and len(ds.FrameTimeVector) == count:
        increments = [float(v) / 1000.0 for v in ds.FrameTimeVector]  # ms since the previous frame, first 0
        times = list(np.cumsum(increments) - increments[0])
        return times, (count - 1) / times[-1] if count > 1 and times[-1] > 0 else None
    frame_time_ms = float(ds.FrameTime) if ds.get("FrameTime") else None
    if not frame_time_ms and ds.get("CineRate"):
        frame_time_ms = 1000.0 / float(ds.CineRate)
    if frame_time_ms and frame_time_ms > 0:
        return [i * frame_time_ms / 1000.0 for i in range(count)], 1000.0 / frame_time_ms
    return None, None


def _array_to_picture(array: np.ndarray, what: str) -> Image.Image:
    """A decoded DICOM/video frame as the PIL image a PNG of it would give (gray: L or I;16, colour: RGB)."""
    if array.ndim == 3 and array.shape[-1] == 3 and array.dtype == np.uint8:
        return Image.fromarray(array, mode="RGB")
    if array.ndim == 2 and array.dtype in (np.uint8, np.uint16):
        return Image.fromarray(array)
    if array.ndim == 2:  # signed or wider integers: as float, which PIL (and MONAI's PILReader) keep exactly
        return Image.fromarray(array.astype(np.float32), mode="F")
    raise InputError(f"{what}: pixel data of shape {list(array.shape)} and type {array.dtype}; 8-bit RGB or gray frames expected")


class DicomSource(FrameSource):
    """
    The frames of a (multi-frame) DICOM, decoded by :func:`custom_nets.data.image2d.decode_dicom_frame`:
    gray (MONOCHROME1 inverted), RGB, YBR_FULL or YBR_FULL_422 and PALETTE COLOR (with its table)
    converted to RGB by pydicom. Frame times from FrameTimeVector / FrameTime / CineRate; pixel size from
    PixelSpacing or the ultrasound region calibration.

    Example::

        source = DicomSource("cine.dcm"); source.num_frames, source.fps, source.spacing_mm  # 40, 25.0, (0.2, 0.2)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import pydicom

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: DICOM file not found")
        try:
            ds = pydicom.dcmread(self.path, stop_before_pixels=True)
        except Exception as e:  # pydicom raises many types for damaged files
            raise InputError(f"{self.path}: cannot read the DICOM header ({describe_error(e)})") from None
        check_dicom_photometric(ds, self.path)  # before any decoder sees the pixel data
        self.header = ds
        self.num_frames = int(ds.get("NumberOfFrames", 1) or 1)
        self.spacing_mm = dicom_pixel_size(ds)
        self.no_spacing_reason = "the DICOM has neither PixelSpacing nor an ultrasound region calibration in mm"
        self.times, self.fps = _dicom_times(ds, self.num_frames)

    def __iter__(self) -> Iterator[Frame]:
        # one frame at a time, so a damaged frame fails alone (pydicom 3.0's iter_pixels also misreads
        # native multi-frame YBR_FULL_422); colour comes out as RGB (pydicom's own YBR conversion)
        with open(self.path, "rb") as f:
            for index in range(self.num_frames):
                time_s = self.times[index] if self.times else None
                try:
                    picture = _array_to_picture(decode_dicom_frame(f, self.header, index), f"{self.path} frame {index}")
                except InputError as e:
                    yield Frame(index, None, time_s, str(e))
                    continue
                except Exception as e:  # pydicom raises many types for damaged pixel data
                    yield Frame(index, None, time_s, f"{self.path} frame {index}: cannot decode ({describe_error(e)})")
                    continue
                yield Frame(index, picture, time_s)


def _import_av(path: Path | None = None):
    try:
        import av
    except ImportError:
        where = f"{path}: " if path else ""
        raise VideoUnavailableError(f"{where}reading video needs PyAV, which is not installed: pip install 'custom_nets[video]'") from None
    return av


class VideoSource(FrameSource):
    """
    The frames of a video file (mp4/avi/mov/mkv), decoded to RGB by PyAV; a packet that does not decode
    is reported as a bad frame and decoding goes on. Videos carry no pixel size.

    Example::

        for frame in VideoSource("cine.mp4"): print(frame.index, frame.time_s)
    """

    no_spacing_reason = "a video file carries no pixel size"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: video file not found")
        av = _import_av(self.path)
        try:
            with av.open(os.fspath(self.path)) as container:
                stream = container.streams.video[0]
                self.fps = float(stream.average_rate) if stream.average_rate else None
                self.num_frames = int(stream.frames) or None
        except (av.error.FFmpegError, IndexError) as e:
            raise InputError(f"{self.path}: cannot open the video ({describe_error(e)})") from None

    def __iter__(self) -> Iterator[Frame]:
        av = _import_av(self.path)
        index = 0
        with av.open(os.fspath(self.path)) as container:
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                try:
                    decoded = packet.decode()
                except av.error.FFmpegError as e:
                    yield Frame(index, None, None, f"{self.path} frame {index}: cannot decode ({describe_error(e)})")
                    index += 1
                    continue
                for frame in decoded:
                    yield Frame(index, Image.fromarray(frame.to_ndarray(format="rgb24")), frame.time)
                    index += 1


def open_source(source: str | os.PathLike, fps: float | None = None) -> FrameSource:
    """
    The :class:`FrameSource` for ``source``: a folder of frames, a DICOM file or a video file.

    Args:
        source: folder, ``.dcm``/``.dicom`` file (or any file with the DICOM preamble), or video file.
        fps: frame rate of a folder of frames (others carry their own).

    Raises:
        InputError: one line naming the source and why it cannot be used.

    Example::

        open_source("cine.dcm")  # DicomSource
    """
    path = Path(source)
    if path.is_dir():
        return FolderSource(path, fps)
    if not path.exists():
        raise InputError(f"{path}: stream source not found")
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return VideoSource(path)
    if suffix in DICOM_SUFFIXES or _has_dicom_preamble(path):
        return DicomSource(path)
    raise InputError(
        f"{path}: unsupported stream source (a folder of {'/'.join(FRAME_SUFFIXES)} frames, "
        f"a DICOM file or a {'/'.join(VIDEO_SUFFIXES)} video)"
    )


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


class _InMemoryReader(ImageReader):
    """An ``ImageReader`` that serves one decoded picture to MONAI's ``PILReader``, so ``LoadImaged`` loads it as from a PNG."""

    def __init__(self, picture: Image.Image, pil_reader: PILReader) -> None:
        super().__init__()
        self.picture, self.pil_reader = picture, pil_reader

    def verify_suffix(self, filename) -> bool:
        return True

    def read(self, data, **kwargs):
        return self.picture

    def get_data(self, img):
        return self.pil_reader.get_data(img)


@dataclass
class FrameResult:
    """What :meth:`StreamInference.process` returns: the HC columns, the head mask in picture orientation ``(H, W)``, and times in s."""

    columns: dict[str, Any]
    mask: np.ndarray
    preprocess_s: float
    network_s: float
    postprocess_s: float

    @property
    def total_s(self) -> float:
        return self.preprocess_s + self.network_s + self.postprocess_s


class StreamInference:
    """
    A bundle's own inference pieces, built once from ``configs/inference.json``, applied to one
    in-memory frame at a time.

    Args:
        bundle: the bundle folder (``bundles/fetal_head_us_segmentation``).
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` or ``int8`` (the bundle's ``precision`` key).
        overrides: other config keys to override, as on ``monai.bundle run`` (``ckpt_path``, ``image_size``, ``device``).
        config_file: the inference config, relative to ``bundle`` unless absolute.

    Example::

        engine = StreamInference("bundles/fetal_head_us_segmentation", precision="fp32")
        result = engine.process(PIL.Image.open("frame.png"), "frame.png", pixel_size_mm=0.15)
        result.columns["hc_mm"], result.mask.shape
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        precision: str = "auto",
        overrides: Mapping[str, Any] | None = None,
        config_file: str = "configs/inference.json",
    ) -> None:
        from monai.bundle import ConfigParser

        self.bundle = Path(bundle)
        config = Path(config_file) if Path(config_file).is_absolute() else self.bundle / config_file
        if not config.is_file():
            raise InputError(f"{config}: bundle inference config not found (--bundle must be a bundle folder)")
        parser = ConfigParser()
        parser.read_config(os.fspath(config))
        parser.update({"bundle_root": os.fspath(self.bundle), "precision": precision, **dict(overrides or {})})
        parser.get_parsed_content("initialize")  # the bundle's own start-up: loads the weights
        self.parser = parser
        self.network = parser.get_parsed_content("fast_network")
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self.head_circumference = parser.get_parsed_content("head_circumference")
        self.device = torch.device(parser.get_parsed_content("device"))
        self.precision = getattr(self.network, "precision", precision)
        loader = self.preprocessing.transforms[0] if hasattr(self.preprocessing, "transforms") else None
        if not isinstance(loader, LoadImaged):
            raise InputError(f"{config}: stream mode needs 'preprocessing' to start with LoadImaged, found {type(loader).__name__}")
        self.loader = loader
        # the bundle loader's own PIL reader (its settings, e.g. reverse_indexing), else MONAI's default one
        readers = getattr(getattr(loader, "_loader", None), "readers", [])
        self.pil_reader = next((r for r in readers if isinstance(r, PILReader)), PILReader())
        self.image_key = loader.keys[0]
        self.network.eval()

    def process(self, picture: Image.Image, name: str, pixel_size_mm: float | None = None) -> FrameResult:
        """
        Segment one decoded frame and measure its head circumference.

        Args:
            picture: the frame as decoded (PIL image, any mode the bundle accepts).
            name: what the frame is called in its metadata (``filename_or_obj``).
            pixel_size_mm: square pixel size, or None (``hc_mm`` is then None).

        Returns:
            :class:`FrameResult`; ``mask`` is boolean ``(H, W)`` like the picture.
        """
        start = time.perf_counter()
        case = self.loader({self.image_key: name}, reader=_InMemoryReader(picture, self.pil_reader))
        case = self.preprocessing(case, start=1)  # the rest of the bundle's preprocessing, unchanged
        image = case[self.image_key]
        low, high = torch.aminmax(torch.as_tensor(image))
        prepared = time.perf_counter()
        with torch.no_grad():
            pred = self.inferer(torch.as_tensor(image)[None].to(self.device), self.network)[0].float().cpu()
        inferred = time.perf_counter()
        # as FolderInference: the prediction gets the image's metadata back, for Invertd
        case["pred"] = MetaTensor(pred, meta=dict(image.meta)) if isinstance(image, MetaTensor) else pred
        case = self.postprocessing(case)
        columns: dict[str, Any] = {}
        if bool(low == high):  # a blank frame holds nothing to segment (FolderInference does the same)
            case["pred"] = case["pred"].clone().zero_()
            columns["note"] = "constant frame: empty mask"
        if pixel_size_mm is not None:
            case[self.head_circumference.pixel_size_key] = pixel_size_mm
        columns.update(self.head_circumference(case))
        done = time.perf_counter()
        labels = torch.as_tensor(case["pred"]).detach().cpu()
        channel = self.head_circumference.foreground_channel
        mask = labels[channel] > 0.5 if labels.shape[0] > 1 else labels[0] > 0
        return FrameResult(columns, mask.numpy().T, prepared - start, inferred - prepared, done - inferred)


def overlay_picture(picture: Image.Image, mask: np.ndarray, text: str = "", color=(255, 64, 0), alpha: float = 0.35) -> np.ndarray:
    """
    The frame in gray (1st-99th percentile contrast) with the head tinted, its border drawn and
    ``text`` in the corner: uint8 ``(H, W, 3)``. ``mask`` is boolean ``(H, W)``.
    """
    from scipy import ndimage

    if picture.mode in ("LA", "RGBA"):  # alpha is not intensity
        picture = picture.convert(picture.mode[:-1])
    gray = np.asarray(picture, dtype=np.float32)
    gray = gray.mean(-1) if gray.ndim == 3 else gray
    low, high = np.percentile(gray, (1, 99))
    rgb = np.repeat((np.clip((gray - low) / max(high - low, 1e-6), 0, 1) * 255)[..., None], 3, axis=-1)
    color = np.asarray(color, dtype=np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * color
    rgb[mask & ~ndimage.binary_erosion(mask, iterations=2)] = color
    out = Image.fromarray(rgb.astype(np.uint8))
    if text:
        ImageDraw.Draw(out).text((4, 4), text, fill=(255, 255, 0))
    return np.asarray(out)


class _OverlayOutput:
    """Overlay frames written by a background thread: an mp4 with PyAV when it is installed, else numbered PNGs."""

    def __init__(self, output_dir: Path, fps: float | None, use_video: bool) -> None:
        self.output_dir, self.fps = output_dir, fps or 10.0
        self.video_path = output_dir / "overlay.mp4" if use_video else None
        self.png_dir = None if use_video else output_dir / "overlay"
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: str | None = None
        self.thread = threading.Thread(target=self._work, name="stream-overlay", daemon=True)
        self.thread.start()

    def put(self, index: int, rgb: np.ndarray) -> None:
        self.queue.put((index, rgb))

    def close(self) -> str | None:
        self.queue.put(None)
        self.thread.join()
        if self.error:
            logger.error(f"overlay not written: {self.error}")
            return None
        return os.fspath(self.video_path or self.png_dir)

    def _work(self) -> None:
        try:
            if self.video_path is not None:
                self._write_video()
            else:
                while (item := self.queue.get()) is not None:
                    index, rgb = item
                    with atomic_path(self.png_dir / f"overlay_{index:06d}.png") as tmp:
                        Image.fromarray(rgb).save(tmp, format="PNG")
        except Exception as e:  # the overlay is an extra: the HC table must still be written
            self.error = describe_error(e)
            while self.queue.get() is not None:  # drain, so put() never blocks
                pass

    def _write_video(self) -> None:
        import av
        from fractions import Fraction

        with atomic_path(self.video_path) as tmp, av.open(os.fspath(tmp), mode="w") as container:
            stream, size = None, None
            while (item := self.queue.get()) is not None:
                rgb = item[1]
                if stream is None:
                    size = (rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2)  # yuv420p needs even sides
                    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
                    stream = container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1000))
                    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
                picture = Image.fromarray(rgb)
                if picture.size != size:  # frames of another size are fitted to the first one's
                    picture = picture.resize(size)
                container.mux(stream.encode(av.VideoFrame.from_image(picture)))
            if stream is not None:
                container.mux(stream.encode())


@dataclass
class StreamReport:
    """What :func:`run_stream` did: the per-frame rows and the summary written to ``stream_summary.json``."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def _percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1000.0) if values else None


def _resolve_pixel_size(source: FrameSource, pixel_size_mm: float | None) -> float | None:
    """The square pixel size to use, or None with one warning saying why the HC stays empty."""
    if pixel_size_mm is not None:
        value = float(pixel_size_mm)
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"--pixel_size_mm must be a positive number of mm, got {pixel_size_mm!r}")
        if source.spacing_mm and not np.allclose(source.spacing_mm, value, rtol=1e-6):
            x, y = source.spacing_mm
            logger.warning(f"{source.path}: --pixel_size_mm {value:g} used instead of the file's {x:g} x {y:g} mm")
        return value
    if source.spacing_mm is None:
        logger.warning(f"{source.path}: no pixel size ({source.no_spacing_reason}); hc_mm stays empty. Give --pixel_size_mm to measure it")
        return None
    x, y = source.spacing_mm
    if not math.isclose(x, y, rel_tol=1e-6):
        logger.warning(f"{source.path}: non-square pixels ({x:g} x {y:g} mm); stream mode measures square pixels only, hc_mm stays empty")
        return None
    return x


def _reader(source: FrameSource, frames: queue.Queue, live: bool, stop: threading.Event, dropped: list[Frame]) -> None:
    """Decode ``source`` into ``frames``; live: at the source's pace, dropping the oldest waiting frame when full."""
    try:
        start = time.perf_counter()
        for frame in source:
            if stop.is_set():
                return
            if live and frame.time_s is not None:
                time.sleep(max(0.0, start + frame.time_s - time.perf_counter()))  # the frame "arrives" at its time
            frame.arrived = time.perf_counter()
            if not live:
                frames.put(frame)  # a file source: wait for room, every frame is processed
                continue
            while True:
                try:
                    frames.put_nowait(frame)
                    break
                except queue.Full:
                    try:
                        dropped.append(frames.get_nowait())  # the model is behind: the oldest waiting frame goes
                    except queue.Empty:
                        pass
    except BaseException as e:  # handed to the consumer, which reports it
        frames.put(e)
        return
    frames.put(None)


def run_stream(
    engine: StreamInference,
    source: FrameSource,
    output_dir: str | os.PathLike,
    pixel_size_mm: float | None = None,
    overlay: bool = False,
    live: bool = False,
    queue_size: int = 4,
) -> StreamReport:
    """
    Run ``engine`` over every frame of ``source``; write ``head_circumference_frames.csv`` (``frame``,
    ``time_s``, ``hc_mm``, ``latency_ms``, ``status``, and ``lag_ms`` when live) and
    ``stream_summary.json`` atomically to ``output_dir``, an overlay when asked, and print the summary.

    ``latency_ms`` is end to end per frame, from the decoded frame to its HC (preprocessing, network,
    postprocessing, HC); decoding runs ahead in a reader thread and is not in it. A frame that fails
    (not decodable, unusable) gets its reason in ``status`` and the stream goes on. Ctrl-C stops the
    stream and still writes the table.

    Args:
        engine: the bundle's pieces (:class:`StreamInference`).
        source: the frames (:func:`open_source`).
        output_dir: output folder (checked before the first frame).
        pixel_size_mm: square pixel size in mm; default: the source's own (DICOM), else HC stays empty.
        overlay: also write the frames with the head drawn: ``overlay.mp4`` with PyAV, else ``overlay/overlay_NNNNNN.png``.
        live: replay the source at its frame rate and drop frames when the model falls behind (see the module doc).
        queue_size: decoded frames held ahead of the network.

    Example::

        engine = StreamInference("bundles/fetal_head_us_segmentation")
        report = run_stream(engine, open_source("cine.dcm"), "/tmp/out", overlay=True)
        report.summary["frames_per_s"], report.summary["latency_ms_p95"]
    """
    output = check_output_dir(output_dir)
    pixel_size = _resolve_pixel_size(source, pixel_size_mm)
    if live and source.fps is None:
        raise InputError(f"{source.path}: live replay needs a frame rate; this source has none (give --fps)")
    overlays = None
    if as_flag(overlay, "overlay"):
        try:
            _import_av()
            use_video = True
        except VideoUnavailableError:
            logger.info("PyAV is not installed (extra [video]): overlays are written as PNG frames")
            use_video = False
        overlays = _OverlayOutput(output, source.fps, use_video)

    frames: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
    stop, dropped = threading.Event(), []
    reader = threading.Thread(target=_reader, args=(source, frames, live, stop, dropped), name="stream-reader", daemon=True)
    rows: dict[int, dict[str, Any]] = {}
    latencies, network_times, lags = [], [], []
    start = time.perf_counter()
    reader.start()
    interrupted = False
    try:
        while (frame := frames.get()) is not None:
            if isinstance(frame, BaseException):
                raise frame
            row: dict[str, Any] = {"frame": frame.index, "time_s": frame.time_s}
            rows[frame.index] = row
            if frame.error:
                row["status"] = f"failed: {frame.error}"
                logger.error(f"frame {frame.index}: {frame.error}")
                continue
            try:
                result = engine.process(frame.picture, source.frame_name(frame.index), pixel_size)
            except Exception as e:  # one bad frame must not stop the stream
                reason = one_line_error(e)
                row["status"] = f"failed: {reason}"
                logger.error(f"frame {frame.index}: {reason}")
                continue
            finished = time.perf_counter()
            latencies.append(result.total_s)
            network_times.append(result.network_s)
            row.update(hc_mm=result.columns.get("hc_mm"), latency_ms=result.total_s * 1000.0, status="ok")
            if "note" in result.columns:
                row["note"] = result.columns["note"]
            if live:
                lags.append(finished - frame.arrived)
                row["lag_ms"] = lags[-1] * 1000.0
            if overlays is not None:
                hc = row["hc_mm"]
                text = f"frame {frame.index}" + (f"  HC {hc:.1f} mm" if hc is not None and math.isfinite(hc) else "")
                overlays.put(frame.index, overlay_picture(frame.picture, result.mask, text))
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("stream stopped by the user; writing the frames processed so far")
    finally:
        stop.set()
        elapsed = time.perf_counter() - start
        while not frames.empty():  # free a reader waiting for room, so that it sees the stop
            frames.get_nowait()
    for frame in dropped:
        rows[frame.index] = {"frame": frame.index, "time_s": frame.time_s, "status": "dropped: the model was behind the source"}
    ordered = [rows[i] for i in sorted(rows)]
    header = ["frame", "time_s", "hc_mm", "latency_ms", "status"] + (["lag_ms"] if live else [])
    header += ["note"] if any("note" in r for r in ordered) else []
    write_csv_atomic(output / RESULTS_CSV, ordered, header)
    overlay_path = overlays.close() if overlays is not None else None

    ok = sum(r["status"] == "ok" for r in ordered)
    summary = {
        "source": os.fspath(source.path),
        "precision": engine.precision,
        "frames": len(ordered),
        "ok": ok,
        "failed": sum(r["status"].startswith("failed") for r in ordered),
        "dropped": len(dropped),
        "seconds": elapsed,
        "frames_per_s": ok / elapsed if elapsed > 0 else None,
        "latency_ms_p50": _percentile_ms(latencies, 50),
        "latency_ms_p95": _percentile_ms(latencies, 95),
        "network_share": sum(network_times) / sum(latencies) if latencies and sum(latencies) > 0 else None,
        "lag_ms_p50": _percentile_ms(lags, 50),
        "lag_ms_p95": _percentile_ms(lags, 95),
        "pixel_size_mm": pixel_size,
        "interrupted": interrupted,
        "results_csv": os.fspath(output / RESULTS_CSV),
        "overlay": overlay_path,
    }
    write_json_atomic(output / SUMMARY_JSON, summary)
    print(_summary_text(summary))
    return StreamReport(ordered, summary)


def _summary_text(s: Mapping[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} ms"

    lines = [
        f"stream: {s['frames']} frame(s): {s['ok']} ok, {s['failed']} failed, {s['dropped']} dropped, in {s['seconds']:.2f} s: "
        f"{s['frames_per_s'] or 0:.1f} frames/s ({s['precision']})",
        f"latency per frame (decoded frame -> HC): p50 {ms(s['latency_ms_p50'])}, p95 {ms(s['latency_ms_p95'])}; "
        f"network {'n/a' if s['network_share'] is None else format(s['network_share'], '.0%')} of it",
    ]
    if s["lag_ms_p50"] is not None:
        lines.append(f"live lag (frame arrival -> HC): p50 {ms(s['lag_ms_p50'])}, p95 {ms(s['lag_ms_p95'])}")
    lines.append(f"table: {s['results_csv']}" + (f"; overlay: {s['overlay']}" if s["overlay"] else ""))
    return "\n".join(lines)


def stream_command(
    bundle: str,
    source: str,
    output_dir: str,
    precision: str = "auto",
    pixel_size_mm: float | None = None,
    overlay: bool = False,
    live: bool = False,
    fps: float | None = None,
    queue_size: int = 4,
    **overrides: Any,
) -> None:
    """
    ``python -m custom_nets stream``: the bundle over a cine loop (see :func:`run_stream`); an input
    problem ends with one ``error: ...`` line on stderr and exit status 1, no traceback.

    Args:
        bundle: the bundle folder.
        source: a folder of frames, a (multi-frame) DICOM or a video file.
        output_dir: where the table, the summary and the overlay go.
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` or ``int8``.
        pixel_size_mm: pixel size in mm (default: the DICOM's own; folders and videos carry none).
        overlay: ``true`` to write the overlay video (or PNGs without PyAV).
        live: ``true`` to replay at the source's frame rate, dropping frames the model cannot keep up with.
        fps: frame rate of a folder of frames (time column, live replay).
        queue_size: decoded frames held ahead of the network.
        overrides: other bundle config keys (``--ckpt_path``, ``--image_size``, ``--device``).

    Example::

        python -m custom_nets stream --bundle bundles/fetal_head_us_segmentation --source cine.dcm --output_dir /tmp/out --overlay true
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        frames = open_source(source, fps)
        engine = StreamInference(bundle, precision, overrides)
        run_stream(engine, frames, output_dir, pixel_size_mm, overlay, as_flag(live, "live"), queue_size)
    except Exception as e:
        cause = input_error_in(e)
        if cause is None or env_flag("CUSTOM_NETS_TRACEBACK"):
            raise
        print(f"error: {' '.join(str(cause).split())}", file=sys.stderr)
        raise SystemExit(1) from None
