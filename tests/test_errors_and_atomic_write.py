"""One-line input errors at the end of a command-line run, and atomic file writes."""

from __future__ import annotations

import sys

import pytest

from custom_nets.atomic_write import atomic_path, write_csv_atomic
from custom_nets import errors
from custom_nets.errors import InputError, input_error_in

def _uncaught(inner: BaseException, capsys) -> str:
    """What the installed hook prints for an error that MONAI's bundle CLI wrapped (``RuntimeError`` from ``inner``)."""
    errors.install_excepthook()
    try:
        try:
            raise inner
        except Exception as e:
            raise RuntimeError("Failed to evaluate ConfigExpression: $something") from e
    except RuntimeError as outer:
        sys.excepthook(type(outer), outer, outer.__traceback__)
    return capsys.readouterr().err


@pytest.fixture(autouse=True)
def _restore_excepthook():
    yield
    sys.excepthook = sys.__excepthook__


@pytest.mark.parametrize(
    "inner, message",
    [
        (InputError("/data/x: dataset folder not found"), "ERROR: /data/x: dataset folder not found"),
        (FileNotFoundError(2, "No such file or directory", "models/model.pt"), "ERROR: [Errno 2] No such file or directory: 'models/model.pt'"),
    ],
    ids=["input-error", "missing-file"],
)
def test_input_error_is_reported_in_one_line(inner, message, capsys):
    assert _uncaught(inner, capsys).strip() == message


def test_other_errors_keep_their_traceback(capsys):
    err = _uncaught(KeyError("bug"), capsys)
    assert "Traceback" in err and "KeyError: 'bug'" in err


def test_traceback_on_request(capsys, monkeypatch):
    monkeypatch.setenv("CUSTOM_NETS_TRACEBACK", "1")
    err = _uncaught(InputError("bad"), capsys)
    assert "Traceback" in err and "InputError: bad" in err


def test_input_error_in_finds_the_cause():
    try:
        try:
            raise InputError("x")
        except InputError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as outer:
        assert isinstance(input_error_in(outer), InputError)
    assert input_error_in(RuntimeError("alone")) is None


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_atomic_path_keeps_a_double_suffix_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "mask.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "mask.nii.gz").read_bytes() == b"x"


def test_write_csv_atomic_formats_cells(tmp_path):
    write_csv_atomic(tmp_path / "t.csv", [{"a": 1.23456789, "b": None}, {"a": float("nan"), "c": "x"}])
    assert (tmp_path / "t.csv").read_text() == "a,b,c\n1.23457,,\nnan,,x\n"


@pytest.mark.parametrize(
    "error, expected",
    [
        (OSError("image file is truncated (8 bytes not processed)"), "OSError: image file is truncated (8 bytes not processed)"),
        (RuntimeError("Weights only load failed. This file can still be loaded. Do it only if you trust it."), "RuntimeError: Weights only load failed"),
        (RuntimeError("Error(s) in loading state_dict for Net:\n\tsize mismatch for w: shapes differ. Check it."), "RuntimeError: Error(s) in loading state_dict for Net: size mismatch for w: shapes differ"),
        (ValueError(""), "ValueError"),
        (ValueError("x" * 300), "ValueError: " + "x" * 157 + "..."),
    ],
)
def test_describe_error_is_one_short_line(error, expected):
    from custom_nets.errors import describe_error

    assert describe_error(error) == expected


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_path_gives_the_mode_a_plain_open_gives(tmp_path, umask):
    """Not mkstemp's private 0600: a mask written for a clinician stays readable by the group."""
    import os

    previous = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        with atomic_path(tmp_path / "atomic.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(previous)
    plain, atomic = ((tmp_path / name).stat().st_mode & 0o777 for name in ("plain.txt", "atomic.txt"))
    assert atomic == plain == 0o666 & ~umask
