"""
The brain MRI bundle end to end through the real ``python -m monai.bundle`` CLI, on the real BraTS 2013
sample (FLAIR + T1c, labels 0-4) and on the synthetic BraTS 2020 layout: train -> evaluate -> infer ->
export. Tiny on purpose (64x64 slices, one epoch): these check the plumbing, not the accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_nets import AdaptiveCENet

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "brain_tumor_mri_segmentation"
CONFIGS = BUNDLE / "configs"
SAMPLE_LAYOUT = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'layout_brats2013.json'}']"
SAMPLE_EVALUATE = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'layout_brats2013.json'}','{CONFIGS / 'evaluate.json'}']"
TINY = ["--image_size", "[64,64]", "--num_workers", "0", "--slices_per_volume", "4", "--volumes_per_batch", "1"]
SAMPLE_INFERENCE = f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'layout_brats2013.json'}']"


def monai_bundle(*args, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle ARGS``; on an unexpected exit status, fail with the end of its output."""
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if check and result.returncode != 0:
        pytest.fail(f"monai.bundle {' '.join(map(str, args[:2]))} exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    """A bundle root with a model trained for one epoch on the real BraTS 2013 sample."""
    root = tmp_path_factory.mktemp("brain_bundle")
    monai_bundle("run", "training", "--config_file", SAMPLE_LAYOUT, "--bundle_root", root,
                 "--dataset_dir", shared_data / "brats2015", "--train#trainer#max_epochs", 1, "--cache_rate", 1.0, *TINY)  # fmt: skip
    return root


@pytest.mark.slow
def test_training_on_the_real_sample_writes_checkpoint_and_split(trained):
    assert (trained / "models" / "model.pt").is_file()
    datalist = json.loads((trained / "eval" / "datalist.json").read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [1, 1, 1]
    assert datalist["sequences"] == ["Flair", "T1c"]


@pytest.mark.slow
def test_evaluation_reports_dice_and_hd95_per_region(trained, shared_data):
    monai_bundle("run", "evaluating", "--config_file", SAMPLE_EVALUATE,
                 "--bundle_root", trained, "--dataset_dir", shared_data / "brats2015", *TINY)  # fmt: skip
    with open(trained / "eval" / "metrics_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test_case = json.loads((trained / "eval" / "datalist.json").read_text())["test"][0]["case"]
    assert [row["case"] for row in rows] == [test_case]
    for region in ("TC", "WT", "ET"):
        assert 0.0 <= float(rows[0][f"dice_{region}"]) <= 1.0
        assert f"hd95_mm_{region}" in rows[0]


@pytest.mark.slow
def test_inference_writes_masks_in_input_geometry_and_reports_a_bad_case(trained, shared_data, tmp_path):
    inputs, outputs = tmp_path / "cases", tmp_path / "out"
    inputs.mkdir()
    case = "brats_2013_pat0005_1"
    os.symlink(shared_data / "brats2015" / case, inputs / case)
    (inputs / "case_without_t1c").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), inputs / "case_without_t1c" / "Flair_subtrMeanDivStd.nii.gz")
    result = monai_bundle("run", "inference", "--config_file", SAMPLE_INFERENCE, "--bundle_root", trained,
                          "--input_dir", inputs, "--output_dir", outputs, "--image_size", "[64,64]", check=False)  # fmt: skip
    assert result.returncode != 0, "a failed case must make the batch exit non-zero"
    mask, reference = nib.load(outputs / f"{case}_seg.nii.gz"), nib.load(shared_data / "brats2015" / case / "Flair_subtrMeanDivStd.nii.gz")
    assert mask.shape == reference.shape
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2, 4}
    with open(outputs / "results.csv", newline="") as f:
        status = {row["image"]: row["status"] for row in csv.DictReader(f)}
    assert status[case] == "ok"
    assert "missing MRI sequence(s) T1c" in status["case_without_t1c"]


@pytest.mark.slow
def test_export_gives_torchscript_equal_to_eager(trained):
    monai_bundle("ckpt_export", "--net_id", "network_def", "--filepath", trained / "models" / "model.ts",
                 "--ckpt_file", trained / "models" / "model.pt", "--meta_file", CONFIGS / "metadata.json",
                 "--config_file", CONFIGS / "inference.json", "--sequences", "['Flair','T1c']")  # fmt: skip
    scripted = torch.jit.load(str(trained / "models" / "model.ts"))
    eager = AdaptiveCENet(spatial_dims=2, in_channels=2, out_channels=3)
    eager.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    x = torch.rand(2, 2, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted.eval()(x), eager.eval()(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_training_on_a_case_without_a_sequence_stops_with_one_line(tmp_path):
    from custom_nets.data import synthetic_brats

    dataset = synthetic_brats.generate(str(tmp_path / "data"), num_cases=3, shape=(16, 16, 8))
    (tmp_path / "data" / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz").unlink()
    result = monai_bundle("run", "training", "--config_file", CONFIGS / "train.json", "--bundle_root", tmp_path,
                          "--dataset_dir", dataset, *TINY, check=False)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("ERROR: BraTS20_Training_002: missing MRI sequence(s) t2")


def test_metadata_and_network_shapes_verify_offline(repo_root):
    from monai.bundle import verify_metadata, verify_net_in_out

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(repo_root / "bundles" / "schema" / "meta_schema_20240725.json"))
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"), n=2)


@pytest.mark.slow
def test_multi_gpu_config_trains_on_synthetic_data_with_two_gloo_processes(tmp_path):
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
               "--config_file", configs, "--bundle_root", str(tmp_path), "--train#trainer#max_epochs", "1", *TINY]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (tmp_path / "data" / "brats_synthetic" / "name_mapping.csv").is_file()
    assert (tmp_path / "models" / "model.pt").is_file()
