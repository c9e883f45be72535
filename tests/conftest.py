"""Shared fixtures: where the real sample data lives, and the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    return Path(os.environ.get("SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data samples (``../shared/data`` or ``$SHARED_DATA``): a failure in CI when missing, a skip elsewhere."""
    path = _shared_data_dir()
    if not path.is_dir():
        message = f"real sample data not found at {path} (set SHARED_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
