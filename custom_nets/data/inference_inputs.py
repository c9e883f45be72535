"""
The inputs of a batch inference given as a list instead of a folder: a Model Zoo datalist JSON or a CSV
table with an image column (``--input_datalist``), checked as a whole before the first case.

A datalist names files anywhere, so the mistakes a folder listing cannot make are checked here: a
missing file, the same file twice (it would get one mask and two rows), a list key or image column
that is not there. Every problem is logged in one line that names the datalist and the entry, before
any work starts; the run then stops (:class:`~custom_nets.errors.InputError`) unless ``skip_invalid``,
which goes on with the valid entries only.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from custom_nets.errors import InputError
from custom_nets.flags import as_flag

__all__ = ["read_datalist", "check_datalist_inputs", "inference_inputs"]

logger = logging.getLogger(__name__)


def _resolve(value: Any, base_dir: Path) -> str:
    """An entry's path, relative ones against the datalist's folder (as MONAI's ``load_decathlon_datalist``)."""
    path = os.path.expanduser(str(value).strip())
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base_dir, path))


def read_datalist(path: str | os.PathLike, key: str = "testing", image_column: str = "image") -> list[tuple[str, Any]]:
    """
    The entries of a datalist file as ``(label, image)`` pairs in file order, ``label`` naming the entry
    in messages (``testing[3]``, ``line 5``) and ``image`` the path resolved against the datalist's folder
    (``None`` when the entry has no image).

    - ``.json``: a Model Zoo / Decathlon datalist; the list under ``key`` (or the file itself when it is a
      list) holds ``{"image": path, ...}`` dicts (``image_column`` names the key) or plain path strings.
    - ``.csv``: a table with a header; ``image_column`` holds the paths.

    Raises:
        InputError: the file is missing or unreadable, is neither JSON nor CSV, lacks ``key`` or ``image_column``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: datalist file not found")
    base_dir = path.resolve().parent
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the datalist ({type(e).__name__}: {e})") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        columns = list(rows[0]) if rows else (next(csv.reader(text.splitlines()), []))
        if image_column not in columns:
            raise InputError(f"{path}: no column '{image_column}' (columns: {', '.join(columns) or 'none'}); set --datalist_image_column")
        # line numbers as an editor shows them: the header is line 1
        return [(f"line {n}", _resolve(r[image_column], base_dir) if (r[image_column] or "").strip() else None) for n, r in enumerate(rows, start=2)]
    if path.suffix.lower() != ".json":
        raise InputError(f"{path}: a datalist must be a .json (Model Zoo datalist) or a .csv table")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        if key not in data:
            raise InputError(f"{path}: no list '{key}' (keys: {', '.join(map(str, data)) or 'none'}); set --datalist_key")
        entries = data[key]
    else:
        entries = data
    if not isinstance(entries, list):
        raise InputError(f"{path}: '{key}' is not a list of entries")
    pairs: list[tuple[str, Any]] = []
    for n, entry in enumerate(entries):
        image = entry.get(image_column) if isinstance(entry, dict) else entry
        pairs.append((f"{key}[{n}]", _resolve(image, base_dir) if isinstance(image, (str, os.PathLike)) and str(image).strip() else None))
    return pairs


def check_datalist_inputs(path: str | os.PathLike, entries: Sequence[tuple[str, Any]], image_column: str = "image") -> tuple[list[str], list[str]]:
    """
    Split datalist entries into the usable image paths (file order) and one line per problem: an entry
    without an image, a file (or case folder) that does not exist, a second entry of the same file.
    """
    valid: list[str] = []
    problems: list[str] = []
    first: dict[str, str] = {}
    for label, image in entries:
        if image is None:
            problems.append(f"{path}: {label}: no '{image_column}' path in the entry")
            continue
        real = os.path.realpath(image)  # "a/../x.png" and a link to x.png are the same case
        if not os.path.exists(image):
            problems.append(f"{path}: {label}: {image}: file not found")
        elif real in first:
            problems.append(f"{path}: {label}: {image}: duplicate of {first[real]}; each case once")
        else:
            first[real] = label
            valid.append(image)
    return valid, problems


def inference_inputs(
    input_datalist: str | os.PathLike | None,
    list_folder: Callable[[], Sequence[Any]],
    datalist_key: str = "testing",
    image_column: str = "image",
    skip_invalid: bool | str = False,
) -> list[Any]:
    """
    The inputs of a batch: the entries of ``input_datalist`` when given (checked by
    :func:`check_datalist_inputs`), otherwise ``list_folder()`` (the bundle's folder listing, e.g.
    :func:`custom_nets.engines.folder_inference.list_images` of ``--input_dir``).

    Each problem of the datalist is logged as an error line before any case runs; with ``skip_invalid``
    the valid entries are returned, otherwise the run stops.

    Args:
        input_datalist: a datalist ``.json`` or ``.csv`` (``None`` or ``""``: use the folder).
        list_folder: called without arguments when there is no datalist.
        datalist_key: the list of a JSON datalist (Model Zoo: ``"testing"``).
        image_column: the image key of JSON entries, the image column of a CSV.
        skip_invalid: go on with the valid entries when some are invalid.

    Raises:
        InputError: a problem of the whole datalist (see :func:`read_datalist`), a problem with an entry
            without ``skip_invalid``, or no valid entry at all.

    Example (``inputs`` of a bundle's ``runner``)::

        "$custom_nets.data.inference_inputs.inference_inputs(@input_datalist, lambda: list_images(@input_dir), ...)"
    """
    if not input_datalist:
        return list(list_folder())
    entries = read_datalist(input_datalist, datalist_key, image_column)
    valid, problems = check_datalist_inputs(input_datalist, entries, image_column)
    for line in problems:
        logger.error(line)
    if problems and not as_flag(skip_invalid, "skip_invalid"):
        raise InputError(
            f"{input_datalist}: {len(problems)} invalid entry(ies), listed above (first: {problems[0].split(': ', 1)[1]}); "
            "fix the datalist or pass --skip_invalid true to run the valid ones"
        )
    if not valid:
        raise InputError(f"{input_datalist}: no valid entry ({len(entries)} in the datalist)")
    if problems:
        logger.warning(f"{input_datalist}: {len(problems)} invalid entry(ies) skipped (--skip_invalid); {len(valid)} case(s) to run")
    return valid
