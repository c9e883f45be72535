"""
What MONAI's ``MLFlowHandler`` does not log about a training run: the run's parameters (network and
its size, loss, optimizer, data counts, git commit, bundle), the final and best metrics and the model
card; plus informative run names and a fail-fast check of the tracking URI.

MONAI already logs, once ``--tracking mlflow`` is given: the per-iteration loss (``train_loss``) and
learning rate (``lr_group_<i>``), the per-epoch validation metrics (e.g. ``val_mean_dice``),
``max_epochs``/``epoch_length`` and the executed config as an artifact. Nothing here logs those again
(with a ``TrainingCheckpoint``, the per-iteration points reach MLflow after each checkpoint write, once per
epoch: see :mod:`custom_nets.tracking.resumed_run`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.utils import IgniteInfo, min_version, optional_import

from custom_nets.errors import InputError

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import(
        "ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine", as_type="decorator"
    )

__all__ = [
    "MLflowRunParams",
    "TrackingUnreachableError",
    "check_tracking_uri",
    "experiment_name",
    "find_attached",
    "git_commit",
    "open_tracking_store",
    "run_name",
]


# what MONAI 1.6.1 makes of ``save_execute_config`` when ``output_dir`` is a plain path (see MLflowRunParams)
_BROKEN_CONFIG_PATH = re.compile(r"(.+) \+ '/(config_\d{8}_\d{6}\.json)'")


class TrackingUnreachableError(InputError):
    """
    The MLflow tracking URI cannot be used (server down, unwritable folder, unsupported store). An
    :class:`~custom_nets.errors.InputError`, so a bundle that calls ``custom_nets.errors.install_excepthook()``
    ends on this one line instead of a traceback.
    """


def _class_name(obj: Any) -> str:
    """``"UNet"`` for a UNet instance, a class, or the strings ``"UNet"`` / ``"monai.networks.nets.UNet"``."""
    if obj is None:
        return "none"
    if isinstance(obj, str):
        return obj.rsplit(".", 1)[-1]
    if isinstance(obj, Mapping) and "_target_" in obj:  # an un-instantiated config dict
        return _class_name(obj["_target_"])
    obj = getattr(obj, "module", obj)  # DistributedDataParallel / DataParallel wrap the network
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


def run_name(network: Any, loss: Any = None, lr: float | None = None, timestamp: str | None = None) -> str:
    """
    An informative, unique MLflow run name: ``<network>-<loss>-lr<lr>-<YYYYmmdd-HHMMSS>``.

    A unique name also matters for correctness: MONAI's validator ``MLFlowHandler`` joins the newest
    unfinished run *with the same name*, and with no name at all it joins any unfinished run of the
    experiment, such as the leftover of a crashed run.

    Args:
        network: the network (instance, class, ``_target_`` string or config dict).
        loss: the loss (same forms as ``network``); left out of the name when ``None``.
        lr: the initial learning rate; left out when ``None``.
        timestamp: defaults to the local time now.

    Example::

        run_name("custom_nets.AdaptiveCENet", "DiceCELoss", 1e-3, "20260101-120000")
        # 'AdaptiveCENet-DiceCELoss-lr0.001-20260101-120000'

    In a bundle's ``train.json``::

        "run_name": "$custom_nets.tracking.run_name(@network_def, @loss, @learning_rate)"
    """
    parts = [_class_name(network)]
    if loss is not None:
        parts.append(_class_name(loss))
    if lr is not None:
        parts.append(f"lr{float(lr):g}")
    parts.append(timestamp or time.strftime("%Y%m%d-%H%M%S"))
    return "-".join(parts)


def experiment_name(bundle_root: str | os.PathLike) -> str:
    """
    One MLflow experiment per bundle: the bundle folder's name (``bundle_root="."`` works too).

    Example::

        experiment_name("bundles/fetal_head_us_segmentation")  # 'fetal_head_us_segmentation'
    """
    return Path(bundle_root).resolve().name


def git_commit(path: str | os.PathLike = ".") -> dict[str, str]:
    """
    ``{"git_commit": sha, "git_dirty": "true"|"false"}`` for the git checkout holding ``path``, or ``{}``
    when ``path`` is not in a checkout or git is not installed (never raises).
    """
    try:
        folder = Path(path).resolve()
        folder = folder if folder.is_dir() else folder.parent
        run = dict(cwd=folder, capture_output=True, text=True, timeout=10, check=True)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()  # type: ignore[call-overload]
        status = ["git", "status", "--porcelain"]  # untracked (not ignored) files count: uncommitted code
        dirty = subprocess.run(status, **run).stdout.strip()  # type: ignore[call-overload]
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": sha, "git_dirty": str(bool(dirty)).lower()} if sha else {}


def check_tracking_uri(tracking_uri: str, timeout: float = 5.0) -> str:
    """
    Fail fast, with one line naming the URI, when MLflow could not record to ``tracking_uri``:
    an http(s) server that does not answer within ``timeout`` seconds (any HTTP answer, even an error
    status, counts as reachable), a ``sqlite:///`` database whose folder cannot be created, or a bare
    folder / ``file:`` URI (MLflow 3 refuses the file store). Other schemes are passed through.

    Args:
        tracking_uri: the MLflow tracking URI.
        timeout: seconds to wait for an http(s) server.

    Returns:
        ``tracking_uri`` unchanged, so it can wrap a config value:
        ``"tracking_uri": "$custom_nets.tracking.check_tracking_uri('http://host:5000')"``.

    Raises:
        TrackingUnreachableError: the URI cannot be used.
    """
    uri = str(tracking_uri)
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # the server answered; authorisation or routing problems surface from MLflow itself
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnreachableError(
                f"MLflow tracking server {uri} cannot be reached ({reason}); "
                "start it or pass a reachable --tracking_uri"
            ) from None
    elif scheme == "sqlite":
        db_path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        if db_path and db_path != ":memory:":
            try:
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrackingUnreachableError(
                    f"MLflow tracking database {uri} cannot be created ({e.strerror or e})"
                ) from None
    elif scheme in ("", "file") or len(scheme) == 1:  # a bare path (a drive letter on Windows)
        raise TrackingUnreachableError(
            f"MLflow tracking URI {uri} is a folder (file store), which MLflow 3 refuses; "
            "use sqlite:///<path>/mlruns.db or http://host:port"
        )
    return uri


def open_tracking_store(
    output_dir: str | os.PathLike, bundle_root: str | os.PathLike, tracking_uri: str | None = None, experiment: str | None = None
) -> tuple[str, str, Any]:
    """
    The MLflow store of a command that runs several bundle trainings (``architectures``, ``crossval``):
    ``tracking_uri`` (default ``sqlite:///<output_dir>/mlruns.db``) checked with :func:`check_tracking_uri`,
    the experiment name (default the bundle folder's) and an ``MlflowClient``.

    Raises:
        TrackingUnreachableError: the URI cannot be used.
    """
    from monai.utils import path_to_sqlite_uri

    tracking_uri = check_tracking_uri(tracking_uri or path_to_sqlite_uri(str(Path(output_dir) / "mlruns.db")))
    import mlflow  # after the check: importing mlflow takes seconds

    return tracking_uri, experiment or experiment_name(bundle_root), mlflow.MlflowClient(tracking_uri=tracking_uri)


def _handler_owners(engine: Engine) -> Iterator[Any]:
    """The objects whose bound methods (or filtered ``__call__``) are registered on ``engine``."""
    for handlers in engine._event_handlers.values():
        for func, _, _ in handlers:
            parent = getattr(func, "_parent", None)  # Ignite keeps a weakref to filtered handlers
            func = parent() if parent is not None else func
            yield getattr(func, "__self__", func)


def find_attached(engine: Engine, cls: type | str) -> list[Any]:
    """
    The handler objects of class ``cls`` (or a class or base class of that name) attached to ``engine``,
    in attach order.

    Example::

        from monai.handlers import MLFlowHandler
        find_attached(trainer, MLFlowHandler)  # [] when tracking is off
    """
    found: list[Any] = []
    for owner in _handler_owners(engine):
        if isinstance(cls, str):  # by name, subclasses included, so that callers need not import the class
            matches = any(c.__name__ == cls for c in type(owner).__mro__)
        else:
            matches = isinstance(owner, cls)
        if matches and all(owner is not f for f in found):
            found.append(owner)
    return found


def _mlflow_handlers(engine: Engine) -> list[Any]:
    return find_attached(engine, "MLFlowHandler")


class MLflowRunParams:
    """
    Ignite handler that completes MONAI's MLflow tracking of a training run. It does nothing when the
    trainer has no MONAI ``MLFlowHandler`` attached (tracking off, or a rank > 0 process), so it can
    stay in a bundle's ``train#handlers`` for good. When tracking is on:

    - ``STARTED``: checks every tracking URI in use (trainer's and validator's ``MLFlowHandler``) with
      :func:`check_tracking_uri`, so an unreachable server stops training before the first iteration
      with :class:`TrackingUnreachableError` naming the URI. Attach it *before* the ``MLFlowHandler``
      (``--tracking mlflow`` appends that one at the end of ``train#handlers``, so any place works).
    - first ``EPOCH_STARTED`` (the run exists by then): params ``network``, ``network_params``,
      ``loss``, ``optimizer``, ``lr``, ``weight_decay``, ``lr_scheduler``, ``batch_size``, ``amp``,
      ``train_precision``/``channels_last`` (with a ``PrecisionInferer``), ``train_cases``, ``val_cases``,
      ``<name>_cases`` for ``data_counts``, ``image_size``, ``git_commit``/``git_dirty``,
      ``bundle_name``/``bundle_version`` and ``extra_params``.
      Params already in the run (a resumed run) are kept, as MLflow refuses changed values.
    - first ``ITERATION_COMPLETED``: param ``train_image_shape`` (the per-sample shape actually trained on).
    - ``COMPLETED``: metrics ``best_<key metric>``, ``best_<key metric>_epoch``, ``final_<metric>`` for
      each validation metric, ``train_time_s``; artifacts ``bundle/README.md`` (the model card) and
      ``bundle/metadata.json``; and MONAI's executed config when ``MLFlowHandler`` missed it (MONAI 1.6.1
      misnames it when ``--output_dir`` is given as a plain path).

    Args:
        bundle_root: the bundle folder: ``configs/metadata.json`` gives ``bundle_name``/``bundle_version``,
            ``docs/README.md`` is the model card, and the git commit is read there.
        validator: the evaluator run by the trainer; found through the trainer's ``ValidationHandler``
            when ``None``.
        data_counts: extra case counts, e.g. ``{"test": 30}`` (train and val are counted from the
            trainer's and validator's data loaders).
        image_size: the configured image size to log as ``image_size`` (e.g. ``[256, 256]``).
        extra_params: more params to log as they are (e.g. ``{"seed": 0}``).
        model_card: the model card path; defaults to ``<bundle_root>/docs/README.md``. Missing files are
            skipped with a warning.
        check_timeout: seconds to wait for an http(s) tracking server at ``STARTED``.
        name: logger name; ``None`` uses ``engine.logger``.

    Example, in a bundle's ``train#handlers``::

        {"_target_": "custom_nets.tracking.MLflowRunParams", "bundle_root": "@bundle_root",
         "data_counts": {"test": "$len(@test_datalist)"}, "extra_params": {"seed": "@seed"}}

    In Python::

        MLflowRunParams(bundle_root=".").attach(trainer)  # attach before MLFlowHandler(...).attach(trainer)
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike | None = None,
        validator: Engine | None = None,
        data_counts: Mapping[str, int] | None = None,
        image_size: Sequence[int] | int | None = None,
        extra_params: Mapping[str, Any] | None = None,
        model_card: str | os.PathLike | None = None,
        check_timeout: float = 5.0,
        name: str | None = None,
    ) -> None:
        self.bundle_root = Path(bundle_root) if bundle_root is not None else None
        self.validator = validator
        self.data_counts = dict(data_counts or {})
        self.image_size = image_size
        self.extra_params = dict(extra_params or {})
        if model_card is None and self.bundle_root is not None:
            model_card = self.bundle_root / "docs" / "README.md"
        self.model_card = Path(model_card) if model_card is not None else None
        self.check_timeout = check_timeout
        self._name = name
        self.logger = logging.getLogger(name)
        self._tracker: Any = None  # the trainer's MLFlowHandler, None when tracking is off
        self._run_id: str | None = None
        self._shape_logged = False
        self._start_time = 0.0

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: the Ignite trainer (MONAI ``SupervisedTrainer`` or any engine with ``network``,
                ``optimizer``, ``loss_function`` and ``data_loader`` attributes).
        """
        if self._name is None:
            self.logger = engine.logger
        if not engine.has_event_handler(self.started, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.started)
            engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
            engine.add_event_handler(Events.COMPLETED, self.completed)

    # --- event handlers -------------------------------------------------------------------------

    def started(self, engine: Engine) -> None:
        """Find the ``MLFlowHandler`` (tracking on or off) and check its tracking URI."""
        trackers = _mlflow_handlers(engine)
        self._tracker = trackers[0] if trackers else None
        self._run_id = None
        self._shape_logged = False
        self._start_time = time.perf_counter()
        if self._tracker is None:
            return
        if self.validator is None:
            validation = find_attached(engine, "ValidationHandler")
            self.validator = getattr(validation[0], "validator", None) if validation else None
        if self.validator is not None:
            trackers += _mlflow_handlers(self.validator)
        for uri in dict.fromkeys(str(t.client.tracking_uri) for t in trackers):
            check_tracking_uri(uri, timeout=self.check_timeout)

    def epoch_started(self, engine: Engine) -> None:
        """Log the run's params once, after ``MLFlowHandler.start`` has created the run."""
        if self._tracker is None or self._run_id is not None:
            return
        if self._tracker.cur_run is None:
            self.logger.warning("MLflowRunParams: MLFlowHandler has no active run; params not logged")
            return
        self._run_id = self._tracker.cur_run.info.run_id
        self._log_params(self.run_params(engine))

    def iteration_completed(self, engine: Engine) -> None:
        """Log the per-sample shape of the first training batch (channels first, no batch dimension)."""
        if self._run_id is None or self._shape_logged:
            return
        self._shape_logged = True
        batch = engine.state.batch
        if isinstance(batch, Sequence) and batch and isinstance(batch[0], Mapping):
            image = batch[0].get("image")  # MONAI decollates the batch at ITERATION_COMPLETED
        else:
            image = batch.get("image") if isinstance(batch, Mapping) else None
            image = image[0] if hasattr(image, "shape") and len(image.shape) > 1 else None
        if hasattr(image, "shape"):
            self._log_params({"train_image_shape": list(image.shape)})

    def completed(self, engine: Engine) -> None:
        """Log the best and final metrics, the training time and the model card."""
        if self._tracker is None or self._run_id is None:
            return
        metrics = self.final_metrics(engine)
        if metrics:
            self._log_metrics(metrics, step=engine.state.epoch)
        self._log_missed_executed_config()
        for path in (self.model_card, self.bundle_root / "configs" / "metadata.json" if self.bundle_root else None):
            if path is None:
                continue
            if path.is_file():
                self._tracker.client.log_artifact(self._run_id, str(path), artifact_path="bundle")
            else:
                self.logger.warning(f"MLflowRunParams: {path} not found, not logged to MLflow")

    def _log_missed_executed_config(self) -> None:
        """
        Log the executed config that ``MLFlowHandler`` would miss. MONAI 1.6.1 names it by appending
        ``" + '/config_<time>.json'"`` to the config's ``output_dir``; when ``output_dir`` is a plain
        path (``--output_dir /some/dir``) the result is the literal text ``/some/dir + '/config_....json'``,
        no such file exists, and MONAI logs nothing without a word.
        """
        for path in getattr(self._tracker, "artifacts", ()) or ():
            if not path or os.path.exists(path):
                continue
            match = _BROKEN_CONFIG_PATH.fullmatch(str(path))
            real = os.path.join(match.group(1), match.group(2)) if match else None
            if real is not None and os.path.isfile(real):
                self._tracker.client.log_artifact(self._run_id, real)
            else:
                self.logger.warning(f"MLflowRunParams: MLFlowHandler artifact {path!r} does not exist, not logged")

    # --- what gets logged -----------------------------------------------------------------------

    def run_params(self, engine: Engine) -> dict[str, Any]:
        """The params of this run, read from the trainer, the validator and the bundle folder."""
        params: dict[str, Any] = {}
        network = getattr(engine, "network", None)
        if network is not None:
            params["network"] = _class_name(network)
            params["network_params"] = sum(p.numel() for p in network.parameters())
        params["loss"] = _class_name(getattr(engine, "loss_function", None))
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None:
            params["optimizer"] = _class_name(optimizer)
            group = optimizer.param_groups[0]
            params["lr"] = group.get("initial_lr", group.get("lr"))
            if "weight_decay" in group:
                params["weight_decay"] = group["weight_decay"]
        schedulers = find_attached(engine, "LrScheduleHandler")
        if schedulers:
            params["lr_scheduler"] = _class_name(schedulers[0].lr_scheduler)
        loader = getattr(engine, "data_loader", None)
        if getattr(loader, "batch_size", None) is not None:
            params["batch_size"] = loader.batch_size
        if hasattr(engine, "amp"):
            params["amp"] = bool(engine.amp)
        choice = getattr(getattr(engine, "inferer", None), "training_precision", None)  # a PrecisionInferer's
        if choice is not None:
            params["train_precision"], params["channels_last"] = choice.precision, choice.channels_last
        params["max_epochs"] = engine.state.max_epochs
        for split, eng in (("train", engine), ("val", self.validator)):
            dataset = getattr(getattr(eng, "data_loader", None), "dataset", None)
            if dataset is not None and hasattr(dataset, "__len__"):
                params[f"{split}_cases"] = len(dataset)
        params.update({f"{split}_cases": int(count) for split, count in self.data_counts.items()})
        if self.image_size is not None:
            params["image_size"] = self.image_size
        if self.bundle_root is not None:
            params.update(git_commit(self.bundle_root))
            params.update(self._bundle_metadata())
        else:
            params.update(git_commit(os.getcwd()))
        params.update(self.extra_params)
        return params

    def final_metrics(self, engine: Engine) -> dict[str, float]:
        """``best_<key>``, ``best_<key>_epoch``, ``final_<metric>`` (validator) and ``train_time_s``."""
        metrics: dict[str, float] = {}
        state = getattr(self.validator, "state", None)
        key = getattr(state, "key_metric_name", None)
        if key is not None and getattr(state, "best_metric_epoch", -1) != -1:
            metrics[f"best_{key}"] = float(state.best_metric)
            metrics[f"best_{key}_epoch"] = float(state.best_metric_epoch)
        for name, value in (getattr(state, "metrics", None) or {}).items():
            if isinstance(value, (int, float)):
                metrics[f"final_{name}"] = float(value)
        if self._start_time:
            metrics["train_time_s"] = time.perf_counter() - self._start_time
        return metrics

    def _bundle_metadata(self) -> dict[str, str]:
        meta_file = self.bundle_root / "configs" / "metadata.json"  # type: ignore[operator]
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"bundle_name": self.bundle_root.resolve().name}  # type: ignore[union-attr]
        return {
            "bundle_name": meta.get("name", self.bundle_root.resolve().name),  # type: ignore[union-attr]
            "bundle_version": meta.get("version", "unknown"),
        }

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        client = self._tracker.client
        logged = client.get_run(self._run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged and v is not None]
        if new:
            client.log_batch(run_id=self._run_id, params=new)

    def _log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._tracker.client.log_batch(run_id=self._run_id, metrics=batch)
