"""
Smoke run of ``benchmarks/latency.py`` at the smallest setting: every mode, the end-to-end and parity
tables on a few real HC18 images; it runs and writes real figures. No timing checks.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NETWORKS = ("AdaptiveCENet", "CENet")
MODES = ("fp32-eager", "fp32", "bf16", "int8", "torchscript", "onnxruntime")
PIPELINE_MODES = ("fp32-eager", "fp32", "bf16", "int8")
# three subjects: the bundle's subject split (70/20/10, seed 0) puts one (011) in the test split
REAL_IMAGES = ("001_HC", "011_HC", "017_HC")
PIXEL_SIZE_CSV = "training_set_pixel_size_and_HC.csv"


def _run(repo_root, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(repo_root / "benchmarks" / "latency.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _real_hc18(shared_data: Path, target: Path) -> Path:
    """A four-image HC18 folder copied from the real sample (images, annotations, their CSV rows)."""
    source = shared_data / "hc18_subset"
    (target / "training_set").mkdir(parents=True)
    for name in REAL_IMAGES:
        for suffix in (".png", "_Annotation.png"):
            shutil.copy(source / "training_set" / f"{name}{suffix}", target / "training_set")
    lines = (source / PIXEL_SIZE_CSV).read_text().splitlines()
    keep = {f"{name}.png" for name in REAL_IMAGES}
    (target / PIXEL_SIZE_CSV).write_text("\n".join([lines[0], *(l for l in lines[1:] if l.split(",")[0] in keep)]) + "\n")
    return target


@pytest.fixture(scope="module")  # one CLI run shared by the slow tests below (a minute or two on 2 cores)
def smoke_run(repo_root, shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("latency")
    data = _real_hc18(shared_data, root / "hc18")
    sys.path.insert(0, str(repo_root / "benchmarks"))
    try:
        from end_to_end import random_checkpoint

        ckpt = random_checkpoint(root / "model.pt")  # parity of random weights: the machinery, not the accuracy
    finally:
        sys.path.remove(str(repo_root / "benchmarks"))
    out = root / "out"
    done = _run(
        repo_root,
        *("--networks", ",".join(NETWORKS), "--sizes", "64", "--repeats", "1", "--warmup", "1"),
        *("--threads", "1", "--cpu_only", "--output_dir", str(out), "--data_dir", str(data)),
        *("--calibration_inputs", "2", "--e2e_images", "2", "--e2e_warmup", "1", "--image_size", "64"),
        *("--ckpt", str(ckpt), "--parity_dir", str(data), "--int8_min_dice", "0"),  # random weights: no guard
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def _report(smoke_run) -> dict:
    return json.loads((smoke_run[0] / "latency.json").read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_benchmark_writes_timings_params_and_flops_for_every_mode(smoke_run):
    report = _report(smoke_run)
    rows = {(r["network"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(n, m) for n in NETWORKS for m in MODES}
    for row in rows.values():
        assert row["size"] == 64 and row["device"] == "cpu"
        for key in ("median_ms", "params_m", "gflops", "achieved_gflop_s"):
            assert _positive(row[key]), (row["network"], row["mode"], key, row[key])
    assert rows[("CENet", "int8")]["engine"] == "ONNX Runtime INT8 QDQ"
    assert rows[("CENet", "fp32")]["engine"] == "PyTorch channels_last"
    # bf16 on a CPU without native bf16 runs, and the row says it was emulated
    assert rows[("CENet", "bf16")]["emulated"] is report["machine"]["bf16_emulated"]
    assert ("emulated" in rows[("CENet", "bf16")]["engine"]) is report["machine"]["bf16_emulated"]
    assert report["skipped"] == []


@pytest.mark.slow
def test_benchmark_records_cpu_isa_and_versions(smoke_run):
    report = _report(smoke_run)
    machine = report["machine"]
    assert machine["cpu_info"]["model"] and isinstance(machine["cpu_info"]["flags"], list)
    assert machine["cpu_info"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["torch"] == torch.__version__ and machine["onnxruntime"]
    assert f"ISA: {machine['isa']}" in smoke_run[1]
    assert f"onnxruntime {machine['onnxruntime']}" in smoke_run[1]


@pytest.mark.slow
def test_benchmark_writes_peak_rss_per_network(smoke_run):
    report = _report(smoke_run)
    assert {r["network"] for r in report["rss"]} == set(NETWORKS)
    for row in report["rss"]:
        assert _positive(row["process_peak_rss_mb"]) and row["forward_rss_mb"] >= 0


@pytest.mark.slow
def test_benchmark_reports_ratio_per_mode_and_targets(smoke_run):
    out, stdout = smoke_run
    report = _report(smoke_run)
    assert {r["mode"] for r in report["ratios"]} == set(MODES)
    assert all(r["size"] == 64 and _positive(r["ratio"]) for r in report["ratios"])
    # no target is judged from a 64^2 run: they need 256/512/1024, 1024^2, or a trained model on the test split
    for name in ("latency_ratio", "latency_ratio_fast_modes", "network_speedup", "memory"):
        assert report["targets"][name]["met"] is None, name
    assert "AdaptiveCENet/CENet int8 latency cpu 64^2" in stdout
    assert "FLOPs = 2*MAC" in stdout


@pytest.mark.slow
def test_end_to_end_table_runs_the_bundle_on_real_images(smoke_run):
    out, stdout = smoke_run
    report = _report(smoke_run)
    rows = {r["mode"].split(" ")[0]: r for r in report["end_to_end"]}
    assert set(rows) == set(PIPELINE_MODES)
    for row in rows.values():
        # two real images from disk to two mask files and two rows of head_circumference.csv
        assert (row["images"], row["failed"], row["masks_written"], row["csv_rows"]) == (2, 0, 2, 2)
        assert 0 <= row["hc_mm_found"] <= 2  # random weights: a mask may hold no head
        assert _positive(row["images_per_second"]) and _positive(row["stages_ms"]["network_ms"])
        assert {"preprocess_ms", "postprocess_ms", "HeadCircumference_ms", "MaskWriter_ms", "wall_ms"} <= set(row["stages_ms"])
    assert rows["int8"]["path"].startswith("inference path: int8 (ONNX Runtime, INT8 QDQ)")
    assert rows["fp32"]["path"].startswith("inference path: fp32 (PyTorch, channels_last)")
    assert "| model computation |" in stdout and "| end2end |" in stdout
    assert report["end_to_end_settings"]["weights"] == str(out.parent / "model.pt")  # --ckpt, not random weights


@pytest.mark.slow
def test_parity_table_compares_every_mode_with_fp32_eager_and_ground_truth(smoke_run):
    report = _report(smoke_run)
    parity = report["parity"]
    assert parity["split"] == "test" and parity["images"] == 1 and set(parity["summary"]) == set(PIPELINE_MODES)
    reference = parity["summary"]["fp32-eager"]
    assert reference["dice_vs_fp32_min"] == 1.0 and reference["hc_diff_mm_max"] in (0.0, None)
    assert reference["gt_dice_drop_mean"] == 0.0
    for mode, summary in parity["summary"].items():
        assert summary["images"] == 1, mode
        assert 0.0 <= summary["dice_vs_fp32_min"] <= summary["dice_vs_fp32_mean"] <= 1.0
        assert 0.0 <= summary["gt_dice_mean"] <= 1.0
        assert all(0.0 <= share <= 1.0 for share in summary["share_within"].values())
    assert report["targets"]["parity"]["met"] in (True, False)
    assert "parity: 1 test-split images" in smoke_run[1]


@pytest.mark.slow
def test_benchmark_writes_png_plot(smoke_run):
    data = (smoke_run[0] / "latency.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


@pytest.mark.parametrize(
    "args, message",
    [(("--networks", "NoSuchNet"), "unknown network"), (("--sizes", "100"), "multiples of 32"),
     (("--modes", "fp8"), "unknown mode(s) ['fp8']"), (("--parity_dir", "."), "--parity_dir needs --ckpt"),
     (("--ckpt", "no_such_model.pt"), "--ckpt no_such_model.pt: file not found")],
)  # fmt: skip
def test_benchmark_rejects_bad_options(repo_root, tmp_path, args, message):
    done = _run(repo_root, *args, "--output_dir", str(tmp_path))
    assert done.returncode != 0 and message in done.stderr
    assert not (tmp_path / "latency.json").exists()


def test_a_checkpoint_of_another_network_is_one_line(repo_root, tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, ckpt)
    done = _run(repo_root, "--ckpt", str(ckpt), "--output_dir", str(tmp_path))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    (line,) = [l for l in done.stderr.splitlines() if l.startswith("latency.py: error:")]
    assert f"{ckpt}: not a model.pt of the fetal bundle's network" in line


def test_batch_throughput_smoke(repo_root, tmp_path):
    """``benchmarks/batch_throughput.py`` at its smallest: 1 and 2 processes give equal tables; kill and resume pass."""
    command = [
        sys.executable, str(repo_root / "benchmarks" / "batch_throughput.py"), "--images", "6", "--processes", "1,2",
        "--resume_images", "8", "--height", "64", "--width", "96", "--image_size", "64", "--work_dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    table = result.stdout.split("table equal to 1 process\n")[1].splitlines()[:2]
    assert [line.split()[0] for line in table] == ["1", "2"] and all(line.endswith("True") for line in table)
    assert "FAIL" not in result.stdout and "no finished case's mask rewritten" in result.stdout
