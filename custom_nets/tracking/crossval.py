"""
K-fold, subject-disjoint cross-validation of a bundle through the real ``python -m monai.bundle`` CLI,
comparable with nnU-Net: the folds are written as nnU-Net's ``splits_final.json``, each fold trains
(one MLflow run, a child of one parent run) and is evaluated on its held-out subjects with every
post-processing the bundle offers; the summary gives mean +- sd across folds and picks the
post-processing, as nnU-Net does.

    python -m custom_nets crossval bundles/fetal_head_us_segmentation ../shared/data/hc18_subset \\
        --folds 5 --epochs 40 --network AdaptiveCENet --tta true

Two cross-validations over the same folds (e.g. two networks) are compared image by image, with a
Wilcoxon signed-rank test, by ``python -m custom_nets crossval_compare DIR_A DIR_B``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom_nets.atomic_write import write_csv_atomic, write_json_atomic, write_text_atomic
from custom_nets.errors import InputError
from custom_nets.tracking.architectures import NETWORKS, _cli_value, _epochs_key, _run_ids, network_def_for
from custom_nets.tracking.params import TrackingUnreachableError, open_tracking_store

__all__ = [
    "CrossvalError",
    "kfold_subjects",
    "nnunet_splits",
    "crossval",
    "crossval_command",
    "compare_crossvals",
    "crossval_compare_command",
]

#: Per-case columns summarised across folds: higher is better for dice, lower for the others.
METRICS = ("dice", "hd95_mm", "hc_abs_error_mm")
PER_IMAGE_FILE = "per_image.csv"
SPLITS_FILE = "splits_final.json"


class CrossvalError(InputError):
    """The cross-validation cannot start or ended without a result; one line naming the problem."""


def _subject(item: Mapping[str, Any]) -> str:
    """The subject of a datalist item: its ``subject``, else its ``case``, else its image file's name."""
    for key in ("subject", "case"):
        if item.get(key):
            return str(item[key])
    image = item.get("image")
    image = image[0] if isinstance(image, (list, tuple)) else image
    return os.path.basename(str(image))


def case_id(item: Mapping[str, Any]) -> str:
    """A case identifier as nnU-Net writes it: the image file name without extension (``001_HC``)."""
    if item.get("case"):
        return str(item["case"])
    image = item.get("image")
    image = image[0] if isinstance(image, (list, tuple)) else image
    return re.sub(r"(\.nii\.gz|\.[A-Za-z0-9]+)$", "", os.path.basename(str(image)))


def kfold_subjects(subjects: Sequence[str], folds: int = 5, seed: int = 0) -> list[list[str]]:
    """
    ``folds`` disjoint groups of ``subjects`` of near-equal size: sorted, shuffled with
    ``random.Random(seed)``, dealt round-robin.

    Raises:
        CrossvalError: fewer subjects than folds, or fewer than 2 folds.

    Example::

        kfold_subjects(["001", "002", "003", "004"], folds=2)  # [['003', '001'], ['004', '002']]
    """
    subjects = sorted(set(subjects))
    if folds < 2:
        raise CrossvalError(f"--folds must be at least 2, got {folds}")
    if len(subjects) < folds:
        raise CrossvalError(f"{folds} folds need at least {folds} subjects, the dataset has {len(subjects)}")
    random.Random(seed).shuffle(subjects)
    return [subjects[f::folds] for f in range(folds)]


def nnunet_splits(items: Sequence[Mapping[str, Any]], fold_subjects: Sequence[Sequence[str]]) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` content: per fold, the case ids to train on and to validate on."""
    splits = []
    for held_out in fold_subjects:
        held = set(held_out)
        splits.append(
            {
                "train": [case_id(i) for i in items if _subject(i) not in held],
                "val": [case_id(i) for i in items if _subject(i) in held],
            }
        )
    return splits


def _bundle_datalist(config_path: Path, bundle: Path, dataset_dir: Path, out: Path) -> list[dict]:
    """Every labelled item of the bundle's datalist for ``dataset_dir`` (its train, validation and test parts)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_path))
    if "datalist" not in parser.get():
        raise CrossvalError(f"{config_path}: the bundle has no 'datalist' to cross-validate")
    parser["bundle_root"] = str(bundle)
    parser["dataset_dir"] = str(dataset_dir)
    parser["output_dir"] = str(out)
    if "datalist_file" in parser.get():
        parser["datalist_file"] = str(out / "datalist_all.json")
    try:
        datalist = parser.get_parsed_content("datalist")
    except Exception as e:  # a failing expression: one line, the bundle's own error first
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, InputError):
            raise CrossvalError(str(cause)) from None
        raise CrossvalError(f"{config_path}: cannot build the datalist of {dataset_dir} ({type(cause).__name__}: {cause})") from None
    if not isinstance(datalist, Mapping):
        raise CrossvalError(f"{config_path}: 'datalist' is not a dict of splits")
    items = [dict(i) for key in ("training", "validation", "test") for i in datalist.get(key, [])]
    if not items:
        raise CrossvalError(f"{config_path}: the datalist of {dataset_dir} is empty")
    return items


def _read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for key, value in row.items():
            try:
                parsed[key] = float(value) if value not in ("", None) else None
            except ValueError:
                parsed[key] = value
        if parsed.get("hd95_px") is not None and parsed.get("pixel_size_mm") is not None:
            parsed["hd95_mm"] = parsed["hd95_px"] * parsed["pixel_size_mm"]
        out.append(parsed)
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _summary_rows(per_image: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: each metric's mean +- sd across the fold means, and the pooled per-image figures."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in per_image):
        cases = [r for r in per_image if r["variant"] == variant]
        folds = sorted({r["fold"] for r in cases})
        row: dict[str, Any] = {"variant": variant, "folds": len(folds), "images": len(cases)}
        for metric in METRICS:
            fold_means = [_mean([r.get(metric) for r in cases if r["fold"] == f]) for f in folds]
            fold_means = [m for m in fold_means if m is not None]
            if not fold_means:
                continue
            row[f"{metric}_mean"] = float(np.mean(fold_means))
            row[f"{metric}_sd"] = float(np.std(fold_means, ddof=1)) if len(fold_means) > 1 else 0.0
        errors = [r.get("hc_abs_error_mm") for r in cases]
        if any(e is not None for e in errors):
            row["hc_no_value"] = sum(e is None or not math.isfinite(e) for e in errors)
            finite = [e for e in errors if e is not None and math.isfinite(e)]
            row["hc_within_3mm_pct"] = 100.0 * sum(e <= 3.0 for e in finite) / len(cases)
            row["hc_abs_error_median_mm"] = float(np.median(finite)) if finite else None
        rows.append(row)
    return rows


def _markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| variant | folds | images | Dice | HD95 (mm) | HC error (mm) | HC within 3 mm |", "|---|---|---|---|---|---|---|"]
    for r in rows:

        def cell(metric: str, digits: int) -> str:
            mean = r.get(f"{metric}_mean")
            return "n/a" if mean is None else f"{mean:.{digits}f} +- {r[f'{metric}_sd']:.{digits}f}"

        within = r.get("hc_within_3mm_pct")
        lines.append(
            f"| {r['variant']} | {r['folds']} | {r['images']} | {cell('dice', 4)} | {cell('hd95_mm', 2)} | "
            f"{cell('hc_abs_error_mm', 2)} | {'n/a' if within is None else f'{within:.0f}%'} |"
        )
    return "\n".join(lines)


class _Runner:
    """Runs ``python -m monai.bundle run ...`` for one cross-validation and records what it did."""

    def __init__(self, python: str, net_config: Path, common: list[str]) -> None:
        self.python, self.net_config, self.common = python, net_config, common

    def __call__(self, entry: str, config_files: Sequence[Path], extra: Sequence[str], log: Path) -> int:
        cmd = [self.python, "-m", "monai.bundle", "run", entry,
               "--config_file", repr([str(p) for p in config_files] + [str(self.net_config)])]  # fmt: skip
        cmd += self.common + list(extra)
        print(f"=== {' '.join(cmd)}", flush=True)
        with open(log, "w") as f:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def _datalist_expression(path: Path) -> str:
    return f"$__import__('json').load(open({str(path)!r}))"


def crossval(
    bundle: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    folds: int = 5,
    epochs: int = 10,
    network: str | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.0,
    postprocess: Any = None,
    tta: bool = False,
    ensemble: bool = False,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    output_dir: str | os.PathLike | None = None,
    python: str = sys.executable,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """
    Cross-validate ``bundle`` on ``dataset_dir``: ``folds`` subject-disjoint folds; fold ``f`` trains on
    the other folds' subjects (less ``validation_fraction`` of them, kept for the bundle's checkpoint
    selection) and is evaluated on its own, once per post-processing mode of the bundle
    (``postprocess`` key) and, with ``tta``, once more with flip test-time augmentation.

    With ``test_fraction > 0`` a share of the subjects is held out of all folds; with ``ensemble``
    every fold model and their ensemble (mean softmax) are evaluated on it.

    Writes to ``output_dir`` (default ``<bundle>/eval/crossval``): ``splits_final.json`` (nnU-Net's
    format), ``fold_<f>/`` (datalist, ``models/model.pt``, evaluation tables, logs), ``per_image.csv``
    (every case of every fold and variant), ``summary.csv`` and ``summary.md``. MLflow: one parent run,
    each fold's training a child run (``mlflow.parentRunId``), fold and summary metrics logged.

    Args:
        bundle: the bundle folder.
        dataset_dir: the dataset, passed to the bundle as ``--dataset_dir``.
        folds: number of folds.
        epochs: the training budget of each fold.
        network: a name of :data:`custom_nets.tracking.architectures.NETWORKS`; default the bundle's own.
        seed: the fold shuffle and training seed.
        validation_fraction: share of a fold's training subjects used for checkpoint selection.
        test_fraction: share of all subjects held out of the folds (for ``ensemble``).
        postprocess: modes to evaluate (default: all the bundle's ``POSTPROCESS_MODES`` when its
            ``evaluate.json`` has a ``postprocess`` key).
        tta: also evaluate with flip test-time augmentation (the best post-processing).
        ensemble: also evaluate each fold model and the fold ensemble on the held-out test subjects.
        tracking_uri: MLflow tracking URI; default ``sqlite:///<output_dir>/mlruns.db``.
        experiment: MLflow experiment; default the bundle folder's name.
        output_dir: where everything goes.
        python: the interpreter running the bundle.
        overrides: more ``--key value`` overrides for every training run.

    Returns:
        the summary rows (one per variant).

    Raises:
        CrossvalError: before any training, for a missing bundle config or datalist, an unknown
            network, more folds than subjects, ``ensemble`` without held-out subjects or an
            unreachable tracking URI; after, when no fold could be trained.
    """
    from monai.bundle import ConfigParser

    bundle, dataset_dir = Path(bundle).resolve(), Path(dataset_dir).resolve()
    train_config, eval_config = bundle / "configs" / "train.json", bundle / "configs" / "evaluate.json"
    for path in (train_config, eval_config):
        if not path.is_file():
            raise CrossvalError(f"{path}: bundle config not found")
    if network is not None and network not in NETWORKS:
        raise CrossvalError(f"unknown network '{network}'; choose from {', '.join(NETWORKS)}")
    if ensemble and not test_fraction > 0:
        raise CrossvalError("--ensemble needs held-out subjects: give --test_fraction (e.g. 0.1)")
    if not 0 <= validation_fraction < 1 or not 0 <= test_fraction < 1:
        raise CrossvalError("--validation_fraction and --test_fraction must be in [0, 1)")
    config = ConfigParser.load_config_file(str(train_config))
    eval_overrides = ConfigParser.load_config_file(str(eval_config))
    if postprocess is None:
        from custom_nets.transforms import POSTPROCESS_MODES

        modes = list(POSTPROCESS_MODES) if "postprocess" in eval_overrides else [None]
    else:
        modes = [m.strip() for m in (postprocess.split(",") if isinstance(postprocess, str) else postprocess)]
    out = Path(output_dir).resolve() if output_dir is not None else bundle / "eval" / "crossval"
    out.mkdir(parents=True, exist_ok=True)

    items = _bundle_datalist(train_config, bundle, dataset_dir, out)
    subjects = sorted({_subject(i) for i in items})
    rng = random.Random(seed)
    shuffled = subjects[:]
    rng.shuffle(shuffled)
    n_test = round(test_fraction * len(subjects))
    test_subjects = set(shuffled[:n_test])
    fold_subjects = kfold_subjects([s for s in subjects if s not in test_subjects], folds, seed)
    cv_items = [i for i in items if _subject(i) not in test_subjects]
    test_items = [i for i in items if _subject(i) in test_subjects]
    write_json_atomic(out / SPLITS_FILE, nnunet_splits(cv_items, fold_subjects))

    try:
        tracking_uri, experiment, client = open_tracking_store(out, bundle, tracking_uri, experiment)
    except TrackingUnreachableError as e:
        raise CrossvalError(str(e)) from None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:  # artifacts beside the store; MLflow's default is ./mlruns under whatever folder we run in
        experiment_id = client.create_experiment(experiment, artifact_location=(out / "mlartifacts").as_uri())
    else:
        experiment_id = exp.experiment_id
    name = network or str(config["network_def"].get("_target_", "network")).rsplit(".", 1)[-1]
    parent = client.create_run(experiment_id, run_name=f"crossval-{name}-{folds}folds-{time.strftime('%Y%m%d-%H%M%S')}")
    parent_id = parent.info.run_id
    params = {"crossval_folds": folds, "epochs": epochs, "network": name, "seed": seed, "subjects": len(subjects),
              "images": len(items), "validation_fraction": validation_fraction, "test_subjects": len(test_subjects)}  # fmt: skip
    for key, value in params.items():
        client.log_param(parent_id, key, value)
    client.log_artifact(parent_id, str(out / SPLITS_FILE))

    net_config = out / "network_def.json"
    network_def = network_def_for(network, config["network_def"]) if network else config["network_def"]
    ConfigParser.export_config_file({"network_def": network_def}, str(net_config))
    common = ["--bundle_root", str(bundle), "--dataset_dir", str(dataset_dir)]
    if "seed" in config:
        common += ["--seed", str(int(seed))]
    for key, value in overrides.items():  # for evaluation too: e.g. --image_size must match the training's
        common += [f"--{key}", _cli_value(value)]
    run = _Runner(python, net_config, common)
    train_extra = [f"--{_epochs_key(config)}", str(int(epochs)),
                   "--tracking", "mlflow", "--tracking_uri", tracking_uri, "--experiment_name", experiment]  # fmt: skip

    per_image: list[dict[str, Any]] = []
    failures: list[str] = []

    def evaluate(fold_dir: Path, ckpt_dir: Path, datalist: Path, variant: str, fold: Any, extra: list[str]) -> bool:
        eval_dir = fold_dir / f"eval_{variant}"
        code = run("evaluating", [train_config, eval_config],
                   ["--datalist", _datalist_expression(datalist), "--ckpt_dir", str(ckpt_dir),
                    "--output_dir", "$" + repr(str(eval_dir))] + extra, fold_dir / f"evaluate_{variant}.log")  # fmt: skip
        table = eval_dir / "metrics_per_case.csv"
        if code != 0 or not table.is_file():
            failures.append(f"fold {fold} evaluation {variant} (exit {code}, see {fold_dir / f'evaluate_{variant}.log'})")
            return False
        per_image.extend({"fold": fold, "variant": variant, **row} for row in _read_rows(table))
        return True

    trained: list[tuple[int, Path]] = []
    for fold, held_out in enumerate(fold_subjects):
        fold_dir = out / f"fold_{fold}"
        fold_dir.mkdir(exist_ok=True)
        train_subjects = [s for f, group in enumerate(fold_subjects) if f != fold for s in group]
        inner = set(random.Random(seed + fold).sample(train_subjects, max(1, round(validation_fraction * len(train_subjects)))))
        held = set(held_out)
        parts = {
            "training": [i for i in cv_items if _subject(i) not in held and _subject(i) not in inner],
            "validation": [i for i in cv_items if _subject(i) in inner],
            "test": [i for i in cv_items if _subject(i) in held],
        }
        datalist = fold_dir / "datalist.json"
        write_json_atomic(datalist, {"fold": fold, **parts})
        before = _run_ids(client, experiment)
        start = time.perf_counter()
        code = run("training", [train_config],
                   train_extra + ["--datalist", _datalist_expression(datalist), "--ckpt_dir", str(fold_dir / "models"),
                                  "--output_dir", "$" + repr(str(fold_dir)), "--run_name", f"{name}-fold{fold}"],
                   fold_dir / "train.log")  # fmt: skip
        seconds = time.perf_counter() - start
        children = sorted(_run_ids(client, experiment) - before - {parent_id})
        for child in children:
            client.set_tag(child, "mlflow.parentRunId", parent_id)
            client.set_tag(child, "fold", str(fold))
        print(f"=== fold {fold}: training exit {code} after {seconds:.0f} s", flush=True)
        if code != 0 or not (fold_dir / "models" / "model.pt").is_file():
            failures.append(f"fold {fold} training (exit {code}, see {fold_dir / 'train.log'})")
            continue
        trained.append((fold, fold_dir))
        start = len(per_image)
        for mode in modes:
            evaluate(fold_dir, fold_dir / "models", datalist, mode or "default", fold, ["--postprocess", mode] if mode else [])
        for child in children:
            for row in _summary_rows(per_image[start:]):
                for metric in METRICS:
                    if row.get(f"{metric}_mean") is not None:
                        client.log_metric(child, f"cv_{row['variant']}_{metric}", row[f"{metric}_mean"])

    summary = _summary_rows(per_image)
    if not summary:
        client.set_terminated(parent_id, "FAILED")
        raise CrossvalError(f"no fold was trained and evaluated: {'; '.join(failures)}")
    best = max(summary, key=lambda r: (r.get("dice_mean") or 0.0, -(r.get("hc_abs_error_mm_mean") or 0.0)))["variant"]
    best_mode = None if best == "default" else best
    mode_flag = ["--postprocess", best_mode] if best_mode else []
    if tta:
        for fold, fold_dir in trained:
            evaluate(fold_dir, fold_dir / "models", fold_dir / "datalist.json", f"{best}_tta", fold, mode_flag + ["--tta", "true"])
    if ensemble and trained:
        test_list = out / "test_datalist.json"
        write_json_atomic(test_list, {"training": [], "validation": [], "test": test_items})
        test_dir = out / "test"
        test_dir.mkdir(exist_ok=True)
        for fold, fold_dir in trained:
            evaluate(test_dir, fold_dir / "models", test_list, f"test_fold{fold}", "test", mode_flag)
        others = [str(d / "models" / "model.pt") for _, d in trained[1:]]
        evaluate(test_dir, trained[0][1] / "models", test_list, "test_ensemble", "test", mode_flag + ["--ensemble", repr(others)])
    summary = _summary_rows(per_image)

    write_csv_atomic(out / PER_IMAGE_FILE, per_image)
    write_csv_atomic(out / "summary.csv", summary)
    table = _markdown(summary)
    budget = f"{len(trained)}/{folds} folds, {epochs} epochs each, network {name}, seed {seed}"
    write_text_atomic(out / "summary.md", f"Cross-validation of {bundle.name} on {dataset_dir} ({budget}); "
                      f"post-processing chosen: {best}\n\n{table}\n")  # fmt: skip
    for row in summary:
        for metric in METRICS:
            for stat in ("mean", "sd"):
                if row.get(f"{metric}_{stat}") is not None:
                    client.log_metric(parent_id, f"{row['variant']}_{metric}_{stat}", row[f"{metric}_{stat}"])
    client.set_tag(parent_id, "postprocess_chosen", best)
    for path in ("summary.csv", "summary.md", PER_IMAGE_FILE):
        client.log_artifact(parent_id, str(out / path))
    client.set_terminated(parent_id, "FINISHED" if not failures else "FAILED")
    print(f"\n{budget}; post-processing chosen by cross-validation: {best}\n{table}")
    print(f"\nwritten: {out}/{{{SPLITS_FILE},summary.md,summary.csv,{PER_IMAGE_FILE}}}; MLflow {tracking_uri}, parent run {parent_id}")
    if failures:
        raise CrossvalError(f"some steps failed: {'; '.join(failures)} (the rest is summarised above)")
    return summary


def compare_crossvals(
    first: str | os.PathLike, second: str | os.PathLike, metric: str = "hc_abs_error_mm", variant: str | None = None
) -> dict[str, Any]:
    """
    Paired, image-by-image comparison of two cross-validations over the same folds (e.g. two networks
    with the same ``--seed``): the mean difference ``second - first`` of ``metric`` and the two-sided
    Wilcoxon signed-rank test (``scipy.stats.wilcoxon``).

    Args:
        first, second: ``crossval`` output folders.
        metric: a per-image column (``dice``, ``hd95_mm``, ``hc_abs_error_mm``).
        variant: the variant to compare (default: the one each summary chose, e.g. ``ellipse``).

    Raises:
        CrossvalError: missing outputs, different folds, no common image with the metric.
    """
    from scipy.stats import wilcoxon

    folders = [Path(first), Path(second)]
    for folder in folders:
        for name in (SPLITS_FILE, PER_IMAGE_FILE):
            if not (folder / name).is_file():
                raise CrossvalError(f"{folder / name}: not found (not a crossval output folder)")
    if json.loads((folders[0] / SPLITS_FILE).read_text()) != json.loads((folders[1] / SPLITS_FILE).read_text()):
        raise CrossvalError(f"{folders[0]} and {folders[1]} used different folds (splits_final.json differ): give both the same --seed")
    tables = []
    for folder in folders:
        rows = _read_rows(folder / PER_IMAGE_FILE)
        chosen = variant
        if chosen is None:
            chosen = re.search(r"post-processing chosen: (\S+)", (folder / "summary.md").read_text()).group(1)
        tables.append({(str(r["fold"]), r["case"]): r.get(metric) for r in rows if r["variant"] == chosen})
    common = [k for k in tables[0] if k in tables[1] and tables[0][k] is not None and tables[1][k] is not None]
    if not common:
        raise CrossvalError(f"no image has '{metric}' in both {folders[0]} and {folders[1]}")
    a = np.array([tables[0][k] for k in common], dtype=float)
    b = np.array([tables[1][k] for k in common], dtype=float)
    diff = b - a
    p = float(wilcoxon(a, b).pvalue) if np.any(diff != 0) else 1.0
    return {"metric": metric, "images": len(common), "first_mean": float(a.mean()), "second_mean": float(b.mean()),
            "mean_difference": float(diff.mean()), "median_difference": float(np.median(diff)),
            "second_better_pct": 100.0 * float(np.mean(diff > 0 if metric == "dice" else diff < 0)), "wilcoxon_p": p}  # fmt: skip


def crossval_command(bundle: str, dataset_dir: str, **kwargs: Any) -> None:
    """Command-line form of :func:`crossval`; a :class:`CrossvalError` prints one ``error:`` line and exits 1."""
    try:
        crossval(bundle, dataset_dir, **kwargs)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def crossval_compare_command(first: str, second: str, **kwargs: Any) -> None:
    """Command-line form of :func:`compare_crossvals`: prints the comparison as ``key: value`` lines."""
    try:
        result = compare_crossvals(first, second, **kwargs)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    for key, value in result.items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
