"""Cross-validation: subject-disjoint folds, nnU-Net's splits file, fold models and summary; fold ensembling and flip TTA."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from custom_nets.engines.ensemble import ProbabilityAverage, probability_average
from custom_nets.tracking.crossval import CrossvalError, compare_crossvals, crossval, kfold_subjects, nnunet_splits
from test_fetal_head_bundle import BUNDLE, _real_subset


class _Affine(nn.Module):
    """A tiny 2-class 'network': per-pixel logits a*x + b, asymmetric along the width so flips matter."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=(1, 3), padding=(0, 1))
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[[0.0, a, 0.0]]], [[[a, -a, 2 * a]]]]))
            self.conv.bias.copy_(torch.tensor([0.0, b]))

    def forward(self, x):
        return self.conv(x)


def test_kfold_subjects_are_disjoint_balanced_and_seeded():
    subjects = [f"{i:03d}" for i in range(11)]
    folds = kfold_subjects(subjects + subjects[:3], folds=3, seed=1)  # repeated scans count once
    assert sorted(s for f in folds for s in f) == subjects and [len(f) for f in folds] == [4, 4, 3]
    assert folds == kfold_subjects(subjects, folds=3, seed=1) != kfold_subjects(subjects, folds=3, seed=2)


def test_nnunet_splits_keep_the_scans_of_a_subject_together():
    items = [{"image": f"/d/{n}.png", "subject": n[:3]} for n in ("001_HC", "001_2HC", "002_HC", "003_HC")]
    splits = nnunet_splits(items, [["001"], ["002", "003"]])
    assert splits == [{"train": ["002_HC", "003_HC"], "val": ["001_HC", "001_2HC"]},
                      {"train": ["001_HC", "001_2HC"], "val": ["002_HC", "003_HC"]}]  # fmt: skip


def test_ensemble_of_two_models_is_the_mean_of_their_probabilities():
    x = torch.rand(2, 1, 8, 12)
    first, second = _Affine(1.0, 0.5), _Affine(-2.0, 0.1)
    mean = (torch.softmax(first(x), 1) + torch.softmax(second(x), 1)) / 2
    assert torch.allclose(torch.softmax(ProbabilityAverage([first, second])(x), 1), mean, atol=1e-6)
    # flip TTA: the mirrored prediction is mirrored back before averaging
    flipped = torch.softmax(first(x.flip(-1)), 1).flip(-1)
    tta = ProbabilityAverage([first], flip_dims=[(-1,)])(x)
    assert torch.allclose(torch.softmax(tta, 1), (torch.softmax(first(x), 1) + flipped) / 2, atol=1e-6)
    assert not torch.allclose(flipped, torch.softmax(first(x), 1))  # the flip did change something


def test_probability_average_loads_fold_checkpoints(tmp_path):
    first, second = _Affine(1.0, 0.5), _Affine(-2.0, 0.1)
    torch.save(second.state_dict(), tmp_path / "fold1.pt")
    x = torch.rand(1, 1, 8, 12)
    assert probability_average(first, first, [], tta="false") is first
    average = probability_average(first, _Affine(0.0, 0.0), [str(tmp_path / "fold1.pt")], tta=False)
    mean = (torch.softmax(first(x), 1) + torch.softmax(second(x), 1)) / 2
    assert torch.allclose(torch.softmax(average(x), 1), mean, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"folds": 50}, "50 folds need at least 50 subjects, the dataset has"),
        ({"network": "VNet"}, "unknown network 'VNet'; choose from AdaptiveCENet"),
        ({"ensemble": True}, "--ensemble needs held-out subjects"),
    ],
    ids=["folds-over-subjects", "unknown-network", "ensemble-without-test"],
)
def test_bad_requests_stop_before_any_training(shared_data, tmp_path, kwargs, message):
    dataset = _real_subset(shared_data, tmp_path / "hc18")
    with pytest.raises(CrossvalError, match=message):
        crossval(BUNDLE, dataset, output_dir=tmp_path / "cv", **kwargs)
    assert not list((tmp_path).glob("cv/fold_*"))


def test_a_bundle_without_a_datalist_is_refused_in_one_line(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "train.json").write_text(json.dumps({"network_def": {"_target_": "custom_nets.CENet"}}))
    (bundle / "configs" / "evaluate.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "custom_nets", "crossval", str(bundle), str(tmp_path)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {bundle / 'configs' / 'train.json'}: the bundle has no 'datalist' to cross-validate"


@pytest.fixture(scope="module")
def two_folds(tmp_path_factory):
    """2 folds x 1 epoch of the fetal head bundle on a few real HC18 images, through the CLI."""
    from conftest import _shared_data_dir

    if not _shared_data_dir().is_dir():
        pytest.skip("real sample data not found")
    root = tmp_path_factory.mktemp("crossval")
    dataset = _real_subset(_shared_data_dir(), root / "hc18")
    out = root / "cv"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "custom_nets", "crossval", str(BUNDLE), str(dataset), "--folds", "2", "--epochs", "1",
               "--image_size", "64", "--num_workers", "0", "--postprocess", "ellipse,none", "--tta", "true",
               "--output_dir", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (root / "mlruns").exists()  # MLflow artifacts stay in the output folder
    return out, dataset, result.stdout


def test_crossval_writes_splits_fold_models_and_summary(two_folds):
    out, dataset, stdout = two_folds
    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == 2
    names = sorted(p.stem for p in (dataset / "training_set").glob("*HC.png"))
    assert sorted(splits[0]["val"] + splits[1]["val"]) == names  # every image validated once
    for fold in splits:
        assert not {n.split("_")[0] for n in fold["train"]} & {n.split("_")[0] for n in fold["val"]}
    for f in range(2):
        assert (out / f"fold_{f}" / "models" / "model.pt").is_file()
    summary = {r["variant"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert {"ellipse", "none"} <= set(summary) and len([v for v in summary if v.endswith("_tta")]) == 1
    for row in summary.values():
        assert row["folds"] == "2" and 0.0 <= float(row["dice_mean"]) <= 1.0
    per_image = list(csv.DictReader(open(out / "per_image.csv")))
    assert {r["case"] for r in per_image if r["variant"] == "ellipse"} == {f"{n}.png" for n in names}
    assert "post-processing chosen by cross-validation" in stdout


def test_crossval_mlflow_runs_are_children_of_one_parent(two_folds):
    import mlflow
    from monai.utils import path_to_sqlite_uri

    out, _, _ = two_folds
    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(str(out / "mlruns.db")))
    runs = client.search_runs([client.get_experiment_by_name("fetal_head_us_segmentation").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert parents[0].data.params["crossval_folds"] == "2" and "ellipse_dice_mean" in parents[0].data.metrics
    assert all("cv_ellipse_dice" in c.data.metrics for c in children)


def test_compare_crossvals_pairs_images_and_refuses_other_folds(two_folds, tmp_path):
    out, _, _ = two_folds
    same = compare_crossvals(out, out, metric="dice", variant="ellipse")
    assert same["mean_difference"] == 0.0 and same["wilcoxon_p"] == 1.0 and same["images"] > 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "splits_final.json").write_text(json.dumps([{"train": ["x"], "val": ["y"]}]))
    (other / "per_image.csv").write_text((out / "per_image.csv").read_text())
    with pytest.raises(CrossvalError, match="used different folds"):
        compare_crossvals(out, other)
