"""
Seeded, subject-disjoint train/validation/test splits, written once as a datalist JSON and reused.

The datalist keeps paths relative to the dataset folder, so a dataset that moves keeps its split:
:func:`load_or_create_datalist` resolves them against the ``dataset_dir`` it is given.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from custom_nets.atomic_write import write_json_atomic
from custom_nets.errors import InputError

__all__ = ["DATALIST_FORMAT", "SPLIT_KEYS", "split_subjects", "load_or_create_datalist", "require_training_cases"]

logger = logging.getLogger(__name__)

#: Datalist keys of the three splits, in the order of ``fractions``.
SPLIT_KEYS = ("training", "validation", "test")
# Version of the entries' keys (e.g. HC18's reference circumference moved from ``hc_mm`` to ``hc_ref_mm``
# in format 2): a datalist of another format is refused instead of failing later, in evaluation.
DATALIST_FORMAT = 2


def split_subjects(
    items: Sequence[dict[str, Any]],
    subject_of: Callable[[dict[str, Any]], str],
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """
    Split ``items`` into training/validation/test so that all items of one subject land in one split.

    Subjects are shuffled with ``random.Random(seed)`` and cut by the cumulative ``fractions`` of the
    subject count (largest remainder); with at least three subjects, every split with a non-zero
    fraction gets at least one subject. Items keep their input order within a split.

    Args:
        items: datalist entries.
        subject_of: maps an entry to its subject id.
        fractions: training, validation, test fractions (non-negative, summing to 1).
        seed: shuffling seed.

    Raises:
        ValueError: fractions that are not three non-negative numbers summing to 1, or no items.

    Example::

        split_subjects(items, subject_of=lambda d: d["case"].split("_")[0], fractions=(0.7, 0.2, 0.1), seed=0)
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    if not items:
        raise ValueError("cannot split an empty datalist")
    subjects = sorted({subject_of(item) for item in items})
    random.Random(seed).shuffle(subjects)
    n = len(subjects)
    exact = [f * n for f in fractions]
    counts = [int(e) for e in exact]
    for i in sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    if n >= 3:  # every requested split gets a subject: take them from the largest split
        for i in range(3):
            if fractions[i] > 0 and counts[i] == 0:
                counts[counts.index(max(counts))] -= 1
                counts[i] = 1
    bounds = [0, counts[0], counts[0] + counts[1], n]
    split_of = {s: SPLIT_KEYS[k] for k in range(3) for s in subjects[bounds[k] : bounds[k + 1]]}
    out: dict[str, list[dict[str, Any]]] = {key: [] for key in SPLIT_KEYS}
    for item in items:
        out[split_of[subject_of(item)]].append(item)
    return out


def _map_paths(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_paths(v, fn) for v in value]
    return value


def _relative(item: dict[str, Any], base: Path, path_keys: Iterable[str]) -> dict[str, Any]:
    return {k: _map_paths(v, lambda p: os.path.relpath(p, base)) if k in path_keys else v for k, v in item.items()}


def _absolute(item: dict[str, Any], base: Path, path_keys: Iterable[str]) -> dict[str, Any]:
    return {k: _map_paths(v, lambda p: os.fspath(base / p)) if k in path_keys else v for k, v in item.items()}


def load_or_create_datalist(
    datalist_file: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    make_items: Callable[[], list[dict[str, Any]]],
    subject_of: Callable[[dict[str, Any]], str],
    path_keys: Sequence[str] = ("image", "label"),
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    seed: int = 0,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """
    Return the split datalist of ``dataset_dir`` with absolute paths: read from ``datalist_file`` when it
    exists, otherwise built with ``make_items`` and :func:`split_subjects` and written there once
    (atomically), so later runs and other processes reuse the very same split. A datalist written
    with another seed or other fractions, or listing files that are not under ``dataset_dir``, is an
    error rather than silently reused.

    Args:
        datalist_file: JSON file with the keys of :data:`SPLIT_KEYS` (paths relative to ``dataset_dir``).
        dataset_dir: dataset root the relative paths are resolved against.
        make_items: builds the full list of entries with absolute paths (called only when the file is absent).
        subject_of: maps an entry to its subject id (see :func:`split_subjects`).
        path_keys: entry keys that hold a path or a list of paths.
        fractions: training, validation, test fractions.
        seed: split seed.
        settings: further JSON-serialisable settings the entries depend on (e.g. the MRI sequences);
            stored, and compared on reuse like ``seed`` and ``fractions``.

    Raises:
        InputError: an existing datalist file that is not valid JSON, lacks a split key, was made with
            other settings, or lists missing files.
    """
    datalist_file, dataset_dir = Path(datalist_file), Path(dataset_dir).resolve()
    # the settings the entries depend on, as JSON gives them back (tuples -> lists), to compare on reuse
    settings = json.loads(json.dumps({"seed": int(seed), "fractions": [float(f) for f in fractions], **dict(settings or {})}))
    settings = {"format": DATALIST_FORMAT, **settings}
    if not datalist_file.is_file():
        splits = split_subjects(make_items(), subject_of, fractions, seed)
        content = {
            "description": "subject-disjoint split; paths relative to the dataset folder",
            **settings,
            **{key: [_relative(item, dataset_dir, path_keys) for item in splits[key]] for key in SPLIT_KEYS},
        }
        write_json_atomic(datalist_file, content)
        logger.info("wrote datalist %s (%s)", datalist_file, ", ".join(f"{k}: {len(splits[k])}" for k in SPLIT_KEYS))
    try:
        content = json.loads(datalist_file.read_text())
        splits = {key: [_absolute(item, dataset_dir, path_keys) for item in content[key]] for key in SPLIT_KEYS}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        problem = f"not a datalist with keys {list(SPLIT_KEYS)} ({type(e).__name__}: {e})"
        raise InputError(f"{datalist_file}: {problem}; delete it to rebuild") from None
    if content.get("format") != DATALIST_FORMAT:
        problem = f"written by another version of custom_nets (datalist format {content.get('format')}, this one reads {DATALIST_FORMAT})"
        raise InputError(f"{datalist_file}: {problem}; delete it to rebuild (the same seed gives the same split)")
    for key, value in settings.items():
        if content.get(key) != value:
            problem = f"written for {key}={content.get(key)!r}, not {value!r}"
            raise InputError(f"{datalist_file}: {problem}; delete it to split again")
    for item in (i for part in splits.values() for i in part):
        for key in path_keys:
            for path in [item[key]] if isinstance(item.get(key), str) else item.get(key) or []:
                if not os.path.exists(path):
                    problem = f"lists {path}, which does not exist under {dataset_dir}"
                    raise InputError(f"{datalist_file}: {problem}; wrong --dataset_dir, or delete the datalist to rebuild")
    return splits


def require_training_cases(training: Sequence[Any], validation: Sequence[Any] | None) -> bool:
    """
    A training config's check of its two case lists before the trainer starts: raise :class:`InputError`
    (one line, which the bundle's excepthook prints instead of a traceback) when there is nothing to train
    on, or nothing to validate on (``model.pt`` is written after a validation). The lists come from the
    bundle's own datalist, or from MONAI Label, which overrides ``train#dataset#data`` and
    ``validate#dataset#data`` with the images that have a final label.

    Example (first item of a ``train.json``'s ``run`` list)::

        "$custom_nets.data.splits.require_training_cases(@train#dataset#data, @validate#dataset#data)"
    """
    if not training:
        raise InputError(
            "no training cases (train#dataset#data is empty): give a dataset with labelled cases; "
            "in MONAI Label, submit a final label for some images first"
        )
    if validation is not None and not len(validation):
        raise InputError(
            f"no validation cases (validate#dataset#data is empty, {len(training)} training case(s)): model.pt is "
            "written after a validation; in MONAI Label, label at least 3 images or raise val_split"
        )
    return True
