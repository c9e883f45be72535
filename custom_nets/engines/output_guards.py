"""
Guards of a batch's output folder.

- One run per output table at a time (:func:`output_folder_lock`): a second ``run inference`` into a folder
  that a running one writes would mix their rows and overwrite their masks; it is refused with a line that
  says who holds it.
- Room for the results table (:class:`TableSpaceReserve`): a disk that fills up during the batch fails the
  cases that no longer fit, but the table that lists them (and the journal a resumed run reads) is still written.

The lock is the operating system's (``filelock``: ``flock`` on POSIX, ``msvcrt`` on Windows): it goes with
its process, so a run killed with ``kill -9`` leaves no stale lock behind. The lock file stays in the
folder (empty of meaning once free); while held it says which process holds it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from custom_nets.errors import InputError, disk_full_error

__all__ = ["output_folder_lock", "TableSpaceReserve"]


def _write_holder(fd: int, label: str) -> None:
    """Called by filelock once the lock is held: who holds it, for the message of the next run that tries."""
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "run": label,
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())


def _holder(lock_file: Path) -> str:
    """The holder as one phrase, from the lock file (or ``unknown`` when it cannot be read yet)."""
    try:
        h = json.loads(lock_file.read_text(encoding="utf-8"))
        return f"process {h['pid']} on {h['host']}, {h['run']}, since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


@contextmanager
def output_folder_lock(lock_file: str | os.PathLike, label: str = "inference") -> Iterator[Path]:
    """
    Hold the lock ``lock_file`` for the block, or raise at once when another process holds it.

    Args:
        lock_file: the lock file, beside the table it protects (e.g. ``out/head_circumference.lock``;
            a shard locks its own, ``out/head_circumference.shard-0-of-2.lock``, so shards share a folder).
        label: what this run is, written into the lock for the message of the next one.

    Raises:
        InputError: another process holds the lock; the line names the folder, the holder and the lock file.

    Example::

        with output_folder_lock("out/results.lock", "inference shard 0/2"):
            ...  # write masks and out/results.shard-0-of-2.csv
    """
    lock_file = Path(lock_file)
    lock = FileLock(lock_file, timeout=0, on_acquired=lambda fd: _write_holder(fd, label))
    try:
        lock.acquire()
    except Timeout:
        raise InputError(
            f"{lock_file.parent}: output folder is in use by another run ({_holder(lock_file)}; lock {lock_file.name}): "
            "wait for it to finish or choose another output folder"
        ) from None
    try:
        yield lock_file
    finally:
        lock.release()


class TableSpaceReserve:
    """
    A hidden file of ``bytes_per_case * cases + base`` bytes allocated beside ``table`` before the first case,
    and removed by :meth:`release` (or on leaving a ``with`` block, also on an error) just before the table and
    journal are written at the end: when the cases fill the disk, the end-of-run writes still find that room.

    Args:
        table: the results table (the reserve is ``.<table name>.reserve`` beside it).
        cases: how many rows the table will have.
        bytes_per_case: room per row, for the journal's new copy and the table (a row of each is a few
            hundred bytes).
        base: room on top, for headers and file system blocks.

    Raises:
        InputError: the folder has not even that much free space; nothing has been processed yet.

    Example::

        with TableSpaceReserve("out/results.csv", cases=len(inputs)):
            ...  # the batch
        write_csv_atomic("out/results.csv", rows)
    """

    def __init__(self, table: str | os.PathLike, cases: int, bytes_per_case: int = 1024, base: int = 64 * 1024) -> None:
        table = Path(table)
        self.path = table.with_name(f".{table.name}.reserve")
        size = bytes_per_case * int(cases) + base
        try:
            with open(self.path, "wb") as f:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(f.fileno(), 0, size)
                else:  # blocks really taken, not a sparse file
                    f.write(b"\0" * size)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self.path.unlink(missing_ok=True)
            if disk_full_error(e) is None:
                raise
            raise InputError(
                f"{table.parent}: output folder has no room even for the results table ({size // 1024} KiB for "
                f"{cases} case(s)): {e.strerror}; free space first"
            ) from None

    def release(self) -> None:
        """Give the room back (called right before the end-of-run writes; again is harmless)."""
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> TableSpaceReserve:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
