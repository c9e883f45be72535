"""
The journal of a batch inference, so that a killed job can continue (``--skip_existing true``).

The results table is written once, at the end of a run; a job killed before that leaves masks but no
table. So every finished case is also appended at once to a journal next to the table
(``<table>.journal.jsonl``, one JSON line per case: input index, a hash of the input path, the row
exactly as the table gets it, the mask's shape). A resumed run skips a case when its journal row says ``ok`` and its
files are complete (:func:`case_complete`), and the table it writes holds the kept rows and the new
ones in input order, so nothing written before is lost. At the end of a run the journal is rewritten
(atomically) with exactly the rows of the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom_nets.atomic_write import _csv_cell, write_text_atomic

__all__ = ["FILE_COLUMNS", "input_id", "journal_row", "CaseJournal", "case_complete"]

logger = logging.getLogger(__name__)

#: Result columns that name an output file of the case, checked by :func:`case_complete`.
FILE_COLUMNS = ("mask", "overlay", "dicom_seg")


def input_id(path: str | os.PathLike) -> str:
    """
    The journal's name of an input: a SHA-256 of its path. Input paths often hold patient names or IDs
    (``/data/Doe^John/series``); the journal, like the table, must not.
    """
    return hashlib.sha256(os.fspath(path).encode("utf-8", "surrogateescape")).hexdigest()


def journal_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with its cells as the CSV writer formats them (floats to 6 digits), ``None`` kept: JSON-safe and exact."""
    return {k: None if v is None else _csv_cell(v) for k, v in row.items()}


class CaseJournal:
    """
    Append-only record of the finished cases of one table (one per shard), read back by a resumed run
    and by the merge of shards. A line cut short by a kill is ignored on reading.

    Args:
        path: the journal file (``<table>.journal.jsonl``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        """The records in file order (a missing journal has none)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run
                continue
            if isinstance(record, dict) and isinstance(record.get("row"), dict):
                records.append(record)
        return records

    def by_input(self) -> dict[str, dict[str, Any]]:
        """The latest record of each input (by :func:`input_id`)."""
        return {str(r.get("input")): r for r in self.records()}

    def append(self, record: Mapping[str, Any]) -> None:
        """Add one finished case, flushed to disk before the next case starts."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace the journal by ``records`` (atomically)."""
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in records))


def _load_fully(path: Path) -> tuple[int, ...]:
    """The shape of an image file read to its last byte (a truncated file raises), singleton axes dropped."""
    from monai.transforms import LoadImage

    array = LoadImage(image_only=True)(str(path))
    return tuple(int(s) for s in np.asarray(array.shape) if s != 1)


def case_complete(record: Mapping[str, Any], output_dir: str | os.PathLike) -> str | None:
    """
    ``None`` when the case of a journal ``record`` needs no new run, else why it does: the row is not
    ``ok``, a file it names (:data:`FILE_COLUMNS`) is missing or empty, or the mask cannot be read to
    its end or has another shape than the one recorded when it was written.
    """
    row = record.get("row") or {}
    if row.get("status") != "ok":
        return f"status {row.get('status')!r}"
    folder = Path(output_dir)
    for column in FILE_COLUMNS:
        name = row.get(column)
        if not name or str(name).startswith("skipped"):
            continue
        path = folder / str(name)
        if not path.is_file() or path.stat().st_size == 0:
            return f"{column} {name} missing or empty"
        if column == "mask" and record.get("shape") is not None:
            expected: Sequence[int] = [int(s) for s in record["shape"] if int(s) != 1]
            try:
                shape = _load_fully(path)
            except Exception as e:  # any reader error: the file is not what was written
                return f"mask {name} unreadable ({type(e).__name__})"
            if tuple(sorted(shape)) != tuple(sorted(expected)):  # readers may order axes differently
                return f"mask {name} has shape {shape}, {tuple(expected)} was written"
    return None
