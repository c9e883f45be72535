"""Run comparison (table, CSV, PNG) on real MLflow stores, its bad inputs, and the architecture comparison."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from PIL import Image

from _tracking_helpers import mlflow_server, tiny_training, write_tiny_bundle
from custom_nets.tracking.architectures import ArchitecturesError, architectures, network_def_for
from custom_nets.tracking.compare import CompareError, compare, compare_command, markdown_table, parse_run_ids

EXPERIMENT = "compare_test"


def _train_runs(uri: str, lrs=(1e-3, 1e-2, 3e-2), max_epochs: int = 2) -> list[str]:
    """Real tiny trainings tracked by MONAI's MLFlowHandler; returns their run ids."""
    for i, lr in enumerate(lrs):
        tiny_training(uri, EXPERIMENT, lr=lr, max_epochs=max_epochs, run_name=f"run{i}-lr{lr:g}").run()
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    ids = [r.info.run_id for r in client.search_runs([exp.experiment_id])]
    assert len(ids) == len(lrs)
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with 3 trained runs in EXPERIMENT, an empty experiment and a run without the key metric."""
    import mlflow

    root = tmp_path_factory.mktemp("compare_store")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    ids = _train_runs(uri)
    client = mlflow.MlflowClient(uri)
    client.create_experiment("empty_experiment")
    other = client.create_experiment("other_experiment")
    other_run = client.create_run(other, run_name="other").info.run_id
    client.log_metric(other_run, "val_mean_dice", 0.5, step=1)
    no_metric = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id, run_name="crashed_early")
    client.log_metric(no_metric.info.run_id, "train_loss", 1.0, step=1)
    return {"uri": uri, "client": client, "trained": ids, "other_run": other_run, "no_metric": no_metric.info.run_id}


def _best(client, run_id, metric="val_mean_dice"):
    return max(m.value for m in client.get_metric_history(run_id, metric))


def test_rows_sorted_by_best_dice(store, tmp_path):
    rows = compare(store["uri"], EXPERIMENT, runs=store["trained"], output_dir=tmp_path)
    expected = sorted(store["trained"], key=lambda r: _best(store["client"], r), reverse=True)
    assert [r["run_id"] for r in rows] == expected
    assert [r["rank"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["best_val_mean_dice"] == pytest.approx(_best(store["client"], row["run_id"]))
        assert row["network"] == "UNet" and row["loss"] == "DiceCELoss" and row["train_time_s"] > 0


def test_rows_sorted_ascending_in_min_mode(store, tmp_path):
    rows = compare(store["uri"], EXPERIMENT, runs=store["trained"], mode="min", output_dir=tmp_path)
    values = [r["best_val_mean_dice"] for r in rows]
    assert values == sorted(values)


def test_csv_and_png_written(store, tmp_path):
    rows = compare(store["uri"], EXPERIMENT, runs=store["trained"], output_dir=tmp_path)
    with open(tmp_path / f"compare_{EXPERIMENT}.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run_id"] for r in table] == [r["run_id"] for r in rows]
    assert {"run", "network", "lr", "best_val_mean_dice", "best_epoch", "train_time_s"} <= set(table[0])
    with Image.open(tmp_path / f"compare_{EXPERIMENT}_val_mean_dice.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert not list(tmp_path.glob("*.tmp")), "temporary files must be moved into place"


@pytest.mark.parametrize("form", ["comma_string", "tuple"])
def test_runs_selects_a_subset(store, tmp_path, form):
    picked = store["trained"][:2]
    runs = ",".join(picked) if form == "comma_string" else tuple(picked)
    rows = compare(store["uri"], EXPERIMENT, runs=runs, output_dir=tmp_path)
    assert sorted(r["run_id"] for r in rows) == sorted(picked)


def test_run_without_metric_left_out_with_note(store, tmp_path, capsys):
    rows = compare(store["uri"], EXPERIMENT, output_dir=tmp_path)
    assert store["no_metric"] not in {r["run_id"] for r in rows}
    assert len(rows) == 3
    assert f"crashed_early ({store['no_metric']}) has no 'val_mean_dice', left out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"experiment": "no_such_experiment"}, "experiment 'no_such_experiment' not found at sqlite:///"),
        ({"experiment": "empty_experiment"}, "experiment 'empty_experiment' at sqlite:///.* has no runs"),
        ({"experiment": EXPERIMENT, "runs": "0123456789abcdef"}, "run '0123456789abcdef' not found at sqlite:///"),
        ({"experiment": EXPERIMENT, "metric": "test_dice"}, "no selected run of .* has logged 'test_dice'"),
        ({"experiment": EXPERIMENT, "mode": "best"}, "mode must be 'max' or 'min'"),
    ],
)
def test_bad_input_is_one_line_error(store, tmp_path, kwargs, message):
    with pytest.raises(CompareError, match=message) as error:
        compare(store["uri"], output_dir=tmp_path, **kwargs)
    assert "\n" not in str(error.value)


def test_run_of_another_experiment_refused(store, tmp_path):
    with pytest.raises(CompareError, match=f"run '{store['other_run']}' is not in experiment '{EXPERIMENT}'"):
        compare(store["uri"], EXPERIMENT, runs=store["other_run"], output_dir=tmp_path)


def test_missing_sqlite_store_refused(tmp_path):
    with pytest.raises(CompareError, match="no MLflow database at sqlite:///"):
        compare(f"sqlite:///{tmp_path / 'missing.db'}", EXPERIMENT, output_dir=tmp_path)
    assert not (tmp_path / "missing.db").exists(), "comparing must not create an empty store"


def test_command_prints_markdown(store, tmp_path, capsys):
    compare_command(store["uri"], EXPERIMENT, runs=store["trained"], output_dir=str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| rank | run | run_id |") and len(lines[0].split("|")) == len(lines[2].split("|"))
    assert [line.split("|")[1].strip() for line in lines[2:5]] == ["1", "2", "3"]


def test_command_exits_non_zero_on_bad_input(store, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        compare_command(store["uri"], "no_such_experiment", output_dir=str(tmp_path))
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("error: experiment 'no_such_experiment' not found")


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, code, expected",
    [
        (["--experiment", "no_such_experiment"], 1, "error: experiment 'no_such_experiment' not found"),
        (["--experiment", EXPERIMENT], 0, "| 1 | run"),
    ],
)
def test_module_cli(store, tmp_path, args, code, expected):
    cmd = [sys.executable, "-m", "custom_nets.tracking.compare", "--tracking_uri", store["uri"]]
    cmd += ["--output_dir", str(tmp_path)]
    result = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
    assert result.returncode == code
    assert expected in (result.stdout if code == 0 else result.stderr)
    assert "Traceback" not in result.stderr


@pytest.mark.mlflow_server
def test_compare_against_server(tmp_path):
    with mlflow_server(tmp_path / "server") as uri:
        ids = _train_runs(uri, lrs=(1e-3, 3e-2), max_epochs=1)
        rows = compare(uri, EXPERIMENT, output_dir=tmp_path)
    assert sorted(r["run_id"] for r in rows) == sorted(ids)
    assert rows[0]["best_val_mean_dice"] >= rows[1]["best_val_mean_dice"]


@pytest.mark.parametrize("runs, expected", [(None, []), ("a,b", ["a", "b"]), (("a", "b "), ["a", "b"]), ("a", ["a"])])
def test_parse_run_ids(runs, expected):
    assert parse_run_ids(runs) == expected


def test_markdown_table_shortens_run_ids():
    table = markdown_table([{"rank": 1, "run": "x", "run_id": "0123456789abcdef", "lr": 0.0003, "train_time_s": 12.34}])
    assert table.splitlines()[2] == "| 1 | x | 01234567 | 0.0003 | 12.3 |"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("UNet", {"_target_": "monai.networks.nets.UNet", "spatial_dims": 2, "channels": [32, 64, 128, 256, 512],
                  "strides": [2, 2, 2, 2], "num_res_units": 2, "in_channels": 1, "out_channels": "@num_classes"}),
        ("ResNetUNet34", {"_target_": "custom_nets.networks.nets.resnet_unet.ResNetUNet", "depth": 34, "spatial_dims": 2,
                        "in_channels": 1, "out_channels": "@num_classes", "pretrained_path": None}),
    ],
)  # fmt: skip
def test_network_def_takes_data_args_from_bundle(name, expected):
    bundle_def = {"_target_": "custom_nets.AdaptiveCENet", "spatial_dims": 2, "in_channels": 1,
                  "out_channels": "@num_classes", "pretrained_path": None, "decoder_channels": 32}  # fmt: skip
    assert network_def_for(name, bundle_def) == expected


def test_unknown_network_refused_before_training(tmp_path):
    bundle, data = write_tiny_bundle(tmp_path)
    with pytest.raises(ArchitecturesError, match="unknown network.*VNet.*choose from AdaptiveCENet"):
        architectures(bundle, data, networks="UNet,VNet", output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "UNet").exists()


def test_missing_bundle_config_refused(tmp_path):
    with pytest.raises(ArchitecturesError, match="train.json: bundle training config not found"):
        architectures(tmp_path, tmp_path)


@pytest.mark.slow
def test_architectures_end_to_end(tmp_path, capsys):
    bundle, data = write_tiny_bundle(tmp_path)
    out = tmp_path / "out"
    rows = architectures(bundle, data, networks="ShallowSegNet,UNet", epochs=1, output_dir=out,
                         **{"train#dataloader#batch_size": 4})  # fmt: skip
    assert sorted(r["network"] for r in rows) == ["ShallowSegNet", "UNet"]
    assert all(r["max_epochs"] == 1 and r["batch_size"] == 4 and r["train_cases"] == 4 for r in rows)
    assert rows[0]["best_val_mean_dice"] >= rows[1]["best_val_mean_dice"]
    assert (out / "UNet" / "models" / "model.pt").is_file() and not (bundle / "models").exists()
    assert (out / "compare_tiny_test_bundle.csv").is_file()
    assert "| 1 |" in capsys.readouterr().out
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    for row in rows:  # MONAI's executed config, logged although output_dir was moved
        assert any(a.path.startswith("config_") for a in client.list_artifacts(row["run_id"]))
