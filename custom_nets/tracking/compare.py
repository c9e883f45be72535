"""
Compare the MLflow runs of an experiment: a table (markdown printed, CSV written) sorted by a key
metric, and a PNG with that metric's per-epoch curves.

    python -m custom_nets.tracking.compare --tracking_uri sqlite:///eval/mlruns.db \\
        --experiment fetal_head_us_segmentation [--runs ID1,ID2] [--metric val_mean_dice] [--output_dir DIR]
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from custom_nets.atomic_write import atomic_path
from custom_nets.errors import InputError
from custom_nets.tracking.params import TrackingUnreachableError, check_tracking_uri

__all__ = ["CompareError", "compare", "compare_command", "markdown_table", "parse_run_ids"]

# params shown in the table, in this order, when any compared run has them (see MLflowRunParams)
KEY_PARAMS = ("network", "network_params", "loss", "optimizer", "lr", "batch_size", "max_epochs", "train_cases")


class CompareError(InputError):
    """A comparison that cannot be made (unknown experiment or run, no run with the metric); one line."""


def parse_run_ids(runs: Any) -> list[str]:
    """
    Run ids from ``"id1,id2"``, a list/tuple (what ``fire`` makes of ``--runs id1,id2``) or ``None`` (all runs).
    """
    if runs is None or runs == "":
        return []
    items = runs if isinstance(runs, (list, tuple)) else str(runs).split(",")
    return [str(r).strip() for r in items if str(r).strip()]


def _client(tracking_uri: str) -> Any:
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).is_file():
        raise CompareError(f"no MLflow database at {tracking_uri} (nothing was tracked there yet)")
    try:
        check_tracking_uri(tracking_uri)
    except TrackingUnreachableError as e:
        raise CompareError(str(e)) from None
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def _select_runs(client: Any, tracking_uri: str, experiment: str, run_ids: Sequence[str]) -> list[Any]:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise CompareError(f"experiment '{experiment}' not found at {tracking_uri} (experiments there: {known})")
    if run_ids:
        selected = []
        for run_id in run_ids:
            try:
                run = client.get_run(run_id)
            except MlflowException:
                raise CompareError(f"run '{run_id}' not found at {tracking_uri}") from None
            if run.info.experiment_id != exp.experiment_id:
                raise CompareError(f"run '{run_id}' is not in experiment '{experiment}'")
            selected.append(run)
        return selected
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    if not runs:
        raise CompareError(f"experiment '{experiment}' at {tracking_uri} has no runs")
    return runs


def _number(text: Any) -> Any:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and "." not in str(text) and "e" not in str(text).lower() else value


def _train_time(run: Any) -> float | None:
    if "train_time_s" in run.data.metrics:
        return float(run.data.metrics["train_time_s"])
    if run.info.end_time and run.info.start_time:
        return (run.info.end_time - run.info.start_time) / 1000.0
    return None


def compare(
    tracking_uri: str,
    experiment: str,
    runs: Any = None,
    metric: str = "val_mean_dice",
    output_dir: str | os.PathLike = ".",
    mode: str = "max",
) -> list[dict[str, Any]]:
    """
    Compare runs of ``experiment`` by the best value of ``metric`` over their epochs. Writes
    ``<output_dir>/compare_<experiment>.csv`` and ``compare_<experiment>_<metric>.png`` (each written to a
    temporary file first, then moved into place) and returns the table rows, best run first.

    Runs that never logged ``metric`` are left out with a note on stderr.

    Args:
        tracking_uri: the MLflow tracking URI (``sqlite:///...`` or ``http://host:port``).
        experiment: the experiment name (by default the bundle folder's name).
        runs: run ids to compare (``"id1,id2"`` or a list); all runs of the experiment when ``None``.
        metric: the per-epoch metric to rank by and to plot.
        output_dir: where the CSV and the PNG go (created if missing).
        mode: ``"max"`` (Dice-like) or ``"min"`` (loss- or distance-like).

    Raises:
        CompareError: unreachable URI, unknown experiment or run id, empty experiment, or no selected
            run has ``metric``.

    Example::

        rows = compare("sqlite:///eval/mlruns.db", "fetal_head_us_segmentation")
        print(markdown_table(rows))
    """
    if mode not in ("max", "min"):
        raise CompareError(f"mode must be 'max' or 'min', got '{mode}'")
    client = _client(str(tracking_uri))
    selected = _select_runs(client, str(tracking_uri), experiment, parse_run_ids(runs))

    rows, curves = [], {}
    best_fn = max if mode == "max" else min
    for run in selected:
        history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: (m.step, m.timestamp))
        history = [m for m in history if not math.isnan(m.value)]
        label = run.info.run_name or run.info.run_id[:8]
        if not history:
            print(f"note: run {label} ({run.info.run_id}) has no '{metric}', left out", file=sys.stderr)
            continue
        best = best_fn(history, key=lambda m: m.value)
        params = run.data.params
        row: dict[str, Any] = {"run": label, "run_id": run.info.run_id, "status": run.info.status}
        row.update({k: _number(params[k]) for k in KEY_PARAMS if k in params})
        if "network" not in row and "architecture" in run.data.tags:  # set by architectures()
            row["network"] = run.data.tags["architecture"]
        row[f"best_{metric}"] = best.value
        row["best_epoch"] = best.step
        row[f"last_{metric}"] = history[-1].value
        row.update({k: v for k, v in sorted(run.data.metrics.items()) if k.startswith("test_")})
        train_time = _train_time(run)
        row["train_time_s"] = round(train_time, 1) if train_time is not None else None
        rows.append(row)
        curves[label] = [(m.step, m.value) for m in history]
    if not rows:
        raise CompareError(f"no selected run of experiment '{experiment}' has logged '{metric}'")
    rows.sort(key=lambda r: r[f"best_{metric}"], reverse=mode == "max")
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_{_safe(experiment)}"
    _write_csv(rows, out / f"{stem}.csv")
    _plot(curves, [r["run"] for r in rows], metric, experiment, out / f"{stem}_{_safe(metric)}.png")
    return rows


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns = ["rank", "run"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _cell(value: Any, column: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if column.endswith("_s") else f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`compare` as a markdown table (run ids shortened to 8 characters)."""
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(c), c) for c in columns]
        if "run_id" in columns:
            cells[columns.index("run_id")] = str(row.get("run_id", ""))[:8]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    columns = _columns(rows)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _plot(
    curves: dict[str, list[tuple[int, float]]], order: Sequence[str], metric: str, title: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label in order:
        steps, values = zip(*curves[label])
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{title}: {metric}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def compare_command(
    tracking_uri: str,
    experiment: str,
    runs: Any = None,
    metric: str = "val_mean_dice",
    output_dir: str = ".",
    mode: str = "max",
) -> None:
    """
    Command-line form of :func:`compare`: prints the markdown table and where the CSV and PNG went;
    on a :class:`CompareError` prints ``error: ...`` on stderr and exits with status 1 (no traceback).
    Meant for ``fire``: ``python -m custom_nets.tracking.compare --tracking_uri URI --experiment NAME``.
    """
    try:
        rows = compare(tracking_uri, experiment, runs=runs, metric=metric, output_dir=output_dir, mode=mode)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(markdown_table(rows))
    stem = Path(output_dir) / f"compare_{_safe(experiment)}"
    print(f"\nwritten: {stem}.csv, {stem}_{_safe(metric)}.png")


def main() -> None:
    import fire

    fire.Fire(compare_command)


if __name__ == "__main__":
    main()
