"""
Split a batch inference across processes: ``torchrun --nproc_per_node=N`` (one process group, rank 0
merges the tables after a barrier) or ``--shard i/n`` (independent jobs, e.g. a SLURM array, merged
afterwards with ``python -m custom_nets merge_results OUTPUT_DIR``).

Cases go round-robin by input order (shard ``i`` of ``n`` takes inputs ``i, i + n, i + 2n, ...``), so
every case runs exactly once and the split depends only on the input list. Each shard writes its masks
into the common output folder, its own journal (``<table>.shard-i-of-n.journal.jsonl``, see
:mod:`custom_nets.engines.resume`) and its own table (``<table>.shard-i-of-n.csv``, atomically). The
merged table is built from the journals, which keep every row exactly as a single process would
have written it, so the merged table equals the single-process one byte for byte.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from custom_nets.atomic_write import write_csv_atomic
from custom_nets.engines.resume import CaseJournal
from custom_nets.errors import InputError

__all__ = ["Shard", "parse_shard", "barrier", "merge_shard_tables", "merge_case_tables", "merge_results", "merge_results_command"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SHARD_JOURNAL = re.compile(r"^(?P<stem>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)\.journal\.jsonl$")
_SHARD_TABLE = re.compile(r"^(?P<stem>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)\.csv$")


@dataclass(frozen=True)
class Shard:
    """
    Which part of the inputs this process runs: ``index`` of ``count`` (0-based), and whether the
    processes form a ``torch.distributed`` group (started by ``torchrun``) that can wait for each other.
    """

    index: int = 0
    count: int = 1
    distributed: bool = False

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def label(self) -> str:
        return f"shard {self.index + 1} of {self.count}" if self.sharded else "single process"

    def take(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """``(input index, item)`` of this shard's items, in input order (round-robin split)."""
        return [(i, item) for i, item in enumerate(items) if i % self.count == self.index]

    def file_path(self, path: str | os.PathLike) -> Path:
        """This shard's version of an output file: ``results.csv`` -> ``results.shard-0-of-2.csv`` (unchanged unsharded)."""
        path = Path(path)
        if not self.sharded:
            return path
        return path.with_name(f"{path.stem}.shard-{self.index}-of-{self.count}{path.suffix}")

    def journal_path(self, table: str | os.PathLike) -> Path:
        """This shard's journal of the table ``table``: ``results.journal.jsonl``, ``results.shard-0-of-2.journal.jsonl``."""
        shard_table = self.file_path(table)
        return shard_table.with_name(f"{shard_table.stem}.journal.jsonl")


def parse_shard(shard: str | None = None) -> Shard:
    """
    The shard of this process: from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE`` > 1), which
    also starts the process group (gloo: it only waits and needs no GPU), or from ``shard`` written
    ``"i/n"`` (``i`` from 0 to ``n - 1``), or the whole input list.

    Raises:
        InputError: ``shard`` is not ``i/n`` with ``0 <= i < n``, or is given under ``torchrun``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        if shard not in (None, ""):
            raise InputError(f"--shard {shard}: not with torchrun, which splits the inputs over its {world} processes itself")
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return Shard(dist.get_rank(), dist.get_world_size(), distributed=True)
    if shard in (None, ""):
        return Shard()
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise InputError(f"--shard {shard}: expected i/n with 0 <= i < n, e.g. 0/4 for the first of four shards")
    return Shard(int(match.group(1)), int(match.group(2)))


def barrier(shard: Shard) -> None:
    """Wait until every process of a ``torchrun`` group gets here (nothing to wait for otherwise)."""
    if shard.distributed:
        import torch.distributed as dist

        dist.barrier()


def merge_shard_tables(table: str | os.PathLike, count: int) -> list[dict[str, Any]]:
    """
    Merge the ``count`` shard journals of ``table`` into ``table`` (atomically), rows in input order;
    return the rows. Each shard must have finished (its table ``<table>.shard-i-of-n.csv`` exists) and
    together the shards must hold every input exactly once.

    Raises:
        InputError: one line naming the shards that have not finished, or the inputs missing or doubled.
    """
    table = Path(table)
    shards = [Shard(i, count) for i in range(count)]
    unfinished = [str(s.index) for s in shards if not s.file_path(table).is_file() or not s.journal_path(table).is_file()]
    if unfinished:
        raise InputError(f"{table}: shard(s) {', '.join(unfinished)} of {count} have not finished (no {shards[0].file_path(table).name.replace('-0-', '-<i>-')}); run them first")
    records = [record for s in shards for record in CaseJournal(s.journal_path(table)).records()]
    totals = {int(r["total"]) for r in records}
    indices = sorted(int(r["index"]) for r in records)
    expected = list(range(max(totals) if totals else 0))
    if len(totals) > 1 or indices != expected:
        doubled = sorted(i for i, n in Counter(indices).items() if n > 1)
        missing = sorted(set(expected) - set(indices))
        raise InputError(
            f"{table}: the {count} shards do not hold each input once (inputs {sorted(totals)}, missing {missing[:10]}, doubled {doubled[:10]}); "
            "were they run on the same input list?"
        )
    rows = [r["row"] for r in sorted(records, key=lambda r: int(r["index"]))]
    write_csv_atomic(table, rows)
    logger.info(f"{table}: merged {len(rows)} row(s) of {count} shard(s)")
    return rows


def merge_case_tables(table: str | os.PathLike, count: int, inputs: Sequence[str]) -> Path | None:
    """
    Merge the shard parts of a per-case side table (rows with a ``case`` column, e.g. the lung CT bundle's
    ``nodules.shard-i-of-n.csv``) into ``table``: the rows of each case in the order of ``inputs`` (the
    input names of the results rows, whose case names are :func:`custom_nets.data.volume_io.case_name`),
    each line kept as written. Returns ``table``, or ``None`` when a part is missing (nothing is written then).
    """
    import csv

    from custom_nets.atomic_write import write_text_atomic
    from custom_nets.data.volume_io import case_name

    table = Path(table)
    parts = [Shard(i, count).file_path(table) for i in range(count)]
    if not all(p.is_file() for p in parts):
        logger.warning(f"{table}: not merged: part(s) {', '.join(p.name for p in parts if not p.is_file())} missing")
        return None
    order = {case_name(path): n for n, path in enumerate(inputs)}
    header, lines = "", []
    for part in parts:
        text = part.read_bytes().decode("utf-8").splitlines(keepends=True)  # line ends as written (csv: \r\n)
        if not text:
            continue
        header = header or text[0]
        names = next(csv.reader([text[0]]))
        column = names.index("case") if "case" in names else None
        for line in text[1:]:
            case = next(csv.reader([line]))[column] if column is not None else ""
            lines.append((order.get(case, len(order)), len(lines), line))
    write_text_atomic(table, header + "".join(line for *_, line in sorted(lines)))
    logger.info(f"{table}: merged {len(lines)} row(s) of {count} shard(s)")
    return table


def merge_side_tables(table: str | os.PathLike, count: int) -> list[Path]:
    """
    Merge the sharded tables beside ``table`` that have no journal (per-case side tables such as
    ``nodules.shard-i-of-n.csv``) with :func:`merge_case_tables`, cases in the input order of ``table``'s
    shard journals; return the merged side tables.
    """
    table = Path(table)
    records = [r for i in range(count) for r in CaseJournal(Shard(i, count).journal_path(table)).records()]
    inputs = [str(r["row"].get("image", "")) for r in sorted(records, key=lambda r: int(r["index"]))]
    sides = set()
    for p in table.parent.iterdir():
        match = _SHARD_TABLE.match(p.name)
        if match and int(match.group("count")) == count and match.group("stem") != table.stem:
            sides.add(match.group("stem"))
    merged = [merge_case_tables(table.with_name(f"{side}.csv"), count, inputs) for side in sorted(sides)]
    return [path for path in merged if path is not None]


def merge_results(output_dir: str | os.PathLike) -> list[Path]:
    """
    Merge every sharded table in ``output_dir`` (found by its journals ``<name>.shard-i-of-n.journal.jsonl``)
    into ``<name>.csv``, then the per-case side tables of the same shards (``nodules.shard-i-of-n.csv``,
    :func:`merge_case_tables`); return the merged tables.

    Raises:
        InputError: ``output_dir`` is not a folder, holds no shard journal, or a table's shards are
            unfinished or inconsistent (:func:`merge_shard_tables`).
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder not found")
    groups = sorted({(m.group("stem"), int(m.group("count"))) for p in folder.iterdir() if (m := _SHARD_JOURNAL.match(p.name))})
    if not groups:
        raise InputError(f"{folder}: no shard journal (*.shard-<i>-of-<n>.journal.jsonl): nothing to merge")
    stems = [stem for stem, _ in groups]
    if len(stems) != len(set(stems)):
        raise InputError(f"{folder}: shards of one table with different counts ({', '.join(sorted(f'{s} of {n}' for s, n in groups))}); remove the stale ones")
    merged = []
    for stem, count in groups:
        merge_shard_tables(folder / f"{stem}.csv", count)
        merged.append(folder / f"{stem}.csv")
    if len(groups) == 1:  # side tables belong to the run's one main table
        merged += merge_side_tables(merged[0], groups[0][1])
    return merged


def merge_results_command(output_dir: str) -> None:
    """
    Merge the per-shard results tables of ``--shard i/n`` runs in OUTPUT_DIR into the final tables
    (``results.csv``, ``head_circumference.csv``), rows in input order, once every shard has finished.

    Usage: ``python -m custom_nets merge_results OUTPUT_DIR``
    """
    from custom_nets.errors import install_excepthook

    install_excepthook()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for table in merge_results(output_dir):
        print(table)
