"""Resumable training: one checkpoint file with everything a preempted or crashed run needs to continue."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from custom_nets.atomic_write import remove_leftovers
from custom_nets.checkpoints import load_checkpoint, save_checkpoint
from custom_nets.errors import InputError, describe_error
from custom_nets.tracking.params import find_attached
from custom_nets.tracking.resumed_run import BufferedIterationLog, open_training_run

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import(
        "ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine", as_type="decorator"
    )

__all__ = ["TrainingCheckpoint", "saved_run_name", "exit_if_finished"]

# keys of the checkpoint besides the objects of ``save_dict`` and "trainer"
_BEST = "best_model_tracking"
_RUN_NAME = "run_name"
_VALIDATED = "validated_epoch"  # the last epoch whose validation ran to its end
_UNLOGGED = "mlflow_unlogged"  # per trainer MLFlowHandler: iteration points not in MLflow yet


def _unwrap(obj: Any) -> Any:
    """The network inside DistributedDataParallel / DataParallel, so checkpoints load either way."""
    return obj.module if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else obj


def saved_run_name(checkpoint_file: str | os.PathLike) -> str | None:
    """
    The MLflow run name stored in a :class:`TrainingCheckpoint` file, or ``None`` when the file does not
    exist or holds no name. A resumed bundle run passes it to MONAI's ``MLFlowHandler``, which then
    continues that (unfinished) run instead of starting a new one.
    """
    if not Path(checkpoint_file).is_file():
        return None
    name = load_checkpoint(checkpoint_file, mmap=True, description="training checkpoint").get(_RUN_NAME)
    return str(name) if name else None


def _validation_due(epoch: int, validated_epoch: int, interval: int) -> bool:
    """Whether ``epoch`` was due for validation (every ``interval`` epochs) and its validation did not finish."""
    return epoch >= 1 and validated_epoch < epoch and epoch % max(1, int(interval)) == 0


def exit_if_finished(checkpoint_file: str | os.PathLike, resume: bool, max_epochs: int, val_interval: int = 1) -> None:
    """
    With ``resume``, end the process (exit status 0, one log line) when ``checkpoint_file`` holds a run
    that trained all ``max_epochs`` epochs and validated the last one that was due: a job script that
    always passes ``--resume true`` and ran again after the end has nothing to do. Run before the
    trainer starts, so that MLflow is not asked for a run: MONAI's ``MLFlowHandler`` does not continue a
    FINISHED run and would open a second, empty one of the same name.
    """
    path = Path(checkpoint_file)
    if not resume or not path.is_file():
        return
    content = load_checkpoint(path, mmap=True, description="training checkpoint")
    saved = content.get("trainer") or {}
    epoch_length, iteration = saved.get("epoch_length"), saved.get("iteration", 0)
    if not epoch_length or saved.get("max_epochs") != max_epochs or iteration < max_epochs * epoch_length:
        return  # unfinished, or another schedule: the handler resumes it or refuses it in one line
    if _validation_due(max_epochs, int(content.get(_VALIDATED, max_epochs)), val_interval):
        return  # the last validation was cut short: the resumed run validates it
    logging.getLogger(__name__).info(f"resume: {path} holds a finished run ({max_epochs} of {max_epochs} epochs): nothing to do")
    raise SystemExit(0)


class TrainingCheckpoint:
    """
    Ignite handler that makes a training run resumable, like nnU-Net's ``--c`` or a Model Zoo bundle
    restarted with a ``CheckpointLoader`` on the trainer, in one file:

    - after every epoch (``EPOCH_COMPLETED``, once the learning-rate step is done and before validation)
      it writes ``checkpoint_file`` with the ``save_dict`` objects (model, optimizer, lr scheduler, ...), the
      trainer's state (epoch, iteration), the validator's best-metric tracking (so that a resumed run does
      not overwrite a better ``model.pt``), the last validated epoch, the MLflow ``run_name`` and the
      MLflow iteration points not logged yet; when the
      validator completes it writes the file again with that epoch marked validated. The file is replaced
      atomically: a kill during the write leaves the previous file whole.
    - when training stops on an exception mid-epoch (``EXCEPTION_RAISED``; Ctrl-C, and SIGTERM, the
      preemption signal of Slurm and Kubernetes, which it turns into an exception while training runs) it
      writes the state reached, then re-raises. An exception between epochs (in validation, say) keeps the
      last complete epoch's file instead, so that no epoch-end step is skipped on resume.
    - with ``resume=True`` it restores that file at ``STARTED``, and the run goes on from the saved
      iteration to the configured ``max_epochs`` with the same learning-rate schedule. A missing file
      starts from scratch (logged), so a job script can always pass ``--resume true``. A file from another
      schedule (``max_epochs``, iterations per epoch) or network is refused with one line naming it.
      When the saved epoch was due for validation (``ValidationHandler``'s interval) but not marked
      validated (the run was killed before or during validation), the validator runs once for it before
      training goes on, so that its metric point, best-model update and key-metric list exist. If the
      validator's ``MLFlowHandler`` run already holds the key metric at that step (killed after the log, before
      the mark), the validation still runs, for the best-model tracking, but is not logged a second time:
      each epoch has one validation point, of the weights that were kept.
    - with MONAI's ``MLFlowHandler`` on the trainer (``--tracking mlflow``), one run per checkpoint file
      (:mod:`custom_nets.tracking.resumed_run`): at ``STARTED`` it opens the run (the checkpoint's; on a
      resume without a checkpoint, the run the killed process opened; else a new one) and ends as KILLED
      the runs of this file that nothing can continue. The handler's per-iteration points (``train_loss``,
      ``lr_group_<i>``) are held back and logged just after each checkpoint write, and the points not yet
      logged are saved in the checkpoint: each iteration is logged once, from the weights that were kept.
      ``train_loss`` therefore reaches MLflow once per epoch, in one batch.

    After a resume, the random augmentations and the shuffling follow a new stream: a resumed run is not
    bit-identical to an uninterrupted one. With ``DistributedDataParallel`` only rank 0 writes; every rank
    resumes from the same file.

    Attach it after ``LrScheduleHandler`` (and other epoch-end steps of training, so the epoch's file includes
    their work), before ``ValidationHandler`` (so the weights that get validated and logged are already
    kept: a kill after the validation's MLflow log cannot make the resumed run train that epoch again) and
    before ``StatsHandler`` (whose exception handler re-raises before later handlers run).

    Args:
        checkpoint_file: the file, e.g. ``<bundle>/models/last_checkpoint.pt``.
        save_dict: the objects to save and restore, each with ``state_dict``/``load_state_dict``
            (``{"model": net, "optimizer": opt, "lr_scheduler": sched}``); the trainer is added as ``"trainer"``.
        resume: restore ``checkpoint_file`` when training starts.
        run_name: MLflow run name to store (see :func:`saved_run_name`).
        validator: the evaluator whose best metric and best-model ``CheckpointSaver`` are tracked; found
            through the trainer's ``ValidationHandler`` when ``None``.
        stop_on_sigterm: turn SIGTERM into an exception while training runs (main thread only), so the
            state is saved before the process ends.
        name: logger name; ``None`` uses ``engine.logger``.

    Example, in a bundle's ``train#handlers`` (after the lr handler, before the validation handler)::

        {"_target_": "custom_nets.handlers.training_checkpoint.TrainingCheckpoint",
         "checkpoint_file": "$@ckpt_dir + '/last_checkpoint.pt'", "resume": "@resume",
         "save_dict": {"model": "@network", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler"},
         "run_name": "@run_name"}

    Then ``python -m monai.bundle run --config_file configs/train.json --resume true`` continues a run.
    """

    def __init__(
        self,
        checkpoint_file: str | os.PathLike,
        save_dict: Mapping[str, Any],
        resume: bool = False,
        run_name: str | None = None,
        validator: Engine | None = None,
        stop_on_sigterm: bool = True,
        name: str | None = None,
    ) -> None:
        if "trainer" in save_dict:
            raise ValueError("save_dict must not hold 'trainer': the engine this handler is attached to is saved as 'trainer'")
        self.checkpoint_file = Path(checkpoint_file)
        self.save_dict = dict(save_dict)
        self.resume = bool(resume)
        self.run_name = run_name
        self.validator = validator
        self.stop_on_sigterm = stop_on_sigterm
        self._name = name
        self.logger = logging.getLogger(name)
        self._previous_sigterm: Any = None
        self._handled_error: BaseException | None = None
        self._iteration_open = False  # an exception inside an iteration: that iteration is not done
        self._trainer: Engine | None = None
        self._validated_epoch = 0
        self._saved_epoch = -1  # the epoch whose end state the checkpoint file holds
        self._pending = False  # the restored epoch still needs its validation
        self._restored = False  # started from the checkpoint file
        self._unlogged: list[Any] = []  # iteration points of the checkpoint not in MLflow yet
        self._iteration_logs: list[BufferedIterationLog] = []

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: the Ignite trainer.
        """
        if self._name is None:
            self.logger = engine.logger
        if not engine.has_event_handler(self.started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.started)
            engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_opened)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_closed)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
            engine.add_event_handler(Events.COMPLETED, self.completed)

    # --- event handlers -------------------------------------------------------------------------

    def started(self, engine: Engine) -> None:
        """Find the validator, restore the checkpoint when resuming, and catch SIGTERM."""
        self._trainer = engine
        validation = find_attached(engine, "ValidationHandler")
        if self.validator is None:
            self.validator = getattr(validation[0], "validator", None) if validation else None
        if self.validator is not None and not self.validator.has_event_handler(self._validated, Events.COMPLETED):
            self.validator.add_event_handler(Events.COMPLETED, self._validated)
        self._warn_if_validation_first(engine)
        if self.resume:
            self.restore(engine)
        self._open_mlflow_run(engine)
        if self.resume:
            self._pending = bool(validation) and self._validation_pending(engine, validation[0])
            if self._pending and not engine.has_event_handler(self._validate_pending, Events.STARTED):
                # after the other STARTED handlers (the trainer's MLflow run is open then), as in a normal epoch;
                # Ignite's loop over the handler list reaches one appended while it runs
                engine.add_event_handler(Events.STARTED, self._validate_pending, validation[0])
        self._catch_sigterm()

    def _open_mlflow_run(self, engine: Engine) -> None:
        """Open the trainer's MLflow run (see :mod:`custom_nets.tracking.resumed_run`) and hold back its iteration log."""
        trackers = find_attached(engine, "MLFlowHandler")
        if not trackers:
            return
        first = trackers[0]
        name = self.run_name or first.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        adopt = self.resume and not self._restored
        name = open_training_run(first, self.checkpoint_file, engine, name, adopt=adopt, logger=self.logger)
        validator_trackers = find_attached(self.validator, "MLFlowHandler") if self.validator is not None else []
        for tracker in (*trackers, *validator_trackers):  # MONAI's handlers join the open run of this name
            tracker.run_name = name
        self.run_name = name
        first.start(engine)
        self._iteration_logs = [BufferedIterationLog.of(tracker) for tracker in trackers if tracker.iteration_log]
        for log, points in zip(self._iteration_logs, self._unlogged):
            log.points = [list(p) for p in points]
            log.flush(skip_logged=True)  # the process that wrote the checkpoint may have logged them already
        self._unlogged = []

    def _flush_iteration_logs(self) -> None:
        for log in self._iteration_logs:
            log.flush()

    def _iterations_done(self, engine: Engine) -> int:
        """Ignite counts an iteration when it starts: one cut short by an exception is not done (trained again)."""
        return engine.state.iteration - (1 if self._iteration_open else 0)

    def _iteration_opened(self, engine: Engine) -> None:
        self._iteration_open = True

    def _iteration_closed(self, engine: Engine) -> None:
        self._iteration_open = False

    def epoch_completed(self, engine: Engine) -> None:
        self.save(engine)
        self._saved_epoch = engine.state.epoch

    def _validated(self, validator: Engine) -> None:
        """Validator COMPLETED: mark the trainer's epoch validated, and save the mark with the new best metric."""
        if self._trainer is None:
            return
        self._validated_epoch = self._trainer.state.epoch
        # only once this epoch's file exists: saving earlier (handler order of old configs) would store the
        # epoch before its lr step; epoch_completed then saves the mark
        if self._saved_epoch == self._trainer.state.epoch:
            self.save(self._trainer)

    def _validation_pending(self, engine: Engine, validation: Any) -> bool:
        """Whether the restored epoch was due for validation (epoch-level interval) and not marked validated."""
        if not getattr(validation, "epoch_level", False):
            return False
        return _validation_due(engine.state.epoch, self._validated_epoch, getattr(validation, "interval", 1))

    def _validate_pending(self, engine: Engine, validation: Any) -> None:
        """Run the validation the kill interrupted, without logging it again if MLflow already has it."""
        if not self._pending:  # stays attached (removing it from the list Ignite is looping over would skip one)
            return
        self._pending = False
        trackers = find_attached(self.validator, "MLFlowHandler") if self.validator is not None else []
        logged = any(self._logged_at(tracker, engine.state.epoch) for tracker in trackers)
        self.logger.info(
            f"resume: validating epoch {engine.state.epoch}, whose validation the stop interrupted"
            + (" (its metrics are already in MLflow: not logged again)" if logged else "")
        )
        muted = [(t, t.epoch_logger, t.iteration_logger) for t in trackers] if logged else []
        for tracker, *_ in muted:
            tracker.epoch_logger = tracker.iteration_logger = lambda engine: None
        try:
            validation(engine)
        finally:
            for tracker, epoch_logger, iteration_logger in muted:
                tracker.epoch_logger, tracker.iteration_logger = epoch_logger, iteration_logger

    def _logged_at(self, tracker: Any, step: int) -> bool:
        """Whether the MLflow run of ``tracker`` (MONAI ``MLFlowHandler``) holds the key metric at ``step``."""
        key = getattr(self.validator.state, "key_metric_name", None)
        if not key:
            return False
        tracker.start(self.validator)  # opens (finds) the run as the validator's own STARTED would; idempotent
        if tracker.cur_run is None:
            return False
        history = tracker.client.get_metric_history(tracker.cur_run.info.run_id, key)
        return any(point.step == step for point in history)

    def _warn_if_validation_first(self, engine: Engine) -> None:
        """A ValidationHandler before this handler validates (and logs) epochs that a kill can make run again."""
        owners = []
        for func, _, _ in engine._event_handlers.get(Events.EPOCH_COMPLETED, []):
            parent = getattr(func, "_parent", None)  # Ignite keeps a weakref to filtered handlers (every=...)
            owners.append(getattr(parent() if parent is not None else func, "__self__", None))
        names = [type(owner).__name__ for owner in owners]
        if "ValidationHandler" in names and self in owners:
            if names.index("ValidationHandler") < owners.index(self):
                self.logger.warning(
                    "TrainingCheckpoint is attached after ValidationHandler: a run killed between the validation "
                    "and the checkpoint trains that epoch again and logs its validation twice; attach it before"
                )

    def exception_raised(self, engine: Engine, error: BaseException) -> None:
        """Save the state reached mid-epoch, then re-raise ``error`` (Ignite would swallow it otherwise)."""
        self._release_sigterm()
        if error is self._handled_error:  # Ignite fires the event again while the error climbs out of the epoch
            raise error
        self._handled_error = error
        epoch_length = engine.state.epoch_length
        if epoch_length and self._iterations_done(engine) % epoch_length != 0:
            self.save(engine, log_iterations=False)
            try:
                self._flush_iteration_logs()
            except Exception as e:  # noqa: BLE001 - the error that stopped training is the one to raise
                self.logger.warning(f"MLflow: iteration points not logged ({describe_error(e)}); the checkpoint keeps them for the resume")
            self.logger.warning(
                f"training stopped in epoch {engine.state.epoch} ({type(error).__name__}); state saved to "
                f"{self.checkpoint_file}: rerun with --resume true to continue"
            )
        raise error

    def completed(self, engine: Engine) -> None:
        self._release_sigterm()

    # --- saving and restoring -------------------------------------------------------------------

    def checkpoint(self, engine: Engine) -> dict[str, Any]:
        """What :meth:`save` writes: plain tensors, numbers and strings only, so ``weights_only`` loads it."""
        content: dict[str, Any] = {key: _unwrap(obj).state_dict() for key, obj in self.save_dict.items()}
        content["trainer"] = {**engine.state_dict(), "iteration": self._iterations_done(engine)}
        best = self._best_model_saver()
        state = getattr(self.validator, "state", None)
        if state is not None:
            content[_BEST] = {
                "best_metric": float(state.best_metric),
                "best_metric_epoch": int(state.best_metric_epoch),
                "saver": best._key_metric_checkpoint.state_dict() if best is not None else None,
            }
        content[_VALIDATED] = int(self._validated_epoch)
        content[_UNLOGGED] = [[list(p) for p in log.points] for log in self._iteration_logs]
        if self.run_name:
            content[_RUN_NAME] = str(self.run_name)
        return content

    def save(self, engine: Engine, log_iterations: bool = True) -> None:
        """Write the checkpoint atomically (rank 0 only), then log the iteration points it covers to MLflow."""
        if idist.get_rank() > 0:
            return
        content = self.checkpoint(engine)
        save_checkpoint(content, self.checkpoint_file)
        self.logger.debug(f"epoch {engine.state.epoch}: training state saved to {self.checkpoint_file}")
        if log_iterations:
            self._flush_iteration_logs()

    def restore(self, engine: Engine) -> None:
        """Load the checkpoint into the ``save_dict`` objects, the trainer and the best-model tracking."""
        path = self.checkpoint_file
        self._remove_partial_writes()
        if not path.is_file():
            self.logger.info(f"resume: no checkpoint at {path}, training from the start")
            return
        content = load_checkpoint(path, description="training checkpoint")
        missing = [key for key in (*self.save_dict, "trainer") if key not in content]
        if missing:
            raise InputError(f"{path}: not a training checkpoint of this run (no {', '.join(missing)})")
        saved = content["trainer"]
        for key in ("max_epochs", "epoch_length"):
            planned = getattr(engine.state, key)
            if saved.get(key) != planned:
                raise InputError(
                    f"{path}: written by a run with {key}={saved.get(key)}, this run has {key}={planned}; "
                    f"resume with the same settings, or move the file away to start a new run"
                )
        try:
            for key, obj in self.save_dict.items():
                _unwrap(obj).load_state_dict(content[key])
        except (RuntimeError, ValueError, KeyError) as e:
            raise InputError(f"{path}: does not fit this run's {key} ({describe_error(e)})") from None
        engine.load_state_dict(saved)
        self._restore_best(content.get(_BEST))
        self._unlogged = list(content.get(_UNLOGGED, []))
        self._restored = True
        # files of the earlier handler order were saved after validation: their epoch counts as validated
        self._validated_epoch = int(content.get(_VALIDATED, engine.state.epoch))
        if engine.state.iteration % engine.state.epoch_length == 0:
            self._saved_epoch = engine.state.epoch
        self.logger.info(
            f"resume: continuing from iteration {engine.state.iteration} ({engine.state.epoch} of "
            f"{engine.state.max_epochs} epochs complete), from {path}"
        )

    def _restore_best(self, best: Mapping[str, Any] | None) -> None:
        state = getattr(self.validator, "state", None)
        if not best or state is None:
            return
        state.best_metric = best["best_metric"]
        state.best_metric_epoch = best["best_metric_epoch"]
        saver = self._best_model_saver()
        if saver is not None and best.get("saver") is not None:
            saver.load_state_dict(best["saver"])

    def _best_model_saver(self) -> Any:
        """The validator's ``CheckpointSaver`` that keeps the best model by key metric, if any."""
        if self.validator is None:
            return None
        # MONAI's CheckpointSaver can load its key-metric list (load_state_dict) but offers no getter for it
        savers = [s for s in find_attached(self.validator, "CheckpointSaver") if s._key_metric_checkpoint is not None]
        return savers[0] if savers else None

    def _remove_partial_writes(self) -> None:
        """Delete temporary files a kill during :meth:`save` left beside the checkpoint."""
        if idist.get_rank() == 0:
            remove_leftovers(self.checkpoint_file.parent, self.checkpoint_file.name)

    # --- SIGTERM --------------------------------------------------------------------------------

    def _catch_sigterm(self) -> None:
        if not self.stop_on_sigterm or threading.current_thread() is not threading.main_thread():
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            raise SystemExit(f"training stopped by SIGTERM; rerun with --resume true to continue from {self.checkpoint_file}")

        self._previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def _release_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
