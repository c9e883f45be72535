"""
The training precision switch (``--train_precision auto|fp32|bf16|fp16``): the choice and its log line,
the refusal of a mode the CPU cannot run through the real bundle CLI, bf16 autocast in the trainer's
inferer, and a real bundle training in bf16 where the CPU has native bf16.

A CPU without native bf16 is simulated with oneDNN's own ``ONEDNN_MAX_CPU_ISA=AVX2`` cap, so these
tests mean the same on an AVX2, an AVX-512 or an AMX machine.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from custom_nets.engines.fast_path import PrecisionUnavailableError, native_bf16
from custom_nets.engines.training_precision import PrecisionInferer, TrainingPrecision, choose_training_precision

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "fetal_head_us_segmentation"
CPU = "$torch.device('cpu')"  # the CPU paths are under test, also on a machine with a GPU
TINY = ["--image_size", "64", "--num_workers", "0", "--train#trainer#max_epochs", "1", "--train#dataloader#batch_size", "2"]
AVX2_CPU = {"model": "Test CPU", "flags": ["avx2"], "torch_capability": "AVX2", "onednn_max_isa": None}
AMX_CPU = {"model": "Test CPU", "flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"], "onednn_max_isa": None}


def bundle_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_auto_keeps_fp32_without_native_bf16_and_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="custom_nets.engines.training_precision"):
        choice = choose_training_precision("auto", "cpu", info=AVX2_CPU)
    assert (choice.precision, choice.amp, choice.cpu_autocast) == ("fp32", False, False)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("training precision: fp32")
    assert "Test CPU" in lines[0] and "no native bf16" in lines[0]


def test_auto_trains_bf16_on_a_cpu_with_amx():
    choice = choose_training_precision("auto", "cpu", info=AMX_CPU, log=False)
    assert (choice.precision, choice.cpu_autocast, choice.amp, choice.channels_last) == ("bf16", True, False, True)
    assert "AMX-BF16" in choice.reason


@pytest.mark.parametrize("requested, missing", [("bf16", "no native bf16"), ("fp16", "CUDA only"), ("int8", "unknown")])
def test_a_mode_the_cpu_cannot_run_is_refused(requested, missing):
    with pytest.raises(PrecisionUnavailableError, match=missing):
        choose_training_precision(requested, "cpu", info=AVX2_CPU, log=False)


def test_channels_last_can_be_forced_either_way():
    assert choose_training_precision("fp32", "cpu", "true", info=AVX2_CPU, log=False).channels_last
    assert not choose_training_precision("bf16", "cpu", False, info=AMX_CPU, log=False).channels_last


def test_bf16_inferer_runs_the_forward_in_bf16_and_returns_float32():
    """Emulated bf16 works (slowly) on any CPU, so the mechanics are checked everywhere on a tiny network."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    conv_dtypes = []
    net[0].register_forward_hook(
        lambda m, i, o: conv_dtypes.append((o.dtype, o.is_contiguous(memory_format=torch.channels_last)))
    )
    weight = net[0].weight  # what an optimizer holds
    inferer = PrecisionInferer(TrainingPrecision("bf16", "cpu", True, "test"))
    out = inferer(torch.rand(2, 1, 16, 16), net)
    out.mean().backward()
    assert conv_dtypes == [(torch.bfloat16, True)]
    assert net[0].weight is weight and weight.is_contiguous(memory_format=torch.channels_last)
    assert out.dtype == torch.float32 and net[0].weight.grad.dtype == torch.float32
    assert torch.isfinite(net[0].weight.grad).all() and net[0].weight.grad.abs().sum() > 0


def test_explicit_bf16_without_native_bf16_is_one_error_line(tmp_path):
    """Through the real CLI, before any data is read: one line naming the mode and what is missing."""
    result = bundle_cli(
        "run", "training", "--config_file", str(BUNDLE / "configs" / "train.json"), "--bundle_root", str(tmp_path),
        "--device", CPU, "--train_precision", "bf16", cwd=tmp_path, env={"ONEDNN_MAX_CPU_ISA": "AVX2"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("ERROR: train_precision bf16 cannot run here")
    assert "no native bf16" in errors[0] and "ONEDNN_MAX_CPU_ISA=AVX2" in errors[0]
    assert not (tmp_path / "eval" / "datalist.json").exists()


def _tiny_training(tmp_path: Path, precision: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    from custom_nets.data.synthetic_hc18 import generate

    dataset = generate(str(tmp_path / "synthetic"), num_images=8, height=96, width=128, seed=0)
    result = bundle_cli(
        "run", "training", "--config_file", str(BUNDLE / "configs" / "train.json"), "--bundle_root", str(tmp_path),
        "--dataset_dir", str(dataset), "--device", CPU, "--train_precision", precision, *TINY, "--tracking", "mlflow",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return result, run.data.params


@pytest.mark.slow
def test_auto_falls_back_to_fp32_in_a_bundle_run_and_records_it(tmp_path):
    result, params = _tiny_training(tmp_path, "auto", env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    lines = [line for line in result.stdout.splitlines() if "training precision:" in line]
    assert len(lines) == 1 and "training precision: fp32" in lines[0] and "no native bf16" in lines[0]
    assert (params["train_precision"], params["amp"]) == ("fp32", "False")
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.skipif(native_bf16() is None, reason="this CPU has no native bf16 (AMX-BF16 or AVX512-BF16)")
def test_bf16_bundle_training_where_the_cpu_has_it(tmp_path):
    result, params = _tiny_training(tmp_path, "bf16")
    assert "training precision: bf16 (CPU autocast bfloat16" in result.stdout
    assert (params["train_precision"], params["channels_last"]) == ("bf16", "True")
    assert (tmp_path / "models" / "model.pt").is_file()

