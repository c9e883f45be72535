"""
Checkpoints are read with ``weights_only=True`` through one function,
:func:`custom_nets.checkpoints.load_checkpoint`: a file crafted to run code when unpickled is refused
(and nothing runs), a damaged or foreign file gives one line naming it, and the bundles' real
``python -m monai.bundle`` CLI stops on such a ``models/model.pt`` with that line and writes nothing.
"""

from __future__ import annotations

import os
import pickle
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from _export_helpers import HANDOFF_CASES, REPO_ROOT, copy_bundle, run_cli
from custom_nets.errors import InputError
from custom_nets.checkpoints import CheckpointNotFoundError, load_checkpoint


class _TouchesMarker:
    """Unpickling this object runs ``touch <marker>`` (what a hostile checkpoint would do with worse commands)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _zip_checkpoint(path: Path, marker: Path) -> None:
    """A ``torch.save`` file that looks like a state dict, with the code-running object among its tensors."""
    torch.save({"conv.weight": torch.ones(2, 2), "conv.bias": _TouchesMarker(marker)}, path)


def _pickle_protocol_2(path: Path, marker: Path) -> None:
    """Torch's legacy (non-zip) format is a plain pickle: protocol 2 gets the unpickler as far as the global."""
    with open(path, "wb") as f:
        pickle.dump({"conv.bias": _TouchesMarker(marker)}, f, protocol=2)


def _pickle_default_protocol(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"conv.bias": _TouchesMarker(marker)}, f)


CRAFTED = {
    "torch_save_zip": (_zip_checkpoint, r"refused, it holds Python objects \(e\.g\. \w+\.system\) that weights_only loading does not run"),
    "pickle_protocol_2": (_pickle_protocol_2, r"refused, it holds Python objects \(e\.g\. \w+\.system\)"),
    "pickle_default_protocol": (_pickle_default_protocol, r"not a PyTorch checkpoint \(the weights-only unpickler stopped at: Unsupported operand"),
}


def _good_checkpoint(path: Path) -> None:
    torch.save({"conv.weight": torch.arange(6.0).reshape(2, 3)}, path)


def _truncated_end(path: Path) -> None:
    _good_checkpoint(path)
    path.write_bytes(path.read_bytes()[:-200])


def _truncated_start(path: Path) -> None:
    _good_checkpoint(path)
    path.write_bytes(path.read_bytes()[:300])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _text(path: Path) -> None:
    path.write_text("epoch,loss\n1,0.5\n")


def _png_bytes(path: Path) -> None:
    from PIL import Image

    Image.new("L", (8, 8)).save(path, format="PNG")


def _bare_tensor(path: Path) -> None:
    torch.save(torch.ones(3), path)


def _folder(path: Path) -> None:
    path.mkdir()


DAMAGED = {
    "truncated_end": (_truncated_end, r"truncated or corrupt \("),
    "truncated_start": (_truncated_start, r"truncated or corrupt \(RuntimeError: PytorchStreamReader failed reading zip archive"),
    "empty": (_empty, r"the file is empty"),
    "text_file": (_text, r"not a PyTorch checkpoint \("),
    "png_file": (_png_bytes, r"not a PyTorch checkpoint \("),
    "bare_tensor": (_bare_tensor, r"holds a Tensor, not a dict"),
    "folder": (_folder, r"not a file"),
}


@pytest.mark.parametrize("craft", [pytest.param(v[0], id=k) for k, v in CRAFTED.items()])
def test_crafted_files_really_run_code_when_unpickled_unsafely(tmp_path, craft):
    """Control: the crafted files are real attacks, so the refusals below mean something."""
    path, marker = tmp_path / "model.pt", tmp_path / "ran_code"
    craft(path, marker)
    if path.read_bytes()[:2] == b"PK":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("craft, message", [pytest.param(*v, id=k) for k, v in CRAFTED.items()])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, craft, message):
    path, marker = tmp_path / "crafted model.pt", tmp_path / "ran_code"
    craft(path, marker)
    with pytest.raises(InputError, match=rf"^cannot read checkpoint {re.escape(str(path))}: {message}") as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [pytest.param(*v, id=k) for k, v in DAMAGED.items()])
def test_a_damaged_or_foreign_file_gives_one_line_naming_it(tmp_path, damage, message):
    path = tmp_path / "model.pt"
    damage(path)
    with pytest.raises(InputError, match=rf"^cannot read checkpoint {re.escape(str(path))}: {message}") as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)


def test_a_missing_file_is_an_input_error_and_a_file_not_found_error(tmp_path):
    path = tmp_path / "models" / "model.pt"
    with pytest.raises(CheckpointNotFoundError, match=rf"^cannot read checkpoint {re.escape(str(path))}: file not found$") as caught:
        load_checkpoint(path)
    assert isinstance(caught.value, InputError) and isinstance(caught.value, FileNotFoundError)


@pytest.mark.parametrize("mmap", [False, True])
def test_a_good_checkpoint_loads_with_its_tensors(tmp_path, mmap):
    path = tmp_path / "model.pt"
    _good_checkpoint(path)
    content = load_checkpoint(path, map_location="cpu", mmap=mmap)
    torch.testing.assert_close(content["conv.weight"], torch.arange(6.0).reshape(2, 3))


def test_the_description_names_what_the_file_is(tmp_path):
    path = tmp_path / "resnet34.pth"
    _empty(path)
    with pytest.raises(InputError, match=rf"^cannot read pretrained weights {re.escape(str(path))}: the file is empty$"):
        load_checkpoint(path, description="pretrained weights")


def _bundle_with_checkpoint(case, tmp_path: Path, write_checkpoint) -> tuple[Path, Path, Path]:
    bundle = copy_bundle(case.name, tmp_path / "bundle")
    write_checkpoint(bundle / "models" / "model.pt")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    case.synthetic_input(inputs)
    return bundle, inputs, tmp_path / "outputs"


def _inference(bundle: Path, inputs: Path, outputs: Path):
    return run_cli(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--input_dir", str(inputs), "--output_dir", str(outputs)],
        cwd=REPO_ROOT,
    )  # fmt: skip


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in HANDOFF_CASES])
def test_bundle_inference_refuses_a_crafted_checkpoint(tmp_path, case):
    marker = tmp_path / "ran_code"
    bundle, inputs, outputs = _bundle_with_checkpoint(case, tmp_path, lambda p: _zip_checkpoint(p, marker))
    result = _inference(bundle, inputs, outputs)
    assert result.returncode != 0
    checkpoint = bundle / "models" / "model.pt"
    assert _last_line(result.stderr) == (
        f"ERROR: cannot read checkpoint {checkpoint}: refused, it holds Python objects (e.g. posix.system) that "
        "weights_only loading does not run; if you trust its source, allow them with "
        "torch.serialization.add_safe_globals or re-save it as a dict of tensors"
    )
    assert not marker.exists()
    assert not outputs.exists() or not any(outputs.rglob("*"))


@pytest.mark.slow
def test_bundle_inference_stops_on_a_truncated_checkpoint(tmp_path):
    case = HANDOFF_CASES[0]
    bundle, inputs, outputs = _bundle_with_checkpoint(case, tmp_path, _truncated_start)
    result = _inference(bundle, inputs, outputs)
    assert result.returncode != 0
    assert _last_line(result.stderr).startswith(f"ERROR: cannot read checkpoint {bundle / 'models' / 'model.pt'}: truncated or corrupt (")
    assert not outputs.exists() or not any(outputs.rglob("*"))


@pytest.mark.slow
def test_bundle_evaluation_refuses_a_crafted_checkpoint(tmp_path):
    case = HANDOFF_CASES[0]
    marker = tmp_path / "ran_code"
    bundle, _, outputs = _bundle_with_checkpoint(case, tmp_path, lambda p: _zip_checkpoint(p, marker))
    configs = repr([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "evaluate.json")])
    result = run_cli(
        [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", configs,
         "--bundle_root", str(bundle), "--output_dir", str(outputs)],
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode != 0
    assert _last_line(result.stderr).startswith(f"ERROR: cannot read checkpoint {bundle / 'models' / 'model.pt'}: refused, it holds")
    assert not marker.exists()
    assert not outputs.exists() or not any(outputs.rglob("*"))
