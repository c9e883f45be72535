"""
Stream mode (``python -m custom_nets stream``) on a short synthetic cine loop (a moving, growing head in
speckle) as a folder of frames, multi-frame DICOMs (gray, RGB, YBR_FULL, YBR_FULL_422) and a video;
a frame through stream mode against folder inference of that frame saved as PNG.

Random weights (seed 0) at a 64x64 network input: the mechanics, not the accuracy, are under test.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from custom_nets import AdaptiveCENet
from custom_nets.data.synthetic_cine import synthetic_cine, write_frames, write_multiframe_dicom, write_video
from custom_nets.engines.stream import DicomSource, FolderSource, StreamInference, open_source, run_stream, stream_command
from custom_nets.errors import InputError

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "fetal_head_us_segmentation"
PIXEL_MM = 0.2

try:
    import av  # noqa: F401

    HAVE_AV = True
except ImportError:
    HAVE_AV = False


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(AdaptiveCENet(spatial_dims=2, in_channels=1, out_channels=2).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def engine(weights) -> StreamInference:
    return StreamInference(BUNDLE, "fp32", {"ckpt_path": str(weights), "image_size": 64})


@pytest.fixture(scope="module")
def cine() -> np.ndarray:
    return synthetic_cine(num_frames=4, height=96, width=128, seed=0)[0]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_synthetic_cine_moves_and_grows():
    frames, ellipses, masks = synthetic_cine(num_frames=5, height=96, width=128)
    assert frames.shape == (5, 96, 128) and frames.dtype == np.uint8
    assert all(b.semi_major > a.semi_major and b.center_1 > a.center_1 for a, b in zip(ellipses, ellipses[1:]))
    assert masks[-1].sum() > masks[0].sum()
    assert frames[:, masks[0]].mean() != frames[:, ~masks[0]].mean()  # the head is visible


def test_folder_source_natural_order(tmp_path, cine):
    write_frames(np.repeat(cine[:1], 11, axis=0), tmp_path)
    (tmp_path / "notes.txt").write_text("not a frame")
    source = FolderSource(tmp_path, fps=25)
    assert [p.name for p in source.files][:3] == ["frame_0.png", "frame_1.png", "frame_2.png"]
    assert source.files[-1].name == "frame_10.png"
    assert [round(f.time_s, 3) for f in source][:3] == [0.0, 0.04, 0.08]


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422"])
def test_dicom_frames_decode_to_the_cine(tmp_path, cine, photometric):
    """Gray and colour exports give the same picture: colour through pydicom's YBR -> RGB, then the bundle's mean of R, G, B."""
    path = write_multiframe_dicom(cine, tmp_path / "cine.dcm", photometric=photometric, frame_time_ms=40)
    source = open_source(path)
    assert isinstance(source, DicomSource) and source.num_frames == len(cine) and source.fps == pytest.approx(25)
    assert source.spacing_mm == pytest.approx((PIXEL_MM, PIXEL_MM))  # ultrasound region calibration (cm) -> mm
    frames = list(source)
    assert [f.time_s for f in frames] == pytest.approx([0.0, 0.04, 0.08, 0.12])
    for frame, expected in zip(frames, cine):
        gray = np.asarray(frame.picture, dtype=np.float32)
        gray = gray.mean(-1) if gray.ndim == 3 else gray
        # YBR is stored as 8-bit integers (and 4:2:2 shares chroma): 1 level of rounding either way
        assert np.abs(gray - expected).max() <= (0 if photometric in ("MONOCHROME2", "RGB") else 1)


def test_stream_frame_matches_folder_inference_of_its_png(tmp_path, cine, engine, weights):
    """One source of truth: a frame in memory gives the same mask and HC as ``run inference`` on its PNG."""
    frame = cine[2]
    folder = tmp_path / "png"
    folder.mkdir()
    Image.fromarray(frame).save(folder / "frame.png")
    (tmp_path / "pixel_size.csv").write_text(f"filename,pixel size(mm)\nframe.png,{PIXEL_MM}\n")
    out = tmp_path / "folder_out"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(BUNDLE / "configs" / "inference.json"),
        "--bundle_root", str(BUNDLE), "--ckpt_path", str(weights), "--image_size", "64", "--precision", "fp32",
        "--input_dir", str(folder), "--output_dir", str(out), "--pixel_size_csv", str(tmp_path / "pixel_size.csv"),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    folder_mask = np.asarray(Image.open(out / "frame_mask.png")) > 0
    folder_hc = float(read_rows(out / "head_circumference.csv")[0]["hc_mm"])

    # the frame decoded from a multi-frame DICOM, as stream mode gets it
    dicom = write_multiframe_dicom(cine, tmp_path / "cine.dcm")
    picture = list(open_source(dicom))[2].picture
    streamed = engine.process(picture, f"{dicom}#frame=2", PIXEL_MM)
    assert streamed.mask.shape == frame.shape  # picture orientation (H, W), not MONAI's (x, y)
    assert 0 < folder_mask.sum() < folder_mask.size  # random weights still draw a non-trivial region
    np.testing.assert_array_equal(streamed.mask, folder_mask)
    assert streamed.columns["hc_mm"] == pytest.approx(folder_hc, rel=1e-5)  # the CSV keeps 6 digits


def test_stream_dicom_table_summary_and_overlay(tmp_path, cine, engine, capsys):
    dicom = write_multiframe_dicom(cine[:3], tmp_path / "cine.dcm", photometric="YBR_FULL_422", calibration="pixel_spacing")
    report = run_stream(engine, open_source(dicom), tmp_path / "out", overlay=True)
    rows = read_rows(tmp_path / "out" / "head_circumference_frames.csv")
    assert list(rows[0]) == ["frame", "time_s", "hc_mm", "latency_ms", "status"]
    assert [r["frame"] for r in rows] == ["0", "1", "2"] and all(r["status"] == "ok" for r in rows)
    assert [float(r["time_s"]) for r in rows] == pytest.approx([0.0, 0.04, 0.08])
    assert all(np.isfinite(float(r["hc_mm"])) and float(r["latency_ms"]) > 0 for r in rows)
    summary = json.loads((tmp_path / "out" / "stream_summary.json").read_text())
    assert summary == report.summary
    assert summary["ok"] == 3 and summary["pixel_size_mm"] == pytest.approx(PIXEL_MM)  # from PixelSpacing
    assert summary["latency_ms_p50"] <= summary["latency_ms_p95"] and 0 < summary["network_share"] < 1
    printed = capsys.readouterr().out
    assert "frames/s" in printed and "p50" in printed and "p95" in printed and "network" in printed
    if HAVE_AV:
        with av.open(summary["overlay"]) as video:
            pictures = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
        assert len(pictures) == 3 and pictures[0].shape == (96, 128, 3)
    else:
        assert len(list(Path(summary["overlay"]).glob("overlay_*.png"))) == 3


def test_stream_folder_bad_frame_no_pixel_size_png_overlays(tmp_path, cine, engine, caplog, monkeypatch):
    """
    A damaged frame gets its row and the stream goes on; without a pixel size HC stays empty and one
    warning says why; without PyAV the overlays are PNG frames.
    """
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV absent, as without the [video] extra
    frames = tmp_path / "frames"
    write_frames(cine[:3], frames)
    (frames / "frame_1.png").write_bytes((frames / "frame_1.png").read_bytes()[:200])  # truncated
    with caplog.at_level("WARNING"):
        report = run_stream(engine, open_source(frames), tmp_path / "out", overlay=True)
    rows = report.rows
    assert [r["status"] for r in rows][0::2] == ["ok", "ok"]
    assert rows[1]["status"].startswith("failed: ") and "frame_1.png" in rows[1]["status"]
    assert all(r.get("hc_mm") is None for r in rows)
    warnings = [r.getMessage() for r in caplog.records if "no pixel size" in r.getMessage()]
    assert len(warnings) == 1 and "--pixel_size_mm" in warnings[0]
    assert sorted(p.name for p in (tmp_path / "out" / "overlay").iterdir()) == ["overlay_000000.png", "overlay_000002.png"]


def test_live_replay_reports_dropped_frames(tmp_path, cine, engine):
    """Frames arriving faster than the model: the newest wait, older ones are dropped and listed; lag is reported."""
    frames = tmp_path / "frames"
    write_frames(np.concatenate([cine, cine]), frames)
    report = run_stream(engine, FolderSource(frames, fps=1000), tmp_path / "out", PIXEL_MM, live=True, queue_size=1)
    statuses = [r["status"] for r in report.rows]
    assert [r["frame"] for r in report.rows] == list(range(8))  # every frame has its row
    assert report.summary["dropped"] == statuses.count("dropped: the model was behind the source") > 0
    assert statuses.count("ok") == report.summary["ok"] >= 1 and report.summary["lag_ms_p50"] > 0
    assert "lag_ms" in read_rows(tmp_path / "out" / "head_circumference_frames.csv")[0]


@pytest.mark.skipif(not HAVE_AV, reason="PyAV (extra [video]) not installed")
def test_stream_video_source(tmp_path, cine, engine):
    video = write_video(cine[:3], tmp_path / "cine.mp4", fps=10)
    report = run_stream(engine, open_source(video), tmp_path / "out", pixel_size_mm=PIXEL_MM)
    assert [r["status"] for r in report.rows] == ["ok"] * 3
    assert [r["time_s"] for r in report.rows] == pytest.approx([0.0, 0.1, 0.2])
    assert all(np.isfinite(r["hc_mm"]) for r in report.rows)


def test_bad_sources_are_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported stream source"):
        open_source(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="stream source not found"):
        open_source(tmp_path / "missing.dcm")
    with pytest.raises(InputError, match="no frame"):
        open_source(tmp_path)


def test_video_without_pyav_is_one_line_naming_the_extra(tmp_path, cine, capsys, monkeypatch):
    if HAVE_AV:
        write_video(cine[:2], tmp_path / "cine.mp4")
    else:
        (tmp_path / "cine.mp4").write_bytes(b"\0" * 64)  # never opened: PyAV is missing
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV absent, as without the [video] extra
    with pytest.raises(SystemExit) as stop:
        stream_command(str(BUNDLE), str(tmp_path / "cine.mp4"), str(tmp_path / "out"))
    assert stop.value.code == 1
    expected = f"error: {tmp_path / 'cine.mp4'}: reading video needs PyAV, which is not installed: pip install 'custom_nets[video]'"
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.slow
def test_cli_dicom_without_pyav(tmp_path, cine, weights):
    """``python -m custom_nets stream`` as typed, PyAV absent: a DICOM source runs and the overlays are PNG frames."""
    dicom = write_multiframe_dicom(cine[:2], tmp_path / "cine.dcm")
    block_av = "import sys; sys.modules['av'] = None; from custom_nets.__main__ import main; sys.argv[0] = 'custom_nets'; main()"
    args = ["stream", "--bundle", str(BUNDLE), "--source", dicom, "--output_dir", str(tmp_path / "out"), "--overlay", "true"]
    args += ["--ckpt_path", str(weights), "--image_size", "64", "--precision", "fp32"]
    result = subprocess.run([sys.executable, "-c", block_av, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ok, 0 failed" in result.stdout and "frames/s" in result.stdout and "p95" in result.stdout
    assert "inference path: fp32" in result.stderr  # the fast path's one log line
    assert len(read_rows(tmp_path / "out" / "head_circumference_frames.csv")) == 2
    assert len(list((tmp_path / "out" / "overlay").glob("overlay_*.png"))) == 2
