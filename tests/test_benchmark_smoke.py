"""Smoke run of ``benchmarks/latency.py`` at the smallest setting: it runs and writes real figures; no timing checks."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

NETWORKS = ("AdaptiveCENet", "CENet")


def _run(repo_root, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(repo_root / "benchmarks" / "latency.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")  # one CLI run (~20-60 s on 2 cores) shared by the slow tests below
def smoke_run(repo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("latency")
    done = _run(
        repo_root,
        *("--networks", ",".join(NETWORKS), "--sizes", "64", "--repeats", "1", "--warmup", "1"),
        *("--threads", "1", "--cpu_only", "--output_dir", str(out)),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stdout


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_benchmark_writes_timings_params_and_flops(smoke_run):
    out, _ = smoke_run
    report = json.loads((out / "latency.json").read_text())
    rows = {(r["network"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(n, m) for n in NETWORKS for m in ("eager", "torchscript", "onnxruntime")}
    for row in rows.values():
        assert row["size"] == 64 and row["device"] == "cpu"
        for key in ("median_ms", "params_m", "gflops", "achieved_gflop_s"):
            assert _positive(row[key]), (row["network"], key, row[key])
    assert report["skipped"] == []


@pytest.mark.slow
def test_benchmark_writes_peak_rss_per_network(smoke_run):
    out, _ = smoke_run
    report = json.loads((out / "latency.json").read_text())
    assert {r["network"] for r in report["rss"]} == set(NETWORKS)
    for row in report["rss"]:
        assert _positive(row["process_peak_rss_mb"]) and row["forward_rss_mb"] >= 0


@pytest.mark.slow
def test_benchmark_reports_ratio_and_targets(smoke_run):
    out, stdout = smoke_run
    report = json.loads((out / "latency.json").read_text())
    (ratio,) = report["ratios"]
    assert ratio["size"] == 64 and _positive(ratio["ratio"])
    # neither target is judged from a 64^2 run: they need 256/512/1024 and 1024^2
    assert report["targets"]["latency_ratio"]["met"] is None
    assert report["targets"]["memory"]["met"] is None
    assert "AdaptiveCENet/CENet eager latency cpu 64^2" in stdout
    assert "FLOPs = 2*MAC" in stdout


@pytest.mark.slow
def test_benchmark_writes_png_plot(smoke_run):
    out, _ = smoke_run
    data = (out / "latency.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


@pytest.mark.parametrize(
    "args, message",
    [(("--networks", "NoSuchNet"), "unknown network"), (("--sizes", "100"), "multiples of 32")],
)
def test_benchmark_rejects_bad_options(repo_root, tmp_path, args, message):
    done = _run(repo_root, *args, "--output_dir", str(tmp_path))
    assert done.returncode != 0 and message in done.stderr
    assert not (tmp_path / "latency.json").exists()
