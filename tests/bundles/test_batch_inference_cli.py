"""
Batch inference of the bundles through the real command line on real HC18 images (and small synthetic
volumes): ``torchrun`` on 2 processes (gloo, CPU), ``--shard i/n`` jobs with ``python -m custom_nets
merge_results``, ``--skip_existing``, and ``--input_datalist`` with bad entries. The sharded tables must
equal the single-process one byte for byte. Random-weight checkpoints: these check the batch handling.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from custom_nets.data import synthetic_brats
from custom_nets import AdaptiveCENet

pytestmark = pytest.mark.slow

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
NAMES = ["001_HC", "011_HC", "017_HC", "017_2HC", "022_HC"]
# one thread everywhere: torchrun sets OMP_NUM_THREADS=1 in its processes, and the single-process run
# must sum in the same order for the tables to be equal to the last digit
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*command], capture_output=True, text=True, env=ENV, cwd=cwd)


def _infer(bundle: str, cwd: Path, model: Path, *args: str, launcher: tuple[str, ...] = (sys.executable, "-m", "monai.bundle")) -> subprocess.CompletedProcess:
    config = BUNDLES / bundle / "configs" / "inference.json"
    return _run(*launcher, "run", "inference", "--config_file", str(config), "--ckpt_path", str(model), *args, cwd=cwd)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def _model(path: Path, in_channels: int, out_channels: int) -> Path:
    torch.manual_seed(0)
    torch.save(AdaptiveCENet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def hc18(tmp_path_factory, shared_data) -> dict[str, Path]:
    """Real HC18 images, their pixel sizes, a random model, and the single-process run of the fetal bundle."""
    root = tmp_path_factory.mktemp("hc18 batch")
    inputs = root / "in"
    inputs.mkdir()
    for name in NAMES:
        shutil.copy(shared_data / "hc18_subset" / "training_set" / f"{name}.png", inputs)
    setup = {
        "root": root,
        "in": inputs,
        "model": _model(root / "model.pt", 1, 2),
        "pixels": shared_data / "hc18_subset" / "training_set_pixel_size_and_HC.csv",
    }
    _ok(_fetal(setup, root / "single"))
    return setup


def _fetal(setup: dict[str, Path], out: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return _infer(
        "fetal_head_us_segmentation", setup["root"], setup["model"], "--input_dir", str(setup["in"]), "--output_dir", str(out),
        "--pixel_size_csv", str(setup["pixels"]), "--image_size", "64", *args, **kwargs,
    )  # fmt: skip


def _same_outputs(out: Path, single: Path, table: str = "head_circumference.csv") -> None:
    assert (out / table).read_bytes() == (single / table).read_bytes()
    for name in NAMES:
        assert np.array_equal(np.asarray(Image.open(out / f"{name}_mask.png")), np.asarray(Image.open(single / f"{name}_mask.png")))


def test_the_single_process_table_has_head_circumferences(hc18):
    with open(hc18["root"] / "single" / "head_circumference.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == sorted(f"{n}.png" for n in NAMES) and all(r["status"] == "ok" and r["pixel_size_mm"] for r in rows)


def test_torchrun_on_two_processes_equals_one_process(hc18):
    out = hc18["root"] / "torchrun"
    result = _ok(_fetal(hc18, out, launcher=("torchrun", "--nproc_per_node=2", "-m", "monai.bundle")))
    _same_outputs(out, hc18["root"] / "single")
    shard_rows = [len((out / f"head_circumference.shard-{i}-of-2.csv").read_text().splitlines()) - 1 for i in range(2)]
    assert shard_rows == [3, 2]  # round-robin: inputs 0, 2, 4 and 1, 3
    assert "merged 5 row(s) of 2 shard(s)" in result.stdout + result.stderr


def test_shard_jobs_and_merge_results_equal_one_process(hc18):
    out = hc18["root"] / "shards"
    first = _ok(_fetal(hc18, out, "--shard", "0/2"))
    assert "shard 1 of 2: 3 of 5 input(s)" in first.stdout and not (out / "head_circumference.csv").exists()
    unfinished = _run(sys.executable, "-m", "custom_nets", "merge_results", str(out), cwd=hc18["root"])
    assert unfinished.returncode == 1 and "shard(s) 1 of 2 have not finished" in unfinished.stderr
    _ok(_fetal(hc18, out, "--shard", "1/2"))
    _ok(_run(sys.executable, "-m", "custom_nets", "merge_results", str(out), cwd=hc18["root"]))
    _same_outputs(out, hc18["root"] / "single")


def test_skip_existing_redoes_only_incomplete_cases_then_nothing(hc18):
    out = hc18["root"] / "resumed"
    shutil.copytree(hc18["root"] / "single", out)
    (out / "017_HC_mask.png").unlink()
    mask = out / "022_HC_mask.png"
    mask.write_bytes(mask.read_bytes()[:100])  # cut short, as by a full disk outside our atomic writes
    result = _ok(_fetal(hc18, out, "--skip_existing", "true"))
    assert "skip_existing: 3 case(s) already complete, 2 to run" in result.stdout
    _same_outputs(out, hc18["root"] / "single")
    again = _ok(_fetal(hc18, out, "--skip_existing", "true"))
    assert "skip_existing: all 5 case(s) already complete: nothing to do" in again.stdout
    _same_outputs(out, hc18["root"] / "single")


def test_datalist_with_bad_entries_stops_before_any_work_or_skips_them(hc18):
    datalist = hc18["root"] / "lists" / "datalist.json"
    datalist.parent.mkdir()
    entries = [{"image": "../in/001_HC.png"}, {"image": "../in/gone.png"}, "../in/011_HC.png", {"image": "../in/./001_HC.png"}]
    datalist.write_text(json.dumps({"testing": entries}))
    out = hc18["root"] / "datalist"
    result = _fetal(hc18, out, "--input_datalist", str(datalist))
    assert result.returncode == 1
    assert f"{datalist}: testing[1]: {hc18['in'] / 'gone.png'}: file not found" in result.stdout
    assert f"{datalist}: testing[3]: {hc18['in'] / '001_HC.png'}: duplicate of testing[0]" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(f"ERROR: {datalist}: 2 invalid entry(ies)")
    assert not out.exists() or not any(out.iterdir())

    _ok(_fetal(hc18, out, "--input_datalist", str(datalist), "--skip_invalid", "true"))
    with open(out / "head_circumference.csv", newline="") as f:
        assert [r["image"] for r in csv.DictReader(f)] == ["001_HC.png", "011_HC.png"]


def test_csv_datalist_with_a_missing_column_is_one_line(hc18):
    table = hc18["root"] / "cases.csv"
    table.write_text("scan\nin/001_HC.png\n")
    result = _fetal(hc18, hc18["root"] / "csv", "--input_datalist", str(table))
    assert result.returncode == 1 and f"ERROR: {table}: no column 'image' (columns: scan); set --datalist_image_column" in result.stderr
    _ok(_fetal(hc18, hc18["root"] / "csv", "--input_datalist", str(table), "--datalist_image_column", "scan"))
    assert (hc18["root"] / "csv" / "001_HC_mask.png").is_file()


def test_lung_ct_csv_datalist_in_two_shards_merged_with_the_nodule_table(tmp_path):
    rng = np.random.default_rng(3)
    for name in ("a", "b", "c"):
        nib.save(nib.Nifti1Image((rng.random((24, 24, 6)) * 1400 - 1000).astype(np.float32), np.diag([0.8, 0.8, 2.5, 1.0])), tmp_path / f"{name}.nii.gz")
    (tmp_path / "cases.csv").write_text("image\nc.nii.gz\na.nii.gz\nb.nii.gz\n")
    model = _model(tmp_path / "model.pt", 1, 2)
    args = ("--input_datalist", str(tmp_path / "cases.csv"), "--image_size", "[32,32]")
    _ok(_infer("lung_nodule_ct_segmentation", tmp_path, model, *args, "--output_dir", str(tmp_path / "single")))
    for shard in ("0/2", "1/2"):
        _ok(_infer("lung_nodule_ct_segmentation", tmp_path, model, *args, "--output_dir", str(tmp_path / "out"), "--shard", shard))
    assert {p.name for p in (tmp_path / "out").glob("nodules*.csv")} == {"nodules.shard-0-of-2.csv", "nodules.shard-1-of-2.csv"}
    _ok(_run(sys.executable, "-m", "custom_nets", "merge_results", str(tmp_path / "out"), cwd=tmp_path))
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        assert [(r["image"], r["status"], r["mask"]) for r in csv.DictReader(f)] == [
            ("c.nii.gz", "ok", "c_seg.nii.gz"), ("a.nii.gz", "ok", "a_seg.nii.gz"), ("b.nii.gz", "ok", "b_seg.nii.gz"),
        ]  # fmt: skip
    for table in ("results.csv", "nodules.csv"):
        assert (tmp_path / "out" / table).read_bytes() == (tmp_path / "single" / table).read_bytes()


def test_brain_mri_json_datalist_of_case_folders(tmp_path):
    inputs = Path(synthetic_brats.generate(str(tmp_path / "brats"), num_cases=2, shape=(16, 16, 8), seed=5))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{"image": "brats/BraTS20_Training_002"}, {"image": "brats/BraTS20_Training_001"}]}))
    model = _model(tmp_path / "model.pt", 4, 3)
    out = tmp_path / "out"
    _ok(_infer("brain_tumor_mri_segmentation", tmp_path, model, "--input_datalist", str(datalist), "--output_dir", str(out), "--image_size", "[32,32]"))
    with open(out / "results.csv", newline="") as f:
        assert [(r["image"], r["status"]) for r in csv.DictReader(f)] == [("BraTS20_Training_002", "ok"), ("BraTS20_Training_001", "ok")]
    assert nib.load(out / "BraTS20_Training_002_seg.nii.gz").shape == (16, 16, 8)
    assert inputs.is_dir()
