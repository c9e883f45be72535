"""
The lung CT bundle end to end through the real ``python -m monai.bundle`` CLI: training and evaluation on
its default synthetic LUNA16-layout dataset, then inference on the real DICOM series and the real NRRD
CT, whose masks must keep the inputs' geometry. Tiny on purpose (64x64 slices, one epoch).
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

from custom_nets.metrics.nodules import NODULE_TABLE_COLUMNS

CONFIGS = Path(__file__).resolve().parents[2] / "bundles" / "lung_nodule_ct_segmentation" / "configs"
TINY = ["--image_size", "[64,64]", "--num_workers", "0"]
TINY_TRAIN = [*TINY, "--patch_size", "[64,64]", "--slices_per_volume", "2", "--volumes_per_batch", "2"]


def monai_bundle(*args, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle ARGS``; on an unexpected exit status, fail with the end of its output."""
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        pytest.fail(f"monai.bundle {' '.join(map(str, args[:2]))} exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")
    return result


def _itk_geometry(path):
    import itk

    image = itk.imread(str(path))
    return [np.asarray(v, dtype=float) for v in (itk.size(image), image.GetOrigin(), image.GetSpacing(), itk.array_from_matrix(image.GetDirection()))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A bundle root with a model trained for one epoch on the default (synthetic, generated) dataset."""
    root = tmp_path_factory.mktemp("lung_bundle")
    monai_bundle("run", "training", "--config_file", CONFIGS / "train.json", "--bundle_root", root,
                 "--train#trainer#max_epochs", 1, "--cache_rate", 1.0, *TINY_TRAIN)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def inferred(trained, shared_data, tmp_path_factory):
    """Inference over a folder with the real DICOM series, the real NRRD CT and a MetaImage header without data."""
    inputs, outputs = tmp_path_factory.mktemp("ct_inputs"), tmp_path_factory.mktemp("ct_outputs")
    os.symlink(shared_data / "lung_ct" / "acrin_flt_breast_001" / "dicom", inputs / "acrin001")
    os.symlink(shared_data / "lung_ct" / "lung1_image.nrrd", inputs / "lung1.nrrd")
    (inputs / "no_data.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\nElementDataFile = no_data.raw\n")
    result = monai_bundle("run", "inference", "--config_file", CONFIGS / "inference.json", "--bundle_root", trained,
                          "--input_dir", inputs, "--output_dir", outputs, *TINY, check=False)  # fmt: skip
    return result, outputs


@pytest.mark.slow
def test_training_on_the_default_synthetic_dataset(trained):
    assert (trained / "data" / "luna16_synthetic" / "annotations.csv").is_file()
    assert (trained / "models" / "model.pt").is_file()
    datalist = json.loads((trained / "eval" / "datalist.json").read_text())
    assert all(item["image"].endswith(".mhd") and "nodules" in item for item in datalist["training"])


@pytest.mark.slow
def test_evaluation_reports_dice_and_hd95_in_mm(trained):
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']"
    monai_bundle("run", "evaluating", "--config_file", configs, "--bundle_root", trained, *TINY)
    with open(trained / "eval" / "metrics_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(json.loads((trained / "eval" / "datalist.json").read_text())["test"])
    assert {"case", "dice", "hd95_mm"} <= set(rows[0])


@pytest.mark.slow
def test_two_process_evaluation_writes_the_single_process_files(trained, tmp_path):
    configs = [str(CONFIGS / name) for name in ("train.json", "evaluate.json", "multi_gpu_evaluate.json")]
    cases = ("--validate#dataset#data", "$@datalist['test'] + @datalist['validation']")  # more cases than ranks
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per process; the same for the single run
    for out, launcher in ((tmp_path / "single", []), (tmp_path / "ddp", ["-m", "torch.distributed.run", "--nproc_per_node=2"])):
        command = [sys.executable, *launcher, "-m", "monai.bundle", "run", "evaluating", "--config_file", str(configs[: 3 if launcher else 2]),
                   "--bundle_root", str(trained), "--output_dir", str(out), *cases, *TINY]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for name in ("metrics_per_case.csv", "metrics_summary.csv", "metrics_summary.json"):
        assert (tmp_path / "ddp" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert len((tmp_path / "ddp" / "metrics_per_case.csv").read_text().splitlines()) >= 3  # a header and a case per rank at least


@pytest.mark.slow
def test_inference_on_real_dicom_series_keeps_its_geometry(inferred, shared_data):
    _, outputs = inferred
    mask, reference = nib.load(outputs / "acrin001_seg.nii.gz"), nib.load(shared_data / "lung_ct" / "acrin_flt_breast_001" / "ct.nii.gz")
    assert mask.shape == reference.shape
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-4)


@pytest.mark.slow
def test_inference_on_real_nrrd_keeps_its_geometry(inferred, shared_data):
    _, outputs = inferred
    for got, expected in zip(_itk_geometry(outputs / "lung1_seg.nii.gz"), _itk_geometry(shared_data / "lung_ct" / "lung1_image.nrrd")):
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_inference_writes_the_nodule_table(inferred):
    _, outputs = inferred
    with open(outputs / "nodules.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == NODULE_TABLE_COLUMNS
        assert {row["case"] for row in reader} <= {"acrin001", "lung1"}


@pytest.mark.slow
def test_inference_goes_on_past_a_bad_case_and_exits_non_zero(inferred):
    result, outputs = inferred
    assert result.returncode != 0
    with open(outputs / "results.csv", newline="") as f:
        status = {row["image"]: row["status"] for row in csv.DictReader(f)}
    assert status["acrin001"] == "ok" and status["lung1.nrrd"] == "ok"
    assert "no_data.raw, which does not exist" in status["no_data.mhd"]


@pytest.mark.slow
def test_export_gives_torchscript_equal_to_eager(trained):
    import torch
    from monai.bundle import ckpt_export

    from custom_nets import AdaptiveCENet

    ckpt_export(net_id="network_def", filepath=str(trained / "models" / "model.ts"), ckpt_file=str(trained / "models" / "model.pt"),
                meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"))  # fmt: skip
    eager = AdaptiveCENet(spatial_dims=2, in_channels=1, out_channels=2)
    eager.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    x = torch.rand(1, 1, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(trained / "models" / "model.ts")).eval()(x), eager.eval()(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_training_with_an_annotation_outside_its_scan_stops_with_one_line(tmp_path):
    from custom_nets.data import synthetic_luna16

    dataset = Path(synthetic_luna16.generate(str(tmp_path / "data"), num_cases=3, shape=(24, 24, 8), nodules_per_case=1))
    rows = (dataset / "annotations.csv").read_text().splitlines()
    uid = rows[1].split(",")[0]
    (dataset / "annotations.csv").write_text("\n".join([rows[0], f"{uid},900.0,900.0,900.0,5.0", *rows[2:]]) + "\n")
    result = monai_bundle("run", "training", "--config_file", CONFIGS / "train.json", "--bundle_root", tmp_path,
                          "--dataset_dir", dataset, "--cache_rate", 1.0, *TINY_TRAIN, check=False)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(f"ERROR: {uid}: nodule 0 at (900.0, 900.0, 900.0) mm lies outside the volume")


def test_metadata_and_network_shapes_verify_offline(repo_root):
    from monai.bundle import verify_metadata, verify_net_in_out

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(repo_root / "bundles" / "schema" / "meta_schema_20240725.json"))
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"), n=2)


def test_a_patch_larger_than_the_image_is_one_line_before_training(tmp_path):
    result = monai_bundle("run", "training", "--config_file", CONFIGS / "train.json", "--bundle_root", tmp_path,
                          "--image_size", "[32,32]", "--patch_size", "[64,64]", "--num_workers", "0", check=False)  # fmt: skip
    assert result.returncode != 0
    assert "ERROR: --patch_size [64, 64] does not fit in --image_size [32, 32]: training patches are cropped" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()  # stopped before any data was made or any epoch ran
