"""Per-case metrics table and summary of an evaluation run, as an Ignite handler for MONAI evaluators."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from monai.metrics import ConfusionMatrixMetric, compute_confusion_matrix_metric
from monai.utils import IgniteInfo, min_version, optional_import

from custom_nets.atomic_write import write_csv_atomic, write_json_atomic

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import(
        "ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine", as_type="decorator"
    )

__all__ = ["CaseMetricsSaver", "case_name"]

SUMMARY_STATS = ("mean", "std", "median", "min", "max")


def case_name(case: Mapping[str, Any], key: str = "image") -> str:
    """The file name (without folders) that ``case[key]``'s metadata was loaded from, or ``"case"`` when unknown."""
    meta = getattr(case.get(key), "meta", None) or case.get(f"{key}_meta_dict") or {}
    name = meta.get("filename_or_obj", "")
    return os.path.basename(str(name).rstrip("/\\")) or "case"


class CaseMetricsSaver:
    """
    Write one row per case (every metric of every case) and a summary (mean, std, median, min, max
    over the cases) when an evaluator finishes its epoch; MONAI's ``MetricsSaver`` writes one file per
    metric instead.

    Columns come from two sources:

    - ``metrics``: MONAI metric handlers attached to the same evaluator (``MeanDice``,
      ``MeanIoUHandler``, ``HausdorffDistance``, ``ConfusionMatrix`` ...): their per-case buffers,
      so every value is computed once. A confusion-matrix handler gives its metric (precision,
      recall ...) per case. A metric with several channels gives one column per channel.
    - ``case_metrics``: callables that take one case (the batch item merged with the post-processed
      output: ``pred``, ``label``, ``image`` and any datalist keys) and return ``{column: value}``,
      e.g. :class:`custom_nets.metrics.head_circumference.HeadCircumference`.

The means of the ``publish`` columns are put into ``engine.state.metrics``, so ``StatsHandler`` and
``MLFlowHandler`` log them next to MONAI's metrics (attach this handler before those).

    Non-finite values (an empty prediction's Hausdorff distance) are written as they are and left
    out of the summary; the summary counts the cases used. Files are written atomically, to
    ``output_dir``: ``metrics_per_case.csv``, ``metrics_summary.csv`` and ``metrics_summary.json``.

    Distributed evaluation (``torch.distributed`` initialised, e.g. a bundle's ``multi_gpu_evaluate.json``
    under ``torchrun``): attach the handler on every rank, as saving is collective. The rows of all
    ranks are gathered (``all_gather_object``; MONAI's metric buffers gather themselves) and put back
    in dataset order from the indices of the data loader's sampler (a ``DistributedSampler``), so the
    files equal those of one process; a case that a padding sampler (``even_divisible=True``) gives
    twice is written once. Every rank publishes the same means; only rank 0 writes and logs.

    Args:
        output_dir: folder of the three files (created when missing).
        metrics: column name -> MONAI metric handler (an ``IgniteMetricHandler``) of the evaluator.
        case_metrics: callables ``case -> {column: value}``.
        case_key: key whose metadata names the case (its file name is the ``case`` column).
        channel_names: names of metric channels for metrics with more than one channel
            (default: channel indices).
        publish: columns whose mean goes into ``engine.state.metrics`` (e.g. ``["hc_abs_error_mm"]``).
        per_case_file: name of the per-case CSV.
        summary_file: name of the summary JSON; the summary CSV has the same name with ``.csv``.

    Example (an ``evaluate.json`` entry of ``validate#handlers``)::

        {"_target_": "custom_nets.handlers.case_metrics_saver.CaseMetricsSaver",
         "output_dir": "@output_dir",
         "metrics": {"dice": "@validate#key_metric#val_mean_dice", "hd95": "@validate#additional_metrics#val_hd95"},
         "case_metrics": ["$custom_nets.metrics.head_circumference.HeadCircumference()"],
         "publish": ["hc_abs_error_mm"]}
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        metrics: Mapping[str, Any] | None = None,
        case_metrics: Sequence[Callable[[Mapping[str, Any]], Mapping[str, Any]]] = (),
        case_key: str = "image",
        channel_names: Sequence[str] | None = None,
        publish: Sequence[str] = (),
        per_case_file: str = "metrics_per_case.csv",
        summary_file: str = "metrics_summary.json",
        name: str | None = None,
    ) -> None:
        self.output_dir = os.fspath(output_dir)
        self.metrics = dict(metrics or {})
        for column, handler in self.metrics.items():
            if not hasattr(handler, "metric_fn"):
                raise TypeError(f"metric '{column}' must be a MONAI metric handler (with metric_fn), got {type(handler).__name__}")
        self.case_metrics = list(case_metrics)
        self.case_key = case_key
        self.channel_names = list(channel_names) if channel_names is not None else None
        self.publish = list(publish)
        self.per_case_file = per_case_file
        self.summary_file = summary_file
        self._name = name
        self.logger = logging.getLogger(name)
        self._cases: list[str] = []
        self._rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: the evaluator (``decollate=True``, MONAI's default) whose metric handlers are in ``metrics``.
        """
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _reset(self, engine: Engine) -> None:
        self._cases, self._rows = [], []

    def _collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if not isinstance(batch, list) or not isinstance(output, list):
            raise TypeError("CaseMetricsSaver needs per-case items: use it on an evaluator with decollate=True")
        for item, result in zip(batch, output):
            case = {**item, **result}
            row: dict[str, Any] = {}
            for fn in self.case_metrics:
                row.update(fn(case))
            self._cases.append(case_name(case, self.case_key))
            self._rows.append(row)

    def _handler_columns(self, column: str, handler: Any) -> dict[str, np.ndarray]:
        """Per-case values of one metric handler, ``{column: (N,)}`` (one column per channel)."""
        buffer = handler.metric_fn.get_buffer()
        if buffer is None:
            return {}
        values = torch.as_tensor(buffer).detach().float().cpu()
        if isinstance(handler.metric_fn, ConfusionMatrixMetric):
            names = handler.metric_fn.metric_name
            per_name = {n: compute_confusion_matrix_metric(n, values) for n in names}
            if len(per_name) == 1:
                return self._split_channels(column, next(iter(per_name.values())))
            out: dict[str, np.ndarray] = {}
            for n, v in per_name.items():
                out.update(self._split_channels(f"{column}_{n.replace(' ', '_')}", v))
            return out
        return self._split_channels(column, values)

    def _split_channels(self, column: str, values: torch.Tensor) -> dict[str, np.ndarray]:
        values = values.reshape(values.shape[0], -1).numpy().astype(np.float64)
        if values.shape[1] == 1:
            return {column: values[:, 0]}
        names = self.channel_names or [str(i) for i in range(values.shape[1])]
        return {f"{column}_{names[i]}": values[:, i] for i in range(values.shape[1])}

    def _positions(self, engine: Engine, rank: int, world_size: int) -> list[int]:
        """Dataset indices of this rank's cases, in the order they were evaluated."""
        n = len(self._cases)
        if world_size == 1:
            return list(range(n))
        loader = getattr(engine.state, "dataloader", None) or getattr(engine, "data_loader", None)
        sampler = getattr(loader, "sampler", None)
        indices = list(sampler) if isinstance(sampler, torch.utils.data.DistributedSampler) else []
        if len(indices) == n:
            return [int(i) for i in indices]
        # no sampler to ask (or a partial epoch): a DistributedSampler without shuffling deals cases round-robin
        return [rank + k * world_size for k in range(n)]

    def _gathered(self, engine: Engine) -> tuple[list[int], list[str], list[dict[str, Any]], int]:
        """``(positions, cases, rows, rank)`` of all ranks, rank after rank (the order MONAI's metric buffers gather in)."""
        distributed = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        local = (self._positions(engine, rank, world_size), self._cases, self._rows)
        parts: list[Any] = [local]
        if world_size > 1:
            parts = [None] * world_size
            dist.all_gather_object(parts, local)
        positions, cases, rows = ([x for part in parts for x in part[i]] for i in range(3))
        return positions, cases, rows, rank

    def _save(self, engine: Engine) -> None:
        positions, cases, rows, rank = self._gathered(engine)
        # back to dataset order, each case once (a padding DistributedSampler repeats some)
        first: dict[int, int] = {}
        for i in sorted(range(len(cases)), key=positions.__getitem__):
            first.setdefault(positions[i], i)
        order = list(first.values())
        columns: dict[str, list[Any]] = {}
        for column, handler in self.metrics.items():
            for name, values in self._handler_columns(column, handler).items():
                if len(values) != len(cases):
                    raise RuntimeError(
                        f"metric '{column}' holds {len(values)} cases but {len(cases)} were evaluated; "
                        "is its handler attached to this evaluator?"
                    )
                columns[name] = [values[i] for i in order]
        cases, rows = [cases[i] for i in order], [rows[i] for i in order]
        n = len(cases)
        case_columns = list(dict.fromkeys(k for row in rows for k in row))
        for name in case_columns:
            columns[name] = [row.get(name) for row in rows]

        # text columns (e.g. ``hc_note``, why a case has no HC) go to the per-case table only
        summary = {name: _summarise(values) for name, values in columns.items() if not any(isinstance(v, str) for v in values)}
        for name in self.publish:
            if name not in summary:
                raise KeyError(f"cannot publish '{name}': no such column (columns: {list(summary)})")
            if summary[name]["count"]:
                engine.state.metrics[name] = summary[name]["mean"]

        if rank > 0:
            return
        per_case = [{"case": case, **{name: columns[name][i] for name in columns}} for i, case in enumerate(cases)]
        write_csv_atomic(os.path.join(self.output_dir, self.per_case_file), per_case, ["case", *columns])
        summary_rows = [{"metric": name, **stats} for name, stats in summary.items()]
        base = os.path.splitext(self.summary_file)[0]
        write_csv_atomic(os.path.join(self.output_dir, f"{base}.csv"), summary_rows, ["metric", *SUMMARY_STATS, "count"])
        write_json_atomic(os.path.join(self.output_dir, self.summary_file), {"cases": n, "metrics": summary})
        self.logger.info(
            f"per-case metrics of {n} cases in {os.path.join(self.output_dir, self.per_case_file)}; "
            + ", ".join(f"{k} {v['mean']:.4g}" for k, v in summary.items() if v["count"])
        )


def _summarise(values: Sequence[Any]) -> dict[str, Any]:
    finite = np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    if finite.size == 0:
        return {**{s: None for s in SUMMARY_STATS}, "count": 0}
    stats = {
        "mean": finite.mean(),
        "std": finite.std(ddof=1) if finite.size > 1 else 0.0,
        "median": np.median(finite),
        "min": finite.min(),
        "max": finite.max(),
    }
    return {**{k: float(v) for k, v in stats.items()}, "count": int(finite.size)}
