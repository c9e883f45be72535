"""
Resume and determinism through the real bundle CLI (HC18 bundle, synthetic data, 64x64, CPU): a training
process killed with SIGKILL mid-epoch and restarted with ``--resume true`` finishes the planned epochs,
having lost at most the interrupted epoch, in the same MLflow run; the same seed gives the same weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from custom_nets.data.synthetic_hc18 import generate

pytestmark = pytest.mark.slow

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "fetal_head_us_segmentation"
EPOCHS = 3
SMALL = ["--image_size", "64", "--train#dataloader#batch_size", "2", "--train#trainer#max_epochs", str(EPOCHS)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return Path(generate(str(tmp_path_factory.mktemp("hc18")), num_images=24, height=64, width=64, seed=0))


def _train_command(dataset: Path, root: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(BUNDLE / "configs" / "train.json"),
        "--bundle_root", str(root), "--dataset_dir", str(dataset), "--num_workers", "0", *SMALL, *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _train(dataset: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_train_command(dataset, root, *extra), capture_output=True, text=True, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _kill_when(command: list[str], marker: str, log: Path, timeout: float = 600) -> None:
    """Start ``command`` and SIGKILL it as soon as its output shows ``marker``."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env())
        deadline = time.monotonic() + timeout
        try:
            while marker not in log.read_text():
                assert process.poll() is None, f"training ended before {marker!r}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no {marker!r} within {timeout} s"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait()
    assert process.returncode == -signal.SIGKILL


def _checkpoint(root: Path) -> dict:
    return torch.load(root / "models" / "last_checkpoint.pt", map_location="cpu", weights_only=True)


def test_a_run_killed_mid_epoch_resumes_and_finishes_in_the_same_mlflow_run(dataset, tmp_path):
    root = tmp_path / "bundle"
    command = _train_command(dataset, root, "--tracking", "mlflow")
    _kill_when(command, f"Epoch: 2/{EPOCHS}, Iter: 3/", tmp_path / "killed.log")
    saved = _checkpoint(root)["trainer"]
    iterations_per_epoch = saved["epoch_length"]
    assert saved["iteration"] == iterations_per_epoch  # epoch 1 complete; epoch 2 was lost with the kill

    resumed = _train(dataset, root, "--tracking", "mlflow", "--resume", "true")
    assert f"resume: continuing from iteration {iterations_per_epoch} (1 of {EPOCHS} epochs complete)" in resumed.stdout
    assert f"Epoch: 1/{EPOCHS}" not in resumed.stdout  # epoch 1 was not trained again
    final = _checkpoint(root)
    assert final["trainer"]["iteration"] == EPOCHS * iterations_per_epoch
    # the cosine schedule ran its planned course: T_max steps, ending at eta_min
    assert final["lr_scheduler"]["last_epoch"] == EPOCHS
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)
    assert (root / "models" / "model.pt").is_file()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_name == final["run_name"]
    epochs = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_mean_dice")]
    assert sorted(epochs) == list(range(1, EPOCHS + 1))


def _runs(root: Path) -> tuple[mlflow.MlflowClient, list]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_kills_before_the_first_checkpoint_and_mid_epoch_leave_one_run_with_each_step_once(dataset, tmp_path):
    """
    SIGKILL in epoch 1 (MLflow run open, no checkpoint yet), resume, SIGKILL in epoch 2 (iterations logged
    after the epoch-1 checkpoint are trained again), resume to the end: one FINISHED run, and every
    ``train_loss``/``lr_group_0`` step and every epoch's ``val_mean_dice`` in it once.
    """
    root = tmp_path / "bundle"
    command = _train_command(dataset, root, "--tracking", "mlflow", "--resume", "true")
    _kill_when(command, f"Epoch: 1/{EPOCHS}, Iter: 3/", tmp_path / "killed_1.log")
    assert not (root / "models" / "last_checkpoint.pt").exists()
    _, runs = _runs(root)
    assert [r.info.status for r in runs] == ["RUNNING"]  # the killed process's run, nothing behind it
    _kill_when(command, f"Epoch: 2/{EPOCHS}, Iter: 3/", tmp_path / "killed_2.log")
    opened = runs[0].info.run_name
    _train(dataset, root, "--tracking", "mlflow", "--resume", "true")

    final = _checkpoint(root)
    iterations = final["trainer"]["iteration"]
    assert iterations == EPOCHS * final["trainer"]["epoch_length"]
    client, runs = _runs(root)
    assert [(r.info.run_name, r.info.status) for r in runs] == [(final["run_name"], "FINISHED")]
    run_id = runs[0].info.run_id
    for key in ("train_loss", "lr_group_0"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, iterations + 1)), key
    epochs = [m.step for m in client.get_metric_history(run_id, "val_mean_dice")]
    assert sorted(epochs) == list(range(1, EPOCHS + 1))
    assert final["run_name"] == opened  # the run of the first, killed process went on
    assert f"continuing MLflow run {opened}, opened by the killed process" in (tmp_path / "killed_2.log").read_text()


def test_resume_with_another_schedule_is_refused_in_one_line(dataset, tmp_path):
    root = tmp_path / "bundle"
    _train(dataset, root, "--train#trainer#max_epochs", "1")
    result = subprocess.run(_train_command(dataset, root, "--resume", "true"), capture_output=True, text=True, env=_env())
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    checkpoint = root / "models" / "last_checkpoint.pt"
    assert last_line == (
        f"ERROR: {checkpoint}: written by a run with max_epochs=1, this run has max_epochs={EPOCHS}; "
        "resume with the same settings, or move the file away to start a new run"
    )


# Open defect, seen on a 2-core Xeon (family 6 model 207, AVX-512 without bf16) on 2026-12-03: in about half the
# pairs one of two seeded runs ends in one other, always the same, set of weights (the same datalist; not the hash
# seed, not the kernels: a seeded network trains identically in one process). It passed on AMX Xeons and AVX2 EPYCs.
@pytest.mark.xfail(strict=False, reason="seeded training is not reproducible on some CPUs yet (open defect, see comment)")
def test_the_same_seed_gives_the_same_weights(dataset, tmp_path):
    """Two runs of N iterations with seed 0 (augmentation and loader workers included) and one with seed 1."""
    weights = {}
    for name, seed in (("first", 0), ("second", 0), ("other_seed", 1)):
        root = tmp_path / name
        _train(dataset, root, "--train#trainer#max_epochs", "1", "--num_workers", "2", "--seed", str(seed))
        weights[name] = _checkpoint(root)["model"]
    assert weights["first"].keys() == weights["second"].keys()
    assert all(torch.equal(weights["first"][k], weights["second"][k]) for k in weights["first"])
    assert not all(torch.equal(weights["first"][k], weights["other_seed"][k]) for k in weights["first"])


def test_kill_resume_fuzz_benchmark_runs_clean(tmp_path):
    """``benchmarks/kill_resume_fuzz.py`` at its smallest: random SIGKILLs, every check passes."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kill_resume_fuzz.py"
    command = [sys.executable, str(script), "--kills", "2", "--epochs", "3", "--work_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "final run: ok" in result.stdout and "FAIL" not in result.stdout


def test_resuming_a_finished_run_does_nothing_and_opens_no_mlflow_run(dataset, tmp_path):
    root = tmp_path / "bundle"
    one_epoch = ("--train#trainer#max_epochs", "1", "--tracking", "mlflow")
    _train(dataset, root, *one_epoch)
    before = (root / "models" / "last_checkpoint.pt").stat().st_mtime_ns
    again = _train(dataset, root, *one_epoch, "--resume", "true")
    assert "holds a finished run (1 of 1 epochs): nothing to do" in again.stdout + again.stderr
    assert (root / "models" / "last_checkpoint.pt").stat().st_mtime_ns == before
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]
