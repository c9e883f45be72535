"""CaseMetricsSaver on a real MONAI SupervisedEvaluator: one row per case from MONAI's metric handlers, and a summary; the same files from two torchrun (gloo) processes."""

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
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import ConfusionMatrix, HausdorffDistance, MeanDice, from_engine
from monai.transforms import AsDiscreted

from _case_metrics_ddp import Passthrough, square

from custom_nets.handlers.case_metrics_saver import CaseMetricsSaver

REPO_ROOT = Path(__file__).resolve().parents[2]


# (prediction, label) per case: Dice 1, Dice 2*16/(16+36) and an empty prediction (Dice 0, HD95 undefined)
CASES = [
    ("a.png", square(4, 8), square(4, 8)),
    ("b.png", square(4, 8), square(4, 10)),
    ("c.png", torch.zeros(1, 16, 16), square(4, 8)),
]
EXPECTED_DICE = [1.0, 2 * 16 / (16 + 36), 0.0]


def _run(tmp_path, publish=("size_px",)):
    data = [
        {"image": MetaTensor(pred, meta={"filename_or_obj": f"/data/{name}"}), "label": label, "size_px": float(label.sum())}
        for name, pred, label in CASES
    ]
    metrics = {
        "val_mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"])),
    }
    extra = {
        "val_precision": ConfusionMatrix(include_background=False, metric_name="precision", compute_sample=True, output_transform=from_engine(["pred", "label"])),
        "val_hd95": HausdorffDistance(include_background=False, percentile=95, output_transform=from_engine(["pred", "label"])),
    }
    saver = CaseMetricsSaver(
        output_dir=tmp_path,
        metrics={"dice": metrics["val_mean_dice"], "precision": extra["val_precision"], "hd95": extra["val_hd95"]},
        case_metrics=[lambda case: {"size_px": case["size_px"], "pred_px": float(case["pred"][1].sum())}],
        publish=publish,
    )
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data), batch_size=2),
        network=Passthrough(),
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2),
        key_val_metric=metrics,
        additional_metrics=extra,
        val_handlers=[saver],
    )
    evaluator.run()
    with open(tmp_path / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    return evaluator, rows


def test_one_row_per_case_with_monai_metric_values(tmp_path):
    _, rows = _run(tmp_path)
    assert [r["case"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert [float(r["dice"]) for r in rows] == pytest.approx(EXPECTED_DICE, abs=1e-5)
    assert float(rows[1]["precision"]) == pytest.approx(1.0)  # the predicted square lies inside the label
    assert float(rows[0]["hd95"]) == 0.0 and not np.isfinite(float(rows[2]["hd95"]))


def test_case_metric_columns(tmp_path):
    _, rows = _run(tmp_path)
    assert [float(r["size_px"]) for r in rows] == [16.0, 36.0, 16.0]
    assert [float(r["pred_px"]) for r in rows] == [16.0, 16.0, 0.0]


def test_summary_matches_monai_aggregate_and_skips_non_finite(tmp_path):
    evaluator, _ = _run(tmp_path)
    summary = json.loads((tmp_path / "metrics_summary.json").read_text())
    assert summary["cases"] == 3
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(evaluator.state.metrics["val_mean_dice"], abs=1e-6)
    assert summary["metrics"]["hd95"]["count"] == 2
    with open(tmp_path / "metrics_summary.csv") as f:
        table = {row["metric"]: row for row in csv.DictReader(f)}
    assert float(table["dice"]["median"]) == pytest.approx(EXPECTED_DICE[1], abs=1e-5)


def test_published_means_reach_engine_metrics(tmp_path):
    evaluator, _ = _run(tmp_path)
    assert evaluator.state.metrics["size_px"] == pytest.approx(np.mean([16.0, 36.0, 16.0]))
    assert "pred_px" not in evaluator.state.metrics


def test_publishing_an_unknown_column_fails(tmp_path):
    with pytest.raises(KeyError, match="cannot publish 'hc_mm'"):
        _run(tmp_path, publish=("hc_mm",))


def test_no_temporary_files_left(tmp_path):
    _run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics_per_case.csv", "metrics_summary.csv", "metrics_summary.json"]


def test_rejects_a_metric_that_is_not_a_monai_handler(tmp_path):
    with pytest.raises(TypeError, match="MONAI metric handler"):
        CaseMetricsSaver(tmp_path, metrics={"dice": lambda y_pred, y: 0.0})


DDP_SCRIPT = Path(__file__).with_name("_case_metrics_ddp.py")


def _evaluate(out: Path, nproc: int, *args: str) -> Path:
    """``tests/handlers/_case_metrics_ddp.py`` as one plain process, or under real torchrun with ``nproc`` gloo processes."""
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, *launcher, str(DDP_SCRIPT), str(out), *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("even_divisible", [False, True], ids=["uneven", "padded"])
def test_two_process_files_equal_the_single_process_files(tmp_path, even_divisible):
    args = ["--even_divisible"] if even_divisible else []
    single = _evaluate(tmp_path / "single", 1, *args)
    ddp = _evaluate(tmp_path / "ddp", 2, *args)
    files = ["metrics_per_case.csv", "metrics_summary.csv", "metrics_summary.json"]
    for name in files:
        assert (ddp / "rank0" / name).read_bytes() == (single / "rank0" / name).read_bytes(), name
    with open(ddp / "rank0" / "metrics_per_case.csv") as f:
        assert [r["case"] for r in csv.DictReader(f)] == [f"{c}.png" for c in "gcafbed"]  # dataset order, each case once
    assert not (ddp / "rank1").exists()  # only rank 0 writes
    published = {json.loads((ddp / f"state_rank{r}.json").read_text())["size_px"] for r in (0, 1)}
    assert published == {json.loads((single / "state_rank0.json").read_text())["size_px"]}  # the same on every rank
