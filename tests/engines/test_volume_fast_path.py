"""
The fast path of the volume bundles on real volumes, through the real command lines: the INT8 model is
made by ``python -m custom_nets.deploy quantize`` (calibrated through the bundle's own preprocessing and
SliceInferer on real scans), then ``python -m monai.bundle run inference ... --precision int8`` runs it
over a real scan and writes a mask with the scan's geometry.

The network has random weights and 64x64 slices so that the test stays short: it checks the mechanics
(export with a batch axis that SliceInferer's batches of slices can use, calibration through the volume
preprocessing, the bundle's switch, the inversion to the input grid), not accuracy. INT8-vs-fp32 mask
agreement of a trained model is measured with the command in each bundle's ``docs/README.md``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the INT8 path needs the optional extra custom_nets[fast]")

REPO = Path(__file__).resolve().parents[2]
# 64x64 slices; sw_batch_size stays the bundle's, so the INT8 model sees batches of several slices
SMALL = {"image_size": [64, 64]}


def run(*args: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python ARGS``; on a non-zero exit status, fail with the end of its output."""
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args[:3]))} exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")
    return result


def scratch_bundle(name: str, folder: Path, layout: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    """The bundle's configs in ``folder`` with a 64x64 override and a random-weight ``models/model.pt``;
    returns the folder and its config files (inference.json, ``layout``, the override), relative to it."""
    shutil.copytree(REPO / "bundles" / name / "configs", folder / "configs")
    (folder / "configs" / "small.json").write_text(json.dumps(SMALL))
    configs = ["configs/inference.json", *layout, "configs/small.json"]
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(folder / c) for c in configs])
    (folder / "models").mkdir()
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "models" / "model.pt")
    return folder, configs


def quantize(bundle: Path, configs: list[str], calibration: Path) -> None:
    """``python -m custom_nets.deploy quantize`` on 4 calibration slices; the INT8 model must be there after."""
    # random weights: no agreement bound (min_dice 0); a trained model's is checked in test_fetal_head_bundle
    run("-m", "custom_nets.deploy", "quantize", bundle, "--calibration_dir", calibration, "--num_inputs", 4,
        "--extra_configs", str(configs[1:]), "--min_dice", 0)  # fmt: skip
    assert (bundle / "models" / "model_int8.onnx").is_file()


def infer(bundle: Path, configs: list[str], inputs: Path, outputs: Path, precision: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run inference ... --precision PRECISION`` with the scratch bundle's configs."""
    config_files = str([str(bundle / c) for c in configs])
    args = ["-m", "monai.bundle", "run", "inference", "--config_file", config_files, "--bundle_root", bundle,
            "--input_dir", inputs, "--output_dir", outputs, "--precision", precision]  # fmt: skip
    if check:
        return run(*args)
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True)


def statuses(outputs: Path) -> list[str]:
    with open(outputs / "results.csv", newline="") as f:
        return [row["status"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def ct_bundle(shared_data, tmp_path_factory):
    """The CT bundle (random weights, 64x64 slices) with its INT8 model, calibrated on the real ACRIN CT."""
    root = tmp_path_factory.mktemp("ct_fast_path")
    bundle, configs = scratch_bundle("lung_nodule_ct_segmentation", root / "bundle")
    calibration = root / "calibration"
    calibration.mkdir()
    os.symlink(shared_data / "lung_ct" / "acrin_flt_breast_001" / "ct.nii.gz", calibration / "acrin001.nii.gz")
    quantize(bundle, configs, calibration)
    return bundle, configs


@pytest.mark.slow
def test_ct_int8_from_quantize_runs_through_the_bundle_cli_and_keeps_the_nrrd_geometry(ct_bundle, shared_data, tmp_path):
    import itk

    bundle, configs = ct_bundle
    scan = shared_data / "lung_ct" / "lung1_image.nrrd"  # 512x512x48, 0.57x0.57x5 mm, LPS; not a calibration scan
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    os.symlink(scan, inputs / "lung1.nrrd")
    done = infer(bundle, configs, inputs, tmp_path / "out", "int8")
    assert "inference path: int8 (ONNX Runtime, INT8 QDQ)" in done.stdout + done.stderr
    assert statuses(tmp_path / "out") == ["ok"]
    mask, source = itk.imread(str(tmp_path / "out" / "lung1_seg.nii.gz")), itk.imread(str(scan))
    assert tuple(itk.size(mask)) == tuple(itk.size(source)) == (512, 512, 48)
    np.testing.assert_allclose(mask.GetSpacing(), source.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(mask.GetOrigin(), source.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(itk.array_from_matrix(mask.GetDirection()), itk.array_from_matrix(source.GetDirection()), atol=1e-6)
    assert set(np.unique(itk.array_view_from_image(mask)).tolist()) <= {0, 1}
    assert (tmp_path / "out" / "nodules.csv").is_file()


@pytest.mark.slow
def test_int8_model_of_another_checkpoint_is_refused_in_one_line(ct_bundle, shared_data, tmp_path):
    """After retraining (a new model.pt) the old INT8 model is stale: --precision int8 fails with one line saying so."""
    bundle = Path(shutil.copytree(ct_bundle[0], tmp_path / "bundle"))
    weights = torch.load(bundle / "models" / "model.pt")
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, bundle / "models" / "model.pt")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    os.symlink(shared_data / "lung_ct" / "lung1_image.nrrd", inputs / "lung1.nrrd")
    refused = infer(bundle, ct_bundle[1], inputs, tmp_path / "out", "int8", check=False)
    assert refused.returncode != 0
    assert "precision int8 cannot run here" in refused.stderr and "was not made from" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_mri_int8_from_quantize_runs_through_the_bundle_cli_and_keeps_the_nifti_geometry(shared_data, tmp_path):
    bundle, configs = scratch_bundle("brain_tumor_mri_segmentation", tmp_path / "bundle", ("configs/layout_brats2013.json",))
    calibration, inputs = tmp_path / "calibration", tmp_path / "inputs"
    calibration.mkdir(), inputs.mkdir()
    for case in ("brats_2013_pat0005_1", "brats_2013_pat0006_1"):  # calibration on other patients than the scan
        os.symlink(shared_data / "brats2015" / case, calibration / case)
    case = "brats_2013_pat0003_1"
    os.symlink(shared_data / "brats2015" / case, inputs / case)
    quantize(bundle, configs, calibration)
    done = infer(bundle, configs, inputs, tmp_path / "out", "int8")
    assert "inference path: int8 (ONNX Runtime, INT8 QDQ)" in done.stdout + done.stderr
    assert statuses(tmp_path / "out") == ["ok"]
    mask = nib.load(tmp_path / "out" / f"{case}_seg.nii.gz")
    source = nib.load(shared_data / "brats2015" / case / "Flair_subtrMeanDivStd.nii.gz")
    assert mask.shape == source.shape == (240, 240, 155)
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2, 4}
