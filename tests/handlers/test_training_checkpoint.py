"""
TrainingCheckpoint on real MONAI/Ignite engines, in process: a run stopped by an exception (between
epochs, mid-epoch, SIGTERM) and resumed ends where an uninterrupted run ends; wrong files are refused.
AtomicCheckpointSaver: a failed best-model write leaves the previous model.pt, a missing one is no error.
The bundle CLI with a real SIGKILL is in test_resume_cli.py.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from ignite.engine import Engine
from monai.handlers import LrScheduleHandler, MeanDice, MLFlowHandler, StatsHandler, ValidationHandler, from_engine
from monai.losses import DiceCELoss
from monai.transforms import Activationsd, AsDiscreted, Compose
from monai.utils import set_determinism

from custom_nets.errors import InputError
from custom_nets.handlers.atomic_checkpoint_saver import AtomicCheckpointSaver
from custom_nets.handlers.training_checkpoint import TrainingCheckpoint, saved_run_name
from custom_nets.tracking.params import find_attached
from custom_nets.tracking.resumed_run import ENDED_TAG, BufferedIterationLog

MAX_EPOCHS = 4
BATCHES = 3  # iterations per epoch


class Stop(RuntimeError):
    pass


def _data(seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(BATCHES * 2, 1, 16, 16, generator=generator)
    return [{"image": image, "label": (image > 0.5).float()} for image in images]


def _net(out_channels=2) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, out_channels, 1))


def _evaluator(net, handlers=()) -> SupervisedEvaluator:
    post = Compose([Activationsd("pred", softmax=True), AsDiscreted(["pred", "label"], argmax=[True, False], to_onehot=2)])
    return SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=torch.utils.data.DataLoader(_data(2), batch_size=2), network=net,
        postprocessing=post, key_val_metric={"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
        val_handlers=list(handlers),
    )  # fmt: skip


def _run(
    tmp_path, resume=False, stop=None, max_epochs=MAX_EPOCHS, out_channels=2, run_name="net-loss-lr0.1-x",
    val_stop=None, mlflow=False,
):
    """
    Build fresh objects (as a restarted process would) and train; ``stop=(event, when)`` raises there,
    ``val_stop`` likewise on the validator. ``mlflow``: MONAI's MLflow handlers on both engines, as
    ``--tracking mlflow`` adds them, on a sqlite store in ``tmp_path``.
    """
    set_determinism(seed=0)
    net = _net(out_channels)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    loader = torch.utils.data.DataLoader(_data(), batch_size=2, shuffle=False)
    trainers = []
    tracking = dict(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment_name="resume", run_name=run_name)
    val_handlers = [AtomicCheckpointSaver(str(tmp_path / "models"), {"model": net}, save_key_metric=True, key_metric_filename="model.pt")]
    if mlflow:  # as MONAI's bundle tracking settings: the validator logs at the trainer's epoch and keeps the run open
        val_handlers.append(
            MLFlowHandler(
                iteration_log=False, close_on_complete=False, global_epoch_transform=lambda x: trainers[0].state.epoch,
                **tracking,
            )
        )
    evaluator = _evaluator(net, val_handlers)
    if val_stop is not None:
        evaluator.add_event_handler(*val_stop)
    checkpoint = TrainingCheckpoint(
        tmp_path / "models" / "last_checkpoint.pt", {"model": net, "optimizer": optimizer, "lr_scheduler": scheduler},
        resume=resume, run_name=run_name,
    )  # fmt: skip
    # the bundles' order: lr step, checkpoint, then validation of the weights just kept
    handlers = [LrScheduleHandler(scheduler), checkpoint, ValidationHandler(1, evaluator), StatsHandler(iteration_log=False)]
    if mlflow:  # per-iteration train_loss and lr, as MONAI's bundle tracking settings
        loss = from_engine(["loss"], first=True)
        handlers.append(MLFlowHandler(tag_name="train_loss", output_transform=loss, close_on_complete=True, **tracking))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=loader, network=net, optimizer=optimizer,
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True), train_handlers=handlers,
    )  # fmt: skip
    trainers.append(trainer)
    trainer.state.iterations_run = 0  # iterations this process ran (the engine's own count is restored)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: setattr(e.state, "iterations_run", e.state.iterations_run + 1))
    if stop is not None:
        event, action = stop
        trainer.add_event_handler(event, action)
    trainer.run()
    return trainer, net, scheduler, evaluator


def _raise(engine):
    raise Stop("simulated crash")


def _weights(net) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer, net, scheduler, evaluator = _run(tmp_path_factory.mktemp("full"))
    return _weights(net), scheduler.get_last_lr(), evaluator.state.best_metric


def test_resume_after_a_crash_between_epochs_ends_like_an_uninterrupted_run(tmp_path, uninterrupted):
    with pytest.raises(Stop):
        _run(tmp_path, stop=(Events.EPOCH_STARTED(once=3), _raise))
    saved = torch.load(tmp_path / "models" / "last_checkpoint.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 2 * BATCHES  # epoch 2 complete, the crash lost nothing

    trainer, net, scheduler, evaluator = _run(tmp_path, resume=True)
    weights, lr, best = uninterrupted
    assert trainer.state.iterations_run == 2 * BATCHES  # only epochs 3 and 4 ran again
    assert trainer.state.epoch == MAX_EPOCHS
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert scheduler.get_last_lr() == lr and evaluator.state.best_metric == best


def test_resume_after_a_crash_mid_epoch_loses_nothing_already_trained(tmp_path):
    crash_at = 2 * BATCHES + 1
    with pytest.raises(Stop):
        _run(tmp_path, stop=(Events.ITERATION_COMPLETED(once=crash_at), _raise))
    saved = torch.load(tmp_path / "models" / "last_checkpoint.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == crash_at  # saved on the exception

    trainer, *_ = _run(tmp_path, resume=True)
    assert trainer.state.iteration == MAX_EPOCHS * BATCHES
    assert trainer.state.iterations_run == MAX_EPOCHS * BATCHES - crash_at


def test_an_iteration_cut_short_is_trained_again(tmp_path):
    crash_in = 2 * BATCHES + 2  # Ignite has counted it, the optimizer step may not have happened
    with pytest.raises(Stop):
        _run(tmp_path, stop=(Events.ITERATION_STARTED(once=crash_in), _raise))
    saved = torch.load(tmp_path / "models" / "last_checkpoint.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == crash_in - 1
    trainer, *_ = _run(tmp_path, resume=True)
    assert trainer.state.iterations_run == MAX_EPOCHS * BATCHES - (crash_in - 1)


def test_a_crash_in_the_last_iteration_of_an_epoch_keeps_the_iterations_before_it(tmp_path):
    crash_in = 2 * BATCHES
    with pytest.raises(Stop):
        _run(tmp_path, stop=(Events.ITERATION_STARTED(once=crash_in), _raise))
    saved = torch.load(tmp_path / "models" / "last_checkpoint.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == crash_in - 1


def test_sigterm_saves_the_state_and_stops(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match="SIGTERM"):
        _run(tmp_path, stop=(Events.ITERATION_COMPLETED(once=BATCHES + 2), lambda e: os.kill(os.getpid(), signal.SIGTERM)))
    assert signal.getsignal(signal.SIGTERM) is before
    saved = torch.load(tmp_path / "models" / "last_checkpoint.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == BATCHES + 2
    trainer, *_ = _run(tmp_path, resume=True)
    assert trainer.state.iteration == MAX_EPOCHS * BATCHES


def test_the_best_model_tracking_is_restored(tmp_path, uninterrupted):
    with pytest.raises(Stop):
        _run(tmp_path, stop=(Events.EPOCH_STARTED(once=3), _raise))
    saved = torch.load(tmp_path / "models" / "last_checkpoint.pt", weights_only=True)["best_model_tracking"]
    assert saved["saver"]["_saved"] and saved["best_metric_epoch"] in (1, 2)
    trainer, net, scheduler, evaluator = _run(tmp_path, resume=True)
    # the same best epoch as without the crash: a resumed run does not restart the comparison from scratch
    _, _, best = uninterrupted
    assert evaluator.state.best_metric == best
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.parametrize("stop_at", [Events.STARTED, Events.EPOCH_COMPLETED], ids=["before-the-log", "after-the-log"])
def test_a_stop_in_validation_gives_one_validation_point_per_epoch_of_the_kept_weights(tmp_path, uninterrupted, stop_at):
    """
    Stopped in epoch 2's validation, before or after the validator's MLflow log (the handler runs after the
    log): the resumed run has one val point per epoch, and epoch 2's is that of the checkpoint's weights.
    """
    import mlflow

    runs = []

    def stop_in_epoch_2(validator):
        runs.append(stop_at)
        if len(runs) == 2:  # the second validation, of epoch 2
            raise Stop("killed in validation")

    with pytest.raises(Stop):
        _run(tmp_path, mlflow=True, val_stop=(stop_at, stop_in_epoch_2))
    saved = torch.load(tmp_path / "models" / "last_checkpoint.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 2 * BATCHES and saved["validated_epoch"] == 1  # epoch 2 kept, not validated
    kept = _net()
    kept.load_state_dict(saved["model"])
    revalidation = _evaluator(kept)
    revalidation.run()

    trainer, net, scheduler, evaluator = _run(tmp_path, resume=True, mlflow=True)
    assert trainer.state.iterations_run == 2 * BATCHES  # epoch 2 was not trained again
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "val_mean_dice")
    assert sorted(point.step for point in history) == list(range(1, MAX_EPOCHS + 1))
    assert [p.value for p in history if p.step == 2] == [pytest.approx(revalidation.state.metrics["val_mean_dice"])]
    weights, lr, best = uninterrupted
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert evaluator.state.best_metric == best  # epoch 2's validation counted in the best-model tracking
    assert torch.load(tmp_path / "models" / "last_checkpoint.pt", weights_only=True)["validated_epoch"] == MAX_EPOCHS


def _killed(engine):
    """Stop as a SIGKILL would: nothing more saved or logged on the way out."""
    for handler in find_attached(engine, TrainingCheckpoint):
        handler.save = lambda *args, **kwargs: None
        handler._iteration_logs = []  # the points held back die with the process
    raise Stop("killed")


def _mlflow_runs(tmp_path) -> tuple[Any, list]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return client, client.search_runs([client.get_experiment_by_name("resume").experiment_id])


def _steps(client, run, key: str) -> list[int]:
    return sorted(point.step for point in client.get_metric_history(run.info.run_id, key))


def test_iteration_points_are_logged_once_after_a_stop_between_the_checkpoint_and_their_log(tmp_path, monkeypatch):
    """Killed half-way through logging epoch 2's points, just written to the checkpoint: the resume logs the rest once."""
    flush = BufferedIterationLog.flush

    def half_then_killed(log, skip_logged=False):
        if not skip_logged and log.points and log.points[0][3] == BATCHES + 1:  # epoch 2's points
            log.points = log.points[: len(log.points) // 2]
            flush(log)
            raise Stop("killed while logging")
        flush(log, skip_logged)

    monkeypatch.setattr(BufferedIterationLog, "flush", half_then_killed)
    with pytest.raises(Stop):
        _run(tmp_path, mlflow=True)
    monkeypatch.undo()
    assert len(torch.load(tmp_path / "models" / "last_checkpoint.pt", weights_only=True)["mlflow_unlogged"][0]) == 2 * BATCHES
    trainer, *_ = _run(tmp_path, resume=True, mlflow=True)
    assert trainer.state.iterations_run == 2 * BATCHES
    client, runs = _mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FINISHED"]
    for key in ("train_loss", "lr_group_0"):
        assert _steps(client, runs[0], key) == list(range(1, MAX_EPOCHS * BATCHES + 1)), key


def test_a_resume_without_a_checkpoint_continues_the_run_the_killed_process_opened(tmp_path):
    first, second = "net-loss-lr0.1-20260101-000000", "net-loss-lr0.1-20260101-000100"
    with pytest.raises(Stop):
        _run(tmp_path, mlflow=True, run_name=first, stop=(Events.ITERATION_COMPLETED(once=2), _killed))
    assert not (tmp_path / "models" / "last_checkpoint.pt").exists()
    _run(tmp_path, resume=True, mlflow=True, run_name=second)
    assert saved_run_name(tmp_path / "models" / "last_checkpoint.pt") == first
    client, runs = _mlflow_runs(tmp_path)
    assert [(r.info.run_name, r.info.status) for r in runs] == [(first, "FINISHED")]
    assert _steps(client, runs[0], "train_loss") == list(range(1, MAX_EPOCHS * BATCHES + 1))
    assert _steps(client, runs[0], "val_mean_dice") == list(range(1, MAX_EPOCHS + 1))


@pytest.mark.parametrize("resume, change", [(False, {}), (True, {"max_epochs": MAX_EPOCHS - 1})], ids=["fresh-start", "other-schedule"])
def test_a_run_nothing_can_continue_is_ended_as_killed_in_one_line(tmp_path, caplog, resume, change):
    first, second = "net-loss-lr0.1-20260101-000000", "net-loss-lr0.1-20260101-000100"
    with pytest.raises(Stop):
        _run(tmp_path, mlflow=True, run_name=first, stop=(Events.ITERATION_COMPLETED(once=2), _killed))
    with caplog.at_level("WARNING"):
        _run(tmp_path, resume=resume, mlflow=True, run_name=second, **change)
    client, runs = _mlflow_runs(tmp_path)
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [(first, "KILLED"), (second, "FINISHED")]
    killed = next(r for r in runs if r.info.status == "KILLED")
    assert killed.data.tags[ENDED_TAG] == f"killed before it could continue; training goes on in run {second}"
    assert [r.message for r in caplog.records if "as KILLED" in r.message] == [
        f"MLflow: ended run(s) {first} of {tmp_path / 'models' / 'last_checkpoint.pt'} as KILLED (nothing can continue them); "
        f"this training logs into {second}"
    ]


def test_a_checkpoint_of_the_earlier_handler_order_counts_as_validated(tmp_path):
    _run(tmp_path, max_epochs=2)
    checkpoint = tmp_path / "models" / "last_checkpoint.pt"
    content = torch.load(checkpoint, weights_only=True)
    del content["validated_epoch"]  # written after validation, before this key existed
    torch.save(content, checkpoint)
    trainer, net, scheduler, evaluator = _run(tmp_path, resume=True, max_epochs=2)
    assert evaluator.state.iteration == 0  # epoch 2 was not validated again: the validator never ran


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, caplog):
    trainer, *_ = _run(tmp_path, resume=True)
    assert trainer.state.iterations_run == MAX_EPOCHS * BATCHES
    assert (tmp_path / "models" / "last_checkpoint.pt").is_file()


def test_the_run_name_is_kept_for_mlflow(tmp_path):
    assert saved_run_name(tmp_path / "models" / "last_checkpoint.pt") is None
    _run(tmp_path, max_epochs=1, run_name="AdaptiveCENet-HybridDiceBoundaryLoss-lr0.001-20261121-101010")
    assert saved_run_name(tmp_path / "models" / "last_checkpoint.pt") == "AdaptiveCENet-HybridDiceBoundaryLoss-lr0.001-20261121-101010"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_epochs": MAX_EPOCHS + 2}, "written by a run with max_epochs=4, this run has max_epochs=6"),
        ({"out_channels": 3}, r"does not fit this run's model \(RuntimeError: Error\(s\) in loading state_dict for Sequential: size mismatch for 2.weight"),
    ],
)
def test_a_checkpoint_of_another_run_is_refused_naming_the_file(tmp_path, change, message):
    _run(tmp_path, max_epochs=MAX_EPOCHS)
    with pytest.raises(InputError, match=message) as error:
        _run(tmp_path, resume=True, **change)
    assert str(tmp_path / "models" / "last_checkpoint.pt") in str(error.value)
    assert "\n" not in str(error.value)


def test_a_model_file_is_not_a_training_checkpoint(tmp_path):
    _run(tmp_path, max_epochs=1)
    checkpoint = tmp_path / "models" / "last_checkpoint.pt"
    os.replace(tmp_path / "models" / "model.pt", checkpoint)  # a best-model file holds the weights only
    with pytest.raises(InputError, match="last_checkpoint.pt: not a training checkpoint of this run .no model, optimizer, lr_scheduler, trainer"):
        _run(tmp_path, resume=True, max_epochs=1)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "models").mkdir()
    with open(tmp_path / "models" / "last_checkpoint.pt", "wb") as f:
        pickle.dump({"trainer": Payload()}, f)
    with pytest.raises(InputError, match="last_checkpoint.pt"):
        _run(tmp_path, resume=True)
    assert not (tmp_path / "pwned").exists()


def test_leftovers_of_a_killed_write_are_removed_on_resume(tmp_path):
    _run(tmp_path, max_epochs=1)
    leftover = tmp_path / "models" / ".last_checkpoint.pt.abc123.tmp.pt"
    leftover.write_bytes(b"half a checkpoint")
    _run(tmp_path, resume=True, max_epochs=1)
    assert not leftover.exists()


class _Weights(torch.nn.Module):
    """A model whose state dict can be made unpicklable: ``torch.save`` then fails half-way through writing."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((64, 64), value))
        self.break_pickling = False

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.break_pickling:
            state["unpicklable"] = lambda: None
        return state


def _validate(saver: AtomicCheckpointSaver, scores: list[float]) -> None:
    """Run an engine for one epoch per score, its key metric ``val_mean_dice`` set to that score."""
    engine = Engine(lambda e, batch: None)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: e.state.metrics.update(val_mean_dice=scores[e.state.epoch - 1]))
    saver.attach(engine)
    engine.run([0], max_epochs=len(scores))


def _saver(tmp_path, net) -> AtomicCheckpointSaver:
    return AtomicCheckpointSaver(
        str(tmp_path / "models"), {"model": net}, save_key_metric=True, key_metric_filename="model.pt",
        key_metric_name="val_mean_dice",
    )  # fmt: skip


def test_a_best_model_write_that_fails_half_way_keeps_the_previous_model(tmp_path):
    net = _Weights(1.0)
    saver = _saver(tmp_path, net)
    _validate(saver, [0.5])
    model = tmp_path / "models" / "model.pt"
    assert torch.load(model, weights_only=True)["w"][0, 0] == 1.0
    with torch.no_grad():
        net.w.fill_(2.0)
    net.break_pickling = True  # the next, better epoch fails inside torch.save, as a kill there would stop it
    with pytest.raises(Exception, match="(?i)pickle|lambda"):
        _validate(saver, [0.5, 0.9])
    assert torch.load(model, weights_only=True)["w"][0, 0] == 1.0  # the previous best, whole
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.pt"]  # and no half-written file beside it


def test_a_missing_best_model_is_written_again_not_an_error(tmp_path):
    """A resumed run whose model.pt is gone (MONAI's saver deletes it before writing the next) saves the next best."""
    net = _Weights(1.0)
    saver = _saver(tmp_path, net)
    _validate(saver, [0.5])
    state = saver._key_metric_checkpoint.state_dict()  # what TrainingCheckpoint saves and restores on resume
    (tmp_path / "models" / "model.pt").unlink()
    resumed = _saver(tmp_path, net)
    resumed.load_state_dict(state)
    _validate(resumed, [0.9])
    assert (tmp_path / "models" / "model.pt").is_file()


def test_leftovers_of_a_killed_best_model_write_are_removed(tmp_path):
    (tmp_path / "models").mkdir()
    leftover = tmp_path / "models" / ".model.pt.abc123.tmp.pt"
    leftover.write_bytes(b"half a model")
    _saver(tmp_path, _Weights(1.0))
    assert not leftover.exists()
