"""
Errors about the user's input, and a one-line report of them at the end of a command-line run.

MONAI's bundle CLI wraps every error raised inside a config expression in ``RuntimeError: Failed to
evaluate ...`` and prints a long traceback whose last line hides the real problem. A bundle's
``initialize`` section calls :func:`install_excepthook`, so a run that ends on an input problem (an
:class:`InputError`, a missing file, a denied permission) prints one line instead::

    ERROR: /data/hc18/training_set: folder not found; --dataset_dir must hold the HC18 layout (...)

Set ``CUSTOM_NETS_TRACEBACK=1`` to get the full traceback back. Library callers are unaffected: the
exceptions themselves are ordinary ``ValueError``/``OSError`` subclasses.
"""

from __future__ import annotations

import errno
import sys
from types import TracebackType

__all__ = ["InputError", "describe_error", "disk_full_error", "exception_chain", "input_error_in", "install_excepthook", "require"]

# Besides InputError, these mean "a path the user gave is wrong"; their messages name the path.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class InputError(ValueError):
    """A file, folder or setting given by the user cannot be used; the message is one line that names it."""


def describe_error(error: BaseException, max_length: int = 160) -> str:
    """
    ``"Type: what happened"`` in one line, for a reader's or library's exception inside an
    :class:`InputError` message: the first sentence of the message (torch, pydicom and nibabel add advice
    after it), joined with the next line when the first one only announces it (``"Error(s) in ...:"``).

    Example::

        describe_error(OSError("image file is truncated (8 bytes not processed)"))
        # 'OSError: image file is truncated (8 bytes not processed)'
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0].split(". ")[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1].split('. ')[0]}"
    text = text if len(text) <= max_length else text[: max_length - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` followed by its causes (``raise ... from``) or contexts, outermost first, cycles cut."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not e for e in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def disk_full_error(error: BaseException) -> OSError | None:
    """
    The "no space left" (or over-quota) :class:`OSError` in ``error``'s chain, if any. Writers may wrap it
    (PIL's PNG writer reports it as ``AttributeError: '_idat' object has no attribute 'fileno'``), so the chain
    is searched rather than its last link read.
    """
    full = (errno.ENOSPC, errno.EDQUOT)
    return next((e for e in exception_chain(error) if isinstance(e, OSError) and e.errno in full), None)


def input_error_in(error: BaseException) -> BaseException | None:
    """The first :class:`InputError` (or missing-file / permission error) in ``error``'s cause chain, if any."""
    return next((e for e in exception_chain(error) if isinstance(e, (InputError, *_USER_OS_ERRORS))), None)


def _excepthook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    from custom_nets.flags import env_flag  # flags needs InputError from here

    cause = input_error_in(error)
    if cause is None or env_flag("CUSTOM_NETS_TRACEBACK"):
        sys.__excepthook__(kind, error, traceback)
        return
    message = " ".join(str(cause).split()) or type(cause).__name__
    print(f"ERROR: {message}", file=sys.stderr)


def install_excepthook() -> None:
    """
    Make an uncaught input error end the process with one ``ERROR: <message>`` line on stderr (exit
    status 1) instead of a traceback. Other exceptions keep Python's default report.

    Example (first item of a bundle config's ``initialize`` list)::

        "initialize": ["$custom_nets.errors.install_excepthook()", ...]
    """
    sys.excepthook = _excepthook


def require(condition: object, message: str) -> bool:
    """
    A config's own sanity check: raise :class:`InputError` with ``message`` (one line, naming the settings
    and what is wrong) unless ``condition`` holds, before the run fails deep inside a transform.

    Example (a bundle config's ``initialize``)::

        "$custom_nets.errors.require(@patch_size[0] <= @image_size[0], 'patch_size must fit in image_size')"
    """
    if not condition:
        raise InputError(message)
    return True
