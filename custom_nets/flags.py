"""
Yes/no settings read one way everywhere: bundle command-line values (``--save_overlay true``: MONAI's CLI
passes the word as a string) and environment variables (``CUSTOM_NETS_TRACEBACK=1``).
"""

from __future__ import annotations

import os
from typing import Any

from custom_nets.errors import InputError

__all__ = ["as_flag", "env_flag"]

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def as_flag(value: Any, name: str = "value") -> bool:
    """
    A switch as a bool: ``True``/``False``, ``1``/``0``, ``None`` (unset: off), or the words ``true``/``false``,
    ``yes``/``no``, ``on``/``off``, ``1``/``0`` in any case. Anything else is refused: a typo such as
    ``--skip_existing ture`` must not quietly mean "off".

    Raises:
        InputError: ``--<name> must be true or false, got 'ture'``.

    Example::

        as_flag("True")  # True
        as_flag("off", "save_overlay")  # False
    """
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _ON or text in _OFF:
        return text in _ON
    raise InputError(f"--{name} must be true or false, got {value!r}")


def env_flag(variable: str) -> bool:
    """Whether the environment variable is set to a yes (``1``, ``true``, ``yes``, ``on``); unset or anything else is no."""
    return os.environ.get(variable, "").strip().lower() in _ON
