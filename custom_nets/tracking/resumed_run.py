"""
One consistent MLflow run per training output folder, whatever moment a kill comes at. Used by
:class:`~custom_nets.handlers.training_checkpoint.TrainingCheckpoint` on the trainer's MONAI ``MLFlowHandler``
(the one ``--tracking mlflow`` adds), so the bundles need no other handler.

- :func:`open_training_run` opens the run before MONAI's handler looks for it: the run of the checkpoint
  when resuming one; when resuming without a checkpoint (killed before the first epoch ended), the run that
  the killed process opened; otherwise a new one. Every run is created with the tag
  ``custom_nets.checkpoint_file`` (the checkpoint file it writes), and the RUNNING runs of the same file
  that nothing can continue any more are ended as KILLED with a ``custom_nets.ended`` tag saying why.
- :class:`BufferedIterationLog` holds back what the handler logs per iteration (``train_loss``,
  ``lr_group_<i>``) until a checkpoint covering those iterations is written: iterations after the last
  checkpoint, which a kill makes the resumed run train again, are then logged once, with the values of
  the weights that were kept. The points not yet logged go into the checkpoint, so a kill between the
  checkpoint and the log loses none.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.utils import flatten_dict

from custom_nets.tracking.params import check_tracking_uri

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["BufferedIterationLog", "CHECKPOINT_TAG", "ENDED_TAG", "open_training_run"]

CHECKPOINT_TAG = "custom_nets.checkpoint_file"  # the TrainingCheckpoint file a run writes
ENDED_TAG = "custom_nets.ended"  # why a run was ended as KILLED


def _run_stem(name: str) -> str:
    """A run name without the ``-YYYYmmdd-HHMMSS`` that :func:`~custom_nets.tracking.run_name` appends."""
    parts = name.rsplit("-", 2)
    return parts[0] if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() else name


def _continues(run: Any, engine: Engine, run_name: str) -> bool:
    """Whether ``run``, opened by a process killed before its first checkpoint, can go on as this training."""
    params = run.data.params
    planned = {key: str(getattr(engine.state, key, None)) for key in ("max_epochs", "epoch_length")}
    return all(params.get(key) == value for key, value in planned.items()) and _run_stem(run.info.run_name) == _run_stem(run_name)


def open_training_run(
    tracker: Any, checkpoint_file: str | Path, engine: Engine, run_name: str, adopt: bool, logger: logging.Logger
) -> str:
    """
    Open the MLflow run the trainer's ``tracker`` (MONAI ``MLFlowHandler``) is to log into, end the
    runs of ``checkpoint_file`` that no process can continue, and return the run's name.

    Args:
        tracker: the trainer's ``MLFlowHandler``; its store and experiment are used.
        checkpoint_file: the training checkpoint file; runs are matched to it by the tag :data:`CHECKPOINT_TAG`.
        engine: the trainer, whose ``max_epochs`` and ``epoch_length`` a run to adopt must have.
        run_name: the name of the run to continue (read from the checkpoint) or to create.
        adopt: resuming without a checkpoint: continue the newest RUNNING run of ``checkpoint_file``
            (a process killed before its first checkpoint) when it has the same schedule and, apart
            from the time stamp, the same name.
        logger: where the one line about ended runs goes.
    """
    check_tracking_uri(str(tracker.client.tracking_uri))  # fail fast, before MLflow retries an unreachable server
    tracker._set_experiment()  # MONAI's own lookup/creation (artifact location included)
    client, experiment_id = tracker.client, tracker.experiment.experiment_id
    file_tag = str(Path(checkpoint_file).resolve())
    runs = client.search_runs([experiment_id], filter_string="attributes.status != 'FINISHED'")  # newest first
    ours = [r for r in runs if r.data.tags.get(CHECKPOINT_TAG) == file_tag]
    if adopt:
        orphan = next((r for r in ours if r.info.status == "RUNNING" and _continues(r, engine, run_name)), None)
        if orphan is not None:
            run_name = orphan.info.run_name
            logger.info(f"resume: no checkpoint yet; continuing MLflow run {run_name}, opened by the killed process")
    # MONAI's handler joins any unfinished run of this name: leave exactly one, RUNNING and tagged
    same_name = [r for r in runs if r.info.run_name == run_name]
    if same_name:
        run_id = same_name[0].info.run_id
        client.set_tag(run_id, CHECKPOINT_TAG, file_tag)
        if same_name[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
    else:
        client.create_run(experiment_id, run_name=run_name, tags={CHECKPOINT_TAG: file_tag})
    ended = [r for r in ours if r.info.status == "RUNNING" and r.info.run_name != run_name]
    for run in ended:
        client.set_tag(run.info.run_id, ENDED_TAG, f"killed before it could continue; training goes on in run {run_name}")
        client.set_terminated(run.info.run_id, "KILLED")
    if ended:
        names = ", ".join(r.info.run_name for r in ended)
        logger.warning(f"MLflow: ended run(s) {names} of {checkpoint_file} as KILLED (nothing can continue them); this training logs into {run_name}")
    return run_name


class BufferedIterationLog:
    """
    Hold back the points a MONAI ``MLFlowHandler`` logs at each iteration until :meth:`flush`, called
    once a checkpoint covering those iterations is written. The points are what the handler itself
    would log (its ``iteration_logger`` or default log), with the time they were made.

    Args:
        tracker: the trainer's ``MLFlowHandler``; its ``iteration_logger`` is replaced.

    :attr:`points` (``[key, value, timestamp_ms, step]`` each) travels in the training checkpoint, so a resumed
    run logs the points the killed one had not.
    """

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.points: list[list[Any]] = []  # [key, value, timestamp_ms, step]
        self._iteration_logger = tracker.iteration_logger
        tracker.iteration_logger = self.collect

    @classmethod
    def of(cls, tracker: Any) -> BufferedIterationLog:
        """The buffer already holding back ``tracker``'s iteration log (an engine run again), or a new one."""
        current = getattr(tracker.iteration_logger, "__self__", None)
        return current if isinstance(current, cls) and current.tracker is tracker else cls(tracker)

    def collect(self, engine: Engine) -> None:
        """Run the handler's iteration log with its metric log diverted into :attr:`points`."""
        tracker = self.tracker
        log_metrics = tracker._log_metrics
        tracker._log_metrics = self._hold
        try:
            (self._iteration_logger or tracker._default_iteration_log)(engine)
        finally:
            tracker._log_metrics = log_metrics

    def _hold(self, metrics: dict[str, Any], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self.points += [[key, float(value), now, int(step or 0)] for key, value in flatten_dict(metrics).items()]

    def flush(self, skip_logged: bool = False) -> None:
        """
        Log the points held back into the handler's run, in one batch (MLflow splits a large one in order).

        Args:
            skip_logged: leave out the points of a step that the run already holds for that key or that
                lies before it: a process killed during or after an earlier flush of the same points.
        """
        from mlflow.entities import Metric

        run = self.tracker.cur_run
        if not self.points or run is None:
            return
        points, client = self.points, self.tracker.client
        if skip_logged:
            last = {}
            for key in dict.fromkeys(p[0] for p in points):
                last[key] = max((m.step for m in client.get_metric_history(run.info.run_id, key)), default=-1)
            points = [p for p in points if p[3] > last[p[0]]]
        client.log_batch(run_id=run.info.run_id, metrics=[Metric(*p) for p in points])
        self.points = []
