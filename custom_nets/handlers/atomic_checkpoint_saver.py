"""MONAI's ``CheckpointSaver`` whose files are replaced in one step, so a kill never leaves a bundle without ``model.pt``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.handlers import CheckpointSaver
from monai.utils import IgniteInfo, min_version, optional_import

from custom_nets.atomic_write import remove_leftovers
from custom_nets.checkpoints import save_checkpoint

DiskSaver, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "DiskSaver", as_type="base")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")

__all__ = ["AtomicCheckpointSaver"]


class _AtomicDiskSaver(DiskSaver):
    """
    Ignite's ``DiskSaver`` with MONAI's fixed file name, writing through :func:`custom_nets.checkpoints.save_checkpoint`.
    A fixed-name file is not removed before the next save (the save replaces it), and removing a file that is
    gone is no error.
    """

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=False)
        self.filename = filename
        if idist.get_rank() == self.save_on_rank:  # what a kill during an earlier save left behind
            remove_leftovers(self.dirname)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() == self.save_on_rank:
            save_checkpoint(checkpoint, Path(self.dirname) / (self.filename or filename))

    def remove(self, filename: str) -> None:
        # MONAI's saver deletes model.pt and then writes it in place: a kill in between left no model.pt,
        # and every resume then failed on deleting the missing file
        if self.filename is None and idist.get_rank() == self.save_on_rank:
            (Path(self.dirname) / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """
    ``monai.handlers.CheckpointSaver`` (same arguments) whose best-model, final and interval files are written to
    a temporary file and renamed onto the target: a kill at any moment leaves the previous ``model.pt`` whole
    or the new one, never none and never half a file. Temporary files of an interrupted save are deleted
    when the saver is created.

    Example, in a bundle's ``validate#handlers``::

        {"_target_": "custom_nets.handlers.atomic_checkpoint_saver.AtomicCheckpointSaver", "save_dir": "@ckpt_dir",
         "save_dict": {"model": "@network"}, "save_key_metric": true, "key_metric_filename": "model.pt"}
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, getattr(checkpoint.save_handler, "filename", None))
