"""MLflow tracking of a training run: run params and final metrics, fail-fast URI check, run names, progress lines and bars."""

from __future__ import annotations

import logging
import os
import re
import struct
import subprocess
import sys

import pytest
import torch
from ignite.engine import Engine, Events

from _tracking_helpers import free_port, mlflow_server, tiny_training, write_bundle_card, write_tiny_bundle
from custom_nets.tracking import (
    LoopProgress,
    MLflowRunParams,
    ProgressLogger,
    TrackingUnreachableError,
    check_tracking_uri,
    experiment_name,
    format_duration,
    git_commit,
    is_terminal,
    run_name,
)

EXPECTED_PARAMS = {
    "network": "UNet",
    "loss": "DiceCELoss",
    "optimizer": "Adam",
    "lr": "0.001",
    "weight_decay": "1e-05",
    "lr_scheduler": "CosineAnnealingLR",
    "batch_size": "2",
    "max_epochs": "2",
    "train_cases": "4",
    "val_cases": "2",
    "bundle_name": "tiny_test_bundle",
    "bundle_version": "0.1.2",
    "seed": "0",
    "train_image_shape": "[1, 32, 32]",
}


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri


def _tracked_run(uri: str, tmp_path):
    import mlflow

    bundle_root = write_bundle_card(tmp_path / "tiny_test_bundle")
    experiment = f"exp_{tmp_path.name}"
    trainer = tiny_training(uri, experiment, bundle_root=bundle_root, max_epochs=2)
    trainer.run()
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, "the validator's MLFlowHandler must join the trainer's run, not start its own"
    return client, runs[0]


@pytest.fixture(scope="module", params=[pytest.param("server", marks=pytest.mark.mlflow_server), "sqlite"])
def tracked_run(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(f"run_{request.param}")
    if request.param == "server":
        uri = request.getfixturevalue("server_uri")
    else:
        uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    return _tracked_run(uri, tmp_path)


def test_run_params_logged(tracked_run):
    _, run = tracked_run
    params = run.data.params
    assert {k: params.get(k) for k in EXPECTED_PARAMS} == EXPECTED_PARAMS
    expected_size = sum(p.numel() for p in tiny_training(None, "unused").network.parameters())
    assert int(params["network_params"]) == expected_size


@pytest.mark.parametrize("metric, count", [("train_loss", 4), ("lr_group_0", 4), ("val_mean_dice", 2)])
def test_per_step_metrics_logged(tracked_run, metric, count):
    client, run = tracked_run
    history = client.get_metric_history(run.info.run_id, metric)
    assert sorted(m.step for m in history) == list(range(1, count + 1))


def test_lr_history_follows_scheduler(tracked_run):
    client, run = tracked_run
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr_group_0"), key=lambda m: m.step)]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])  # cosine over 2 epochs, stepped per epoch


def test_final_metrics_logged(tracked_run):
    client, run = tracked_run
    dice = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_mean_dice")}
    metrics = run.data.metrics
    best_epoch = max(dice, key=dice.get)
    assert metrics["best_val_mean_dice"] == pytest.approx(dice[best_epoch])
    assert metrics["best_val_mean_dice_epoch"] == best_epoch
    assert metrics["final_val_mean_dice"] == pytest.approx(dice[2])
    assert metrics["train_time_s"] > 0


def test_model_card_artifact_and_run_finished(tracked_run, tmp_path):
    client, run = tracked_run
    assert run.info.status == "FINISHED"
    assert re.fullmatch(r"UNet-DiceCELoss-lr0\.001-\d{8}-\d{6}", run.info.run_name)
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert paths == {"bundle/README.md", "bundle/metadata.json"}
    card = client.download_artifacts(run.info.run_id, "bundle/README.md", str(tmp_path))
    assert "Model card of a throwaway test bundle" in open(card).read()


def test_executed_config_logged_despite_monai_plain_output_dir_path(tmp_path):
    import mlflow

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config_20260101_120000.json").write_text("{}")
    broken = f"{tmp_path / 'out'} + '/config_20260101_120000.json'"  # what MONAI 1.6.1 passes to MLFlowHandler
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tiny_training(uri, "exp", max_epochs=1, run_name="r", train_artifacts=broken).run()
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config_20260101_120000.json"]


def test_untracked_run_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = tiny_training(None, "unused", bundle_root=write_bundle_card(tmp_path / "b"), max_epochs=1)
    trainer.run()
    assert trainer.state.iteration == 2
    assert not list(tmp_path.glob("mlruns*")), "no MLflow store may appear when tracking is off"


def test_unreachable_server_stops_before_first_iteration(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    trainer = tiny_training(uri, "unused", max_epochs=1)
    with pytest.raises(TrackingUnreachableError, match=re.escape(uri)) as error:
        trainer.run()
    assert "\n" not in str(error.value)
    assert trainer.state.iteration == 0


@pytest.mark.parametrize("make_uri", [lambda p: str(p / "store"), lambda p: (p / "store").as_uri()])
def test_check_tracking_uri_refuses_file_store(tmp_path, make_uri):
    with pytest.raises(TrackingUnreachableError, match="file store"):
        check_tracking_uri(make_uri(tmp_path))


def test_check_tracking_uri_creates_sqlite_folder(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlruns.db'}"
    assert check_tracking_uri(uri) == uri
    assert (tmp_path / "new").is_dir()


@pytest.mark.mlflow_server
def test_check_tracking_uri_accepts_live_server(server_uri):
    assert check_tracking_uri(server_uri) == server_uri


@pytest.mark.parametrize(
    "args, expected",
    [
        (("monai.networks.nets.UNet", "DiceCELoss", 0.001, "20260101-1200"), "UNet-DiceCELoss-lr0.001-20260101-1200"),
        (({"_target_": "custom_nets.AdaptiveCENet"}, None, 3e-4, "t"), "AdaptiveCENet-lr0.0003-t"),
        ((torch.nn.Conv2d(1, 1, 1), torch.nn.MSELoss(), None, "t"), "Conv2d-MSELoss-t"),
    ],
)
def test_run_name(args, expected):
    assert run_name(*args) == expected


def test_run_name_is_unique_per_second():
    assert re.fullmatch(r"UNet-\d{8}-\d{6}", run_name("UNet"))


def test_experiment_name_is_bundle_folder(tmp_path, monkeypatch):
    bundle = tmp_path / "fetal_head_us_segmentation"
    bundle.mkdir()
    monkeypatch.chdir(bundle)
    assert experiment_name(".") == experiment_name(bundle) == "fetal_head_us_segmentation"


def test_git_commit_outside_checkout_is_empty(tmp_path):
    assert git_commit(tmp_path) == {}


def test_git_commit_inside_checkout(repo_root):
    found = git_commit(repo_root)
    if not (repo_root / ".git").exists():
        pytest.skip("not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}", found["git_commit"]) and found["git_dirty"] in ("true", "false")


@pytest.mark.parametrize("interval, epoch_length, expected_lines", [(1, 5, 10), (2, 5, 6), (10, 5, 2)])
def test_progress_lines(caplog, interval, epoch_length, expected_lines):
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(0.25)})
    ProgressLogger(interval=interval, name="progress_test").attach(trainer)
    with caplog.at_level(logging.INFO, logger="progress_test"):
        trainer.run(range(epoch_length), max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "progress_test"]
    assert len(lines) == expected_lines
    assert re.fullmatch(
        rf"epoch 2/2 iter {epoch_length}/{epoch_length} \({2 * epoch_length}/{2 * epoch_length}, 100\.0%\) "
        r"loss 0\.2500 elapsed \d+:\d\d:\d\d ETA 0:00:00",
        lines[-1],
    )


def test_progress_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval"):
        ProgressLogger(interval=0)


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (3725.4, "1:02:05"), (float("nan"), "?"), (-1, "?")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_params_handler_attaches_once():
    trainer = Engine(lambda engine, batch: None)
    handler = MLflowRunParams()
    handler.attach(trainer)
    handler.attach(trainer)
    assert len(trainer._event_handlers[Events.STARTED]) == 1


@pytest.mark.slow
def test_bundle_cli_fails_fast_on_unreachable_server(tmp_path):
    bundle, data = write_tiny_bundle(tmp_path, network_def={
        "_target_": "custom_nets.networks.nets.shallow_segnet.ShallowSegNet",
        "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": [4, 8]})  # fmt: skip
    uri = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--dataset_dir", str(data), "--tracking", "mlflow", "--tracking_uri", uri]  # fmt: skip
    result = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]  # one line, thanks to custom_nets.errors.install_excepthook
    assert last_line.startswith(f"ERROR: MLflow tracking server {uri} cannot be reached (")
    assert "train_loss" not in result.stdout + result.stderr, "no iteration may run"
    assert not (bundle / "models" / "model.pt").exists()


@pytest.mark.slow
def test_bundle_cli_tracks_to_default_sqlite_store(tmp_path):
    import mlflow

    bundle, data = write_tiny_bundle(tmp_path, network_def={
        "_target_": "custom_nets.networks.nets.shallow_segnet.ShallowSegNet",
        "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": [4, 8]})  # fmt: skip
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--dataset_dir", str(data), "--max_epochs", "2", "--tracking", "mlflow"]  # fmt: skip
    result = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"epoch 2/2 iter 2/2 \(4/4, 100\.0%\) loss \d\.\d{4} lr 0\.001 elapsed \S+ ETA 0:00:00", result.stdout)
    client = mlflow.MlflowClient(f"sqlite:///{bundle / 'eval' / 'mlruns.db'}")  # MONAI's default: <output_dir>
    (run,) = client.search_runs([client.get_experiment_by_name("tiny_test_bundle").experiment_id])
    assert re.fullmatch(r"ShallowSegNet-DiceCELoss-lr0\.001-\d{8}-\d{6}", run.info.run_name)
    assert run.data.params["bundle_version"] == "0.1.2" and run.data.params["train_cases"] == "4"
    assert {"train_loss", "lr_group_0", "val_mean_dice", "best_val_mean_dice"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "bundle" in artifacts and any(p.startswith("config_") and p.endswith(".json") for p in artifacts)


def test_is_terminal_tells_a_sized_terminal_from_a_file(tmp_path):
    fcntl, termios = pytest.importorskip("fcntl"), pytest.importorskip("termios")  # POSIX pseudo-terminals
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty, open(tmp_path / "log.txt", "w") as log_file:
        assert not is_terminal(tty)  # 0 columns: tqdm would draw nothing there
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        assert is_terminal(tty) and not is_terminal(log_file)
    os.close(master)
    assert not is_terminal()  # pytest captures stderr


def test_loop_progress_logs_sparse_lines_without_a_terminal(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="loop_test"), LoopProgress(20, "inference", unit="image", percent_step=25, logger=logging.getLogger("loop_test")) as progress:
        for _ in range(20):
            progress.update()
    lines = [r.getMessage() for r in caplog.records if r.name == "loop_test"]
    assert [line.split(" (")[0] for line in lines] == ["inference: 5/20", "inference: 10/20", "inference: 15/20", "inference: 20/20"]
    assert re.fullmatch(r"inference: 20/20 \(100%\) \S+ image/s elapsed \d+:\d\d:\d\d ETA 0:00:00", lines[-1])
    assert capsys.readouterr().err == ""  # no bar


def test_loop_progress_draws_a_tqdm_bar_and_keeps_log_records_above_it(caplog, capsys):
    own = logging.getLogger("own_console_handler")  # like MONAI's StatsHandler logger
    own.addHandler(logging.StreamHandler(sys.stderr))
    own.propagate = False
    handlers = {"root": list(logging.getLogger().handlers), "own": list(own.handlers)}
    with caplog.at_level(logging.INFO, logger="loop_test"), LoopProgress(8, "inference", unit="image", bar=True, logger=logging.getLogger("loop_test")) as progress:
        for i in range(8):
            progress.update()
            if i == 3:
                assert own.handlers != handlers["own"]  # its records go through tqdm.write, above the bar
                own.warning("half way")
    err = capsys.readouterr().err
    assert "inference: 100%" in err and "8/8" in err and "image/s" in err and "half way" in err
    assert not [r for r in caplog.records if r.name == "loop_test"]  # the bar replaces the lines
    assert {"root": logging.getLogger().handlers, "own": own.handlers} == handlers  # console handlers given back
    own.handlers.clear()


def test_progress_logger_bar_logs_only_epoch_ends(caplog, capsys):
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(0.25)})
    ProgressLogger(interval=1, name="progress_test", bar=True).attach(trainer)
    with caplog.at_level(logging.INFO, logger="progress_test"):
        trainer.run(range(5), max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "progress_test"]
    assert [line.split(" (")[0] for line in lines] == ["epoch 1/2 iter 5/5", "epoch 2/2 iter 5/5"]
    err = capsys.readouterr().err
    assert "training: 100%" in err and "10/10" in err and "loss=0.2500" in err and "epoch=2/2" in err
