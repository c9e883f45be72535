"""
MLflow tracking that completes MONAI's ``--tracking mlflow``: run params and names, a fail-fast URI check,
progress lines, run comparison (``compare``) and the architecture comparison (``architectures``).

``compare`` and ``architectures`` are imported on use (``custom_nets.tracking.compare``...), so that a
bundle config importing this package does not pay for matplotlib.
"""

from custom_nets.tracking.params import (
    MLflowRunParams,
    TrackingUnreachableError,
    check_tracking_uri,
    experiment_name,
    find_attached,
    git_commit,
    run_name,
)
from custom_nets.tracking.progress import LoopProgress, ProgressLogger, format_duration, is_terminal

__all__ = [
    "LoopProgress",
    "MLflowRunParams",
    "ProgressLogger",
    "TrackingUnreachableError",
    "check_tracking_uri",
    "experiment_name",
    "find_attached",
    "format_duration",
    "git_commit",
    "is_terminal",
    "run_name",
]
