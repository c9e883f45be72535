"""
Hand-off exports of every bundle: TorchScript with the configs embedded, inference from ``model.ts``
alone in a Python where ``custom_nets`` cannot be imported, the hand-off folder, its bad inputs, and ONNX.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _export_helpers import (
    CKPT_EXPORT,
    bundle_names,
    check,
    env_without_custom_nets,
    exported_bundle,
    handoff_params,
    run_cli,
    sample_inputs,
)
from custom_nets.deploy import HandoffError, export_handoff
from custom_nets.deploy.onnx_runtime import OnnxRuntimeForward, onnx_parity

# every test here starts from a bundle exported by the real ckpt_export CLI (and most run more CLIs)
pytestmark = pytest.mark.slow
handoff_cases = pytest.mark.parametrize("case", handoff_params())

_FORWARD_WITHOUT_CUSTOM_NETS = """
import sys, torch
net = torch.jit.load(sys.argv[1], map_location="cpu").eval()
with torch.no_grad():
    torch.save(net(torch.load(sys.argv[2])), sys.argv[3])
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per bundle: a copy with a fresh checkpoint exported by the real ckpt_export CLI (made once)."""
    cache: dict[str, Path] = {}

    def get(case_or_name) -> Path:
        name = getattr(case_or_name, "name", case_or_name)
        if name not in cache:
            cache[name] = exported_bundle(name, tmp_path_factory.mktemp(name) / name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", bundle_names())
def test_exported_network_runs_without_custom_nets_and_equals_eager(name, exported, tmp_path):
    """Every bundle: model.ts from ckpt_export, loaded where custom_nets cannot be imported, gives the eager logits."""
    from monai.bundle import ConfigParser

    bundle = exported(name)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    image = next(iter(metadata["network_data_format"]["inputs"].values()))
    spatial = [64 if isinstance(s, str) else int(s) for s in image["spatial_shape"]]  # "32*n" with n=2
    x = torch.rand(1, image["num_channels"], *spatial, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    blocked = env_without_custom_nets(tmp_path / "block")
    check(run_cli(
        [sys.executable, "-c", _FORWARD_WITHOUT_CUSTOM_NETS, str(bundle / "models" / "model.ts"), str(tmp_path / "x.pt"),
         str(tmp_path / "y.pt")], cwd=tmp_path, env=blocked,
    ))  # fmt: skip

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    with torch.no_grad():
        eager = net(x)
    scripted = torch.load(tmp_path / "y.pt", weights_only=True)
    pred = next(iter(metadata["network_data_format"]["outputs"].values()))
    assert scripted.shape == eager.shape == (1, pred["num_channels"], *spatial)
    torch.testing.assert_close(scripted, eager, rtol=1e-4, atol=1e-5)


def _read_mask(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        return np.asarray(Image.open(path))
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def _input_shape(path: Path) -> tuple[int, ...]:
    return _read_mask(path).shape[:2] if path.suffix == ".png" else _read_mask(path).shape


def _mask_pairs(case, inputs: list[Path], dir_a: Path, dir_b: Path):
    """Per input: its name, its image file, and the masks two runs wrote for it in ``dir_a`` and ``dir_b``."""
    for image in inputs:
        name = image.name[: -len(".nii.gz")] if image.name.endswith(".nii.gz") else image.stem
        if image.is_dir():  # a case folder of sequence files (BraTS): its mask goes by the folder's name
            image = sorted(image.glob("*.nii.gz"))[0]
        yield (name, image, *(_read_mask(d / f"{name}{case.mask_postfix}{case.mask_suffix}") for d in (dir_a, dir_b)))


@handoff_cases
def test_model_ts_embeds_metadata_and_inference_config(case, exported):
    bundle = exported(case)
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu", _extra_files=extra)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert json.loads(extra["metadata.json"])["network_data_format"] == metadata["network_data_format"]
    assert json.loads(extra["inference.json"]) == json.loads((bundle / "configs" / "inference.json").read_text())


@handoff_cases
def test_inference_from_model_ts_without_custom_nets_equals_eager(case, exported, tmp_path, request):
    """The hand-off's TorchScript-only command, in a Python that cannot import custom_nets, writes the eager masks."""
    bundle = exported(case)
    handoff = export_handoff(bundle, tmp_path / "handoff" / case.name, int8=False)
    inputs = sample_inputs(case, tmp_path / "inputs", request)
    blocked = env_without_custom_nets(tmp_path / "block")
    probe = run_cli([sys.executable, "-c", "import custom_nets"], cwd=tmp_path, env=blocked)
    assert probe.returncode != 0 and "blocked" in probe.stderr

    eager_dir, ts_dir = tmp_path / "eager", tmp_path / "ts"
    check(run_cli(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
         "--input_dir", str(tmp_path / "inputs"), "--output_dir", str(eager_dir), "--precision", "fp32",
         "--postprocess", "none"], cwd=bundle,  # the hand-off has no research post-processing (ellipse fit)
    ))  # fmt: skip
    check(run_cli(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
         "--input_dir", str(tmp_path / "inputs"), "--output_dir", str(ts_dir)], cwd=handoff, env=blocked,
    ))  # fmt: skip

    for name, image, eager, scripted in _mask_pairs(case, inputs, eager_dir, ts_dir):
        assert scripted.shape == eager.shape
        assert scripted.shape[: len(_input_shape(image))] == _input_shape(image)
        assert set(np.unique(scripted).tolist()) <= case.mask_values
        # fp32 in channels_last sums in another order than the TorchScript export: a logit tie may flip
        differ = float(np.mean(scripted != eager))
        assert differ <= 1e-4, f"{name}: {differ:.2e} of the voxels differ"


@handoff_cases
def test_handoff_bundle_needs_no_custom_nets(case, exported, tmp_path):
    out = export_handoff(exported(case), tmp_path / "handoff" / case.name)
    config_text = (out / "configs" / "inference.json").read_text()
    assert "custom_nets" not in config_text
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model.ts"]
    assert not (out / "configs" / "train.json").exists()
    # research modules that need no custom_nets travel as scripts/ (the fetal bundle's resize)
    scripts = sorted(p.name for p in (out / "scripts").glob("*.py")) if (out / "scripts").is_dir() else []
    assert scripts == (["__init__.py", "antialiased_resize.py"] if case.name == "fetal_head_us_segmentation" else [])
    for path in (out / "scripts").glob("*.py"):
        assert "from custom_nets" not in path.read_text() and "import custom_nets" not in path.read_text()
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(out / "models" / "model.ts"), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["inference.json"]) == json.loads(config_text)


@handoff_cases
def test_handoff_without_model_ts_names_the_missing_file(case, exported, tmp_path):
    bundle = shutil.copytree(exported(case), tmp_path / case.name)
    (bundle / "models" / "model.ts").unlink()
    with pytest.raises(HandoffError, match=r"models/model\.ts: not found; export it first: python -m monai\.bundle ckpt_export"):
        export_handoff(bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@handoff_cases
def test_handoff_rejects_metadata_that_differs_from_the_export(case, exported, tmp_path):
    bundle = shutil.copytree(exported(case), tmp_path / case.name)
    meta_path = bundle / "configs" / "metadata.json"
    metadata = json.loads(meta_path.read_text())
    pred = next(iter(metadata["network_data_format"]["outputs"]))
    metadata["network_data_format"]["outputs"][pred]["num_channels"] += 1
    meta_path.write_text(json.dumps(metadata))
    with pytest.raises(HandoffError, match=rf"metadata\.json: network_data_format#outputs#{pred}#num_channels is"):
        export_handoff(bundle, tmp_path / "out")


@handoff_cases
def test_handoff_rejects_model_ts_whose_output_differs_from_metadata(case, exported, tmp_path):
    """Metadata embedded and on disk agree, but the network does not produce what they state."""
    bundle = shutil.copytree(exported(case), tmp_path / case.name)
    meta_path, ts_path = bundle / "configs" / "metadata.json", bundle / "models" / "model.ts"
    metadata = json.loads(meta_path.read_text())
    pred = next(iter(metadata["network_data_format"]["outputs"]))
    metadata["network_data_format"]["outputs"][pred]["num_channels"] += 1
    meta_path.write_text(json.dumps(metadata))
    torch.jit.save(torch.jit.load(str(ts_path)), str(ts_path), _extra_files={"metadata.json": json.dumps(metadata)})
    with pytest.raises(HandoffError, match=r"metadata\.json: the input/output it describes do not fit model\.ts: output channel number"):
        export_handoff(bundle, tmp_path / "out")


@handoff_cases
def test_handoff_rejects_ts_config_that_still_needs_custom_nets(case, exported, tmp_path):
    bundle = shutil.copytree(exported(case), tmp_path / case.name)
    ts_config = bundle / "configs" / "inference_ts.json"
    config = json.loads(ts_config.read_text())
    config["imports"] = config["imports"] + ["$import custom_nets"]
    ts_config.write_text(json.dumps(config))
    with pytest.raises(HandoffError, match=r"inference_ts\.json: the merged inference config still needs custom_nets at imports#"):
        export_handoff(bundle, tmp_path / "out")


@handoff_cases
def test_ckpt_export_without_checkpoint_fails_with_its_message(case, exported, tmp_path):
    bundle = shutil.copytree(exported(case), tmp_path / case.name)
    (bundle / "models" / "model.pt").unlink()
    result = run_cli([sys.executable, "-m", "monai.bundle", *CKPT_EXPORT], cwd=bundle)
    assert result.returncode != 0
    assert 'Checkpoint file "models/model.pt" not found' in result.stderr


@handoff_cases
def test_onnx_export_cli_matches_eager_in_onnxruntime(case, exported, tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is the optional extra custom_nets[onnx]")
    bundle = shutil.copytree(exported(case), tmp_path / case.name)
    shape = list(case.onnx_input_shape)
    check(run_cli(
        [sys.executable, "-m", "monai.bundle", "onnx_export", "--net_id", "network_def", "--filepath", "models/model.onnx",
         "--ckpt_file", "models/model.pt", "--config_file", "configs/inference.json", "--input_shape", json.dumps(shape)],
        cwd=bundle,
    ))  # fmt: skip
    assert OnnxRuntimeForward(bundle / "models" / "model.onnx").input_shape == shape
    result = onnx_parity(bundle)
    assert result["max_abs_diff"] < 1e-3
    assert result["argmax_agreement"] > 0.999


@pytest.mark.parametrize("case", [p for p in handoff_params() if p.id != "brain_tumor_mri_segmentation"])
def test_handoff_int8_runs_without_custom_nets_and_equals_the_research_int8_path(case, exported, tmp_path, request):
    """quantize -> handoff carries model_int8.onnx + scripts/onnx_network.py; the documented command, in a
    Python that cannot import custom_nets, writes the research path's INT8 masks; a stale INT8 model stays home."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is the optional extra custom_nets[fast]")
    bundle = shutil.copytree(exported(case), tmp_path / case.name)
    inputs = sample_inputs(case, tmp_path / "inputs", request)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for image in inputs:  # random weights: the masks are only compared with each other
        (shutil.copytree if image.is_dir() else shutil.copy)(image, calibration / image.name)
    check(run_cli(
        [sys.executable, "-m", "custom_nets.deploy", "quantize", str(bundle), "--calibration_dir", str(calibration),
         "--num_inputs", "2", "--min_dice", "0"], cwd=tmp_path,
    ))  # fmt: skip
    out = export_handoff(bundle, tmp_path / "handoff", int8=True)
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model.ts", "model_int8.onnx"]
    for path in (out / "scripts").glob("*.py"):
        assert "from custom_nets" not in path.read_text() and "import custom_nets" not in path.read_text()

    blocked = env_without_custom_nets(tmp_path / "block")
    research_dir, handoff_dir = tmp_path / "research", tmp_path / "handoff_out"
    research = check(run_cli(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
         "--input_dir", str(tmp_path / "inputs"), "--output_dir", str(research_dir), "--precision", "int8",
         "--postprocess", "none"], cwd=bundle,
    ))  # fmt: skip
    assert "inference path: int8" in research.stdout + research.stderr
    check(run_cli(
        [sys.executable, "-m", "monai.bundle", "run", "inference",
         "--config_file", "['configs/inference.json','configs/inference_int8.json']",
         "--input_dir", str(tmp_path / "inputs"), "--output_dir", str(handoff_dir)], cwd=out, env=blocked,
    ))  # fmt: skip
    for name, _, ours, theirs in _mask_pairs(case, inputs, research_dir, handoff_dir):
        assert theirs.shape == ours.shape
        differ = float(np.mean(theirs != ours))
        assert differ <= 1e-4, f"{name}: {differ:.2e} of the voxels differ"

    # retrained since the INT8 export: the hand-off leaves the stale INT8 model out, or refuses when asked for it
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, bundle / "models" / "model.pt")
    with pytest.raises(HandoffError, match=r"model_int8\.onnx: not made from .*model\.pt \(retrained since\?\)"):
        export_handoff(bundle, tmp_path / "refused", int8=True)
    assert not (tmp_path / "refused").exists()
    out = export_handoff(bundle, tmp_path / "handoff")
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model.ts"]
    assert not (out / "scripts" / "onnx_network.py").exists() and not (out / "configs" / "inference_int8.json").exists()
