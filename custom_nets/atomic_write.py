"""
Write a file so that readers only ever see the old file or the complete new one, never a partial one.

The project's one atomic writer: masks, tables, datalists, checkpoints (:mod:`custom_nets.checkpoints`),
benchmark reports and comparison plots all go through :func:`atomic_path`, so every temporary file has
the same name pattern (``.<name>.*.tmp*``, which :func:`remove_leftovers` clears) and the mode a plain
``open()`` would give.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "remove_leftovers", "write_csv_atomic", "write_json_atomic", "write_text_atomic"]


def _umask() -> int:
    """The process umask (``os.umask`` can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """
    Yield a temporary path next to ``path``; when the block ends without an exception, move it onto
    ``path`` with ``os.replace`` (atomic on one file system); otherwise delete it and leave ``path`` as it was.

    The parent folder is created when missing. The temporary name keeps the suffix of ``path`` (or
    ``suffix``) so that writers that pick a format by extension (PIL, ITK, nibabel) still work.

    Args:
        path: the final file.
        suffix: suffix of the temporary file; defaults to the suffix(es) of ``path`` (``.nii.gz`` stays whole).

    Example::

        with atomic_path("out/mask.png") as tmp:
            PIL.Image.fromarray(mask).save(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode a plain open() would, so that colleagues
        # in the group can read masks and tables as before
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_leftovers(folder: str | os.PathLike, name: str = "*") -> None:
    """
    Delete the temporary files that :func:`atomic_path` writes of ``name`` (a file name or a glob) in ``folder``
    and that a kill before its rename left behind; a missing folder is fine.
    """
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(f".{name}.*.tmp*"):
            leftover.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` through :func:`atomic_path`."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) or type(value).__name__.startswith("float"):  # also numpy floats
        value = float(value)
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def write_csv_atomic(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], header: Sequence[str] | None = None) -> None:
    """
    Write ``rows`` as a CSV table to ``path`` through :func:`atomic_path`: floats with 6 significant
    digits, ``None`` as an empty cell. ``header`` defaults to the keys of all rows, in first-seen order.
    """
    header = list(header) if header is not None else list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_cell(row.get(k)) for k in header])
    write_text_atomic(path, text.getvalue())
