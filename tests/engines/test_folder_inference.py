"""FolderInference and its per-case writers: PNG, NIfTI and DICOM in, masks at the original size out, broken files isolated, progress."""

from __future__ import annotations

import csv
import errno
import logging
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    Lambdad,
    LoadImaged,
    Resized,
    ScaleIntensityd,
)
from PIL import Image

from custom_nets.engines.case_writers import MaskWriter, OverlayWriter, split_suffix
from custom_nets.engines.folder_inference import FolderInference, list_images, one_line_error
from custom_nets.errors import InputError
from image_files import write_dicom_2d, write_nifti_2d, write_png

ROWS, COLS = 48, 64


class _BrightIsForeground(torch.nn.Module):
    """A stand-in network: logits that call pixels brighter than 0.5 foreground."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20


def _picture() -> np.ndarray:
    image = np.full((ROWS, COLS), 40, np.uint8)
    image[10:30, 20:50] = 220  # the "head": a bright block
    return image


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_png(folder / "a.png", _picture())
    write_png(folder / "rgb.png", np.repeat(_picture()[..., None], 3, axis=-1))
    write_nifti_2d(folder / "b.nii.gz", _picture(), spacing=(0.2, 0.3))
    write_dicom_2d(folder / "c.dcm", _picture(), pixel_spacing=(0.25, 0.25), patient_name="Secret^Patient")
    png = (folder / "a.png").read_bytes()
    (folder / "broken.png").write_bytes(png[: len(png) // 2])  # truncated
    (folder / "notes.txt").write_text("not an image")
    return folder


def _runner(inputs, out, **kwargs) -> FolderInference:
    preprocessing = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            Lambdad("image", func=lambda x: x[:3].mean(0, keepdim=True)),
            Lambdad("image", func=lambda x: x[..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x),
            ScaleIntensityd("image"),
            Resized("image", spatial_size=(32, 32), mode="bilinear", anti_aliasing=True),
        ]
    )
    postprocessing = Compose(
        [
            Activationsd("pred", softmax=True),
            Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted("pred", argmax=True),
        ]
    )
    return FolderInference(
        inputs=list_images(inputs),
        network=_BrightIsForeground(),
        preprocessing=preprocessing,
        postprocessing=postprocessing,
        case_outputs=[MaskWriter(out), OverlayWriter(out)],
        results_csv=out / "results.csv",
        **kwargs,
    )


def _assert_mask(mask: np.ndarray, foreground_value: int = 1) -> None:
    """The bright block, back at the original size; resampling through 32x32 may flip a few corner pixels."""
    expected = (_picture() > 128).astype(np.uint8) * foreground_value
    assert mask.shape == expected.shape
    assert np.mean(mask != expected) < 0.005


def _results(out) -> dict[str, dict[str, str]]:
    with open(out / "results.csv") as f:
        return {row["image"]: row for row in csv.DictReader(f)}


def test_list_images_keeps_image_suffixes_and_drops_excluded(inputs):
    write_png(inputs / "a_Annotation.png", _picture())
    names = [os.path.basename(p) for p in list_images(inputs, exclude=["*_Annotation.png"])]
    assert names == ["a.png", "b.nii.gz", "broken.png", "c.dcm", "rgb.png"]


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p], ids=["missing-folder", "no-image"])
def test_list_images_input_errors_name_the_folder(tmp_path, make):
    folder = make(tmp_path)
    with pytest.raises(InputError) as info:
        list_images(folder)
    assert str(folder) in str(info.value)


def test_broken_file_is_skipped_listed_and_exits_non_zero(inputs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        _runner(inputs, out).run()
    assert info.value.code == 1
    rows = _results(out)
    assert rows["broken.png"]["status"].startswith("failed: LoadImaged:")
    assert all(rows[name]["status"] == "ok" for name in ("a.png", "rgb.png", "b.nii.gz", "c.dcm"))


def test_without_exit_code_the_rows_are_returned(inputs, tmp_path):
    rows = _runner(inputs, tmp_path / "out", exit_code_on_failure=None).run()
    assert [r["status"] == "ok" for r in rows] == [True, True, False, True, True]


def test_progress_lines_in_a_log_count_failed_cases_too(inputs, tmp_path, caplog, capsys):
    runner = _runner(inputs, tmp_path / "out", exit_code_on_failure=None)
    runner.progress = False
    with caplog.at_level(logging.INFO, logger="FolderInference"):
        runner.run()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("inference: ")]
    # 10 % of 5 inputs rounds up to one: a line per input, with the rate and the ETA
    assert [line.split(" (")[0] for line in lines] == [f"inference: {i}/5" for i in range(1, 6)]
    assert re.fullmatch(r"inference: 5/5 \(100%\) \S+ image/s elapsed \d+:\d\d:\d\d ETA 0:00:00", lines[-1])
    assert "inference" not in capsys.readouterr().err  # no bar


def test_progress_bar_on_a_terminal(inputs, tmp_path, capsys):
    runner = _runner(inputs, tmp_path / "out", exit_code_on_failure=None)
    runner.progress = True
    runner.run()
    err = capsys.readouterr().err
    assert "inference: 100%" in err and "5/5" in err and "image/s" in err


def test_png_mask_has_the_original_size_and_orientation(inputs, tmp_path):
    out = tmp_path / "out"
    _runner(inputs, out, exit_code_on_failure=None).run()
    for name in ("a", "rgb"):
        _assert_mask(np.asarray(Image.open(out / f"{name}_mask.png")), foreground_value=255)


def test_nifti_mask_keeps_shape_and_affine(inputs, tmp_path):
    out = tmp_path / "out"
    _runner(inputs, out, exit_code_on_failure=None).run()
    source, mask = nib.load(inputs / "b.nii.gz"), nib.load(out / "b_mask.nii.gz")
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    _assert_mask(np.asarray(mask.dataobj))


def test_dicom_mask_keeps_geometry_and_drops_patient_identity(inputs, tmp_path):
    out = tmp_path / "out"
    _runner(inputs, out, exit_code_on_failure=None).run()
    mask = pydicom.dcmread(out / "c_mask.dcm")
    assert (mask.Rows, mask.Columns) == (ROWS, COLS)
    assert [float(v) for v in mask.PixelSpacing] == pytest.approx([0.25, 0.25])
    _assert_mask(mask.pixel_array)
    assert "Secret" not in str(mask.get("PatientName", "")) and "PID-0001" not in str(mask.get("PatientID", ""))
    assert not any("Secret" in p.name for p in out.iterdir()) and "Secret" not in (out / "results.csv").read_text()


def test_overlay_is_an_rgb_picture_of_the_input(inputs, tmp_path):
    out = tmp_path / "out"
    _runner(inputs, out, exit_code_on_failure=None).run()
    overlay = Image.open(out / "a_overlay.png")
    assert overlay.mode == "RGB" and overlay.size == (COLS, ROWS)
    pixels = np.asarray(overlay).astype(int)
    assert pixels[20, 35, 0] > pixels[20, 35, 2]  # tinted inside the head
    assert pixels[40, 5, 0] == pixels[40, 5, 2]  # gray outside


def test_no_temporary_files_left(inputs, tmp_path):
    out = tmp_path / "out"
    _runner(inputs, out, exit_code_on_failure=None).run()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_run_that_stops_before_its_first_case_gives_the_reserved_room_back(inputs, tmp_path):
    """The room set aside for the table is released however the run ends, here when the journal cannot be reset."""
    out = tmp_path / "out"
    (out / "results.journal.jsonl").mkdir(parents=True)  # in the journal's way: resetting it fails
    with pytest.raises(OSError):
        _runner(inputs, out, exit_code_on_failure=None).run()
    assert sorted(p.name for p in out.iterdir()) == ["results.journal.jsonl", "results.lock"]


def test_two_inputs_never_share_an_output(tmp_path):
    writer = MaskWriter(tmp_path)

    def case(source: str) -> dict:
        return {"image": MetaTensor(torch.zeros(1, 4, 4), meta={"filename_or_obj": source}), "pred": MetaTensor(torch.zeros(1, 4, 4))}

    writer(case("/x/scan.png"))
    with pytest.raises(FileExistsError, match="already written for scan.png"):
        writer(case("/x/scan.jpg"))  # would also be scan_mask.png


@pytest.mark.parametrize(
    "path, expected",
    [("/a/b/scan.nii.gz", ("scan", ".nii.gz")), ("scan.PNG", ("scan", ".png")), ("x.y.dcm", ("x.y", ".dcm"))],
)
def test_split_suffix(path, expected):
    assert split_suffix(path) == expected


def test_one_line_error_names_the_monai_transform_and_root_cause():
    try:
        try:
            raise OSError("image file is truncated\n(8 bytes not processed)")
        except OSError as inner:
            raise RuntimeError("applying transform <monai.transforms.io.dictionary.LoadImaged object at 0x7f>") from inner
    except RuntimeError as outer:
        assert one_line_error(outer) == "LoadImaged: OSError: image file is truncated"


# ----- the output folder: one run at a time, a disk that fills up ---------------------------------------

_HOLD_LOCK = """
import sys, time
from custom_nets.engines.output_guards import output_folder_lock
with output_folder_lock(sys.argv[1], "inference single process"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def lock_holder():
    """Start a process that holds a lock file (as a running batch does); killed with SIGKILL at the end."""
    processes = []

    def hold(lock_file) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock_file)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        processes.append(process)
        return process

    yield hold
    for process in processes:
        process.kill()
        process.wait()


def test_a_second_run_into_a_busy_output_folder_is_refused_naming_the_holder(inputs, tmp_path, lock_holder):
    out = tmp_path / "out"
    out.mkdir()
    holder = lock_holder(out / "results.lock")
    with pytest.raises(InputError) as info:
        _runner(inputs, out, exit_code_on_failure=None).run()
    message = str(info.value)
    assert message.startswith(f"{out}: output folder is in use by another run (process {holder.pid} on ")
    assert "\n" not in message and "results.lock" in message
    assert sorted(p.name for p in out.iterdir()) == ["results.lock"]  # nothing of the refused run
    holder.kill()  # the lock goes with its process, even with SIGKILL: no stale lock
    holder.wait()
    rows = _runner(inputs, out, exit_code_on_failure=None).run()
    assert len(rows) == 5 and (out / "a_mask.png").is_file()


def test_shards_lock_their_own_table_so_they_share_a_folder(inputs, tmp_path, lock_holder):
    out = tmp_path / "out"
    out.mkdir()
    lock_holder(out / "results.shard-0-of-2.lock")
    rows = _runner(inputs, out, exit_code_on_failure=None, shard="1/2").run()
    assert [r["image"] for r in rows] == ["b.nii.gz", "c.dcm"]
    with pytest.raises(InputError, match="in use by another run"):
        _runner(inputs, out, exit_code_on_failure=None, shard="0/2").run()


def _disk_full_like_pil(case) -> None:
    """What PIL's PNG writer raises on a full disk: the ENOSPC OSError, with an AttributeError as its context."""
    try:
        raise AttributeError("'_idat' object has no attribute 'fileno'")
    except AttributeError:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None


def test_a_case_that_no_longer_fits_fails_alone_without_its_mask_and_the_table_is_written(inputs, tmp_path):
    out = tmp_path / "out"
    runner = _runner(inputs, out, exit_code_on_failure=None)
    runner.case_outputs.append(_disk_full_like_pil)  # after MaskWriter and OverlayWriter have written
    rows = {r["image"]: r["status"] for r in runner.run()}
    assert rows["a.png"] == f"failed: _disk_full_like_pil could not write into {out}: No space left on device; free space and continue with --skip_existing true"
    assert not list(out.glob("*_mask*")) and not list(out.glob("*_overlay*")), "a failed case left files"
    assert _results(out)["a.png"]["status"] == rows["a.png"]


def _mount_tmpfs(folder, size: str) -> None:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs a tmpfs, which only root can mount")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB file system (tmpfs) as the output folder, unmounted at the end."""
    folder = tmp_path / "small disk"
    _mount_tmpfs(folder, "400k")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_disk_that_fills_up_fails_the_cases_that_do_not_fit_and_keeps_the_table(tmp_path, small_disk):
    folder = tmp_path / "noise"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # noise compresses badly: each overlay is about 150 KiB
        write_png(folder / f"{i}.png", (rng.random((200, 250)) * 255).astype(np.uint8))
    runner = _runner(folder, small_disk, exit_code_on_failure=None)
    rows = {r["image"]: r["status"] for r in runner.run()}
    failed = {name: status for name, status in rows.items() if status != "ok"}
    assert failed and len(failed) < len(rows), rows  # some fitted, the rest did not
    for status in failed.values():
        assert status.startswith("failed: ") and "No space left on device" in status, status
    table = _results(small_disk)
    assert {name: row["status"] for name, row in table.items()} == rows
    for name, status in rows.items():  # a mask exactly for the cases that succeeded
        assert (small_disk / name.replace(".png", "_mask.png")).is_file() == (status == "ok")
    assert not [p.name for p in small_disk.iterdir() if p.name.startswith(".")]


def test_an_output_folder_without_room_for_the_table_stops_before_the_first_case(tmp_path, small_disk, inputs):
    (small_disk / "filler").write_bytes(b"\0" * 360 * 1024)
    with pytest.raises(InputError, match="output folder has no room even for the results table"):
        _runner(inputs, small_disk, exit_code_on_failure=None).run()
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "results.lock"]
