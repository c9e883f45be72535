"""What the three synthetic datasets share: generate once, reuse after."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["generate_once"]

logger = logging.getLogger(__name__)


def generate_once(output_dir: str | os.PathLike, marker_file: str, generator: Callable[..., str], layout: str, **kwargs) -> str:
    """
    Call ``generator(output_dir, **kwargs)`` unless ``output_dir`` already holds a complete dataset, that is
    its ``marker_file``, which every generator writes last; return ``output_dir``. The bundles' default
    ``dataset_dir`` is such a call, so their commands run on a fresh machine without a download, and
    ``--dataset_dir`` replaces it (nothing is generated then).

    Args:
        output_dir: dataset folder.
        marker_file: file name, relative to ``output_dir``, whose presence means "complete".
        generator: writes the dataset and returns its folder.
        layout: the layout's name for the log line, e.g. ``"HC18"``.
        kwargs: passed to ``generator``.

    Example::

        generate_once("data/hc18_synthetic", "training_set_pixel_size_and_HC.csv", generate, "HC18", num_images=8)
    """
    if (Path(output_dir) / marker_file).is_file():
        return os.fspath(output_dir)
    logger.info(f"no dataset at {output_dir}: writing a synthetic {layout}-layout dataset there (pass --dataset_dir for real data)")
    return generator(output_dir, **kwargs)
