"""
The HC18 fetal head bundle through MONAI's real CLI: train -> evaluate -> infer -> export on a few real HC18
images and on synthetic data, multi-process training and evaluation with torchrun (gloo), offline metadata checks, bad input.

Tiny runs: 64x64 network input, batch 2, one epoch, no loader workers.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import load_net_with_metadata
from PIL import Image

from custom_nets import AdaptiveCENet
from custom_nets.data.hc18 import IMAGE_FOLDER, PIXEL_SIZE_CSV
from custom_nets.data.synthetic_hc18 import generate

pytestmark = pytest.mark.slow

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "fetal_head_us_segmentation"
SCHEMA = BUNDLE.parent / "schema" / "meta_schema_20240725.json"
TINY = ["--image_size", "64", "--num_workers", "0", "--train#trainer#max_epochs", "1", "--train#dataloader#batch_size", "2"]
# 10 real images of 9 subjects (017 has a second scan), so the split has all three parts
REAL_IMAGES = ["001_HC", "011_HC", "017_HC", "017_2HC", "022_HC", "028_HC", "030_HC", "034_HC", "039_HC", "052_HC"]


def bundle_cli(*args: str, cwd: Path, check: bool = True, command: tuple[str, ...] = ("-m", "monai.bundle")) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the bundle's own sqlite default
    result = subprocess.run([sys.executable, *command, *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _real_subset(shared_data: Path, target: Path) -> Path:
    """A small HC18 dataset copied from the shared sample (never into the repository)."""
    source = shared_data / "hc18_subset"
    (target / IMAGE_FOLDER).mkdir(parents=True)
    for name in REAL_IMAGES:
        for suffix in (".png", "_Annotation.png"):
            shutil.copy(source / IMAGE_FOLDER / f"{name}{suffix}", target / IMAGE_FOLDER)
    lines = (source / PIXEL_SIZE_CSV).read_text().splitlines()
    keep = {f"{name}.png" for name in REAL_IMAGES}
    (target / PIXEL_SIZE_CSV).write_text("\n".join([lines[0], *(l for l in lines[1:] if l.split(",")[0] in keep)]) + "\n")
    return target


@pytest.fixture(scope="module", params=["real", "synthetic"])
def trained(request, tmp_path_factory):
    """
    A bundle trained for one epoch. ``real``: a few HC18 images, run from another folder with
    ``--bundle_root`` and ``run training``. ``synthetic``: run from the bundle folder as typed (plain
    ``run``), outputs redirected to a temporary folder.
    """
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "real":
        shared_data = request.getfixturevalue("shared_data")
        dataset = _real_subset(shared_data, root / "hc18")
        cwd, configs = root, BUNDLE / "configs"
        location = ["--bundle_root", str(root / "bundle")]
        output_dir, ckpt = root / "bundle" / "eval", root / "bundle" / "models" / "model.pt"
        train = ["run", "training", "--config_file", str(configs / "train.json"), "--dataset_dir", str(dataset)]
    else:
        dataset = Path(generate(str(root / "synthetic"), num_images=8, height=96, width=128, seed=0))
        cwd, configs = BUNDLE, Path("configs")
        output_dir, ckpt = root / "eval", root / "models" / "model.pt"
        location = ["--output_dir", str(output_dir), "--ckpt_dir", str(ckpt.parent)]
        # the default dataset is the synthetic one; pointing it at a complete dataset skips generation
        train = ["run", "--config_file", str(configs / "train.json"), "--synthetic_dataset_dir", str(dataset)]
    bundle_cli(*train, *location, *TINY, "--tracking", "mlflow", cwd=cwd)
    return SimpleNamespace(
        kind=request.param, root=root, cwd=cwd, configs=configs, location=location, dataset=dataset,
        output_dir=output_dir, ckpt=ckpt, dataset_args=["--dataset_dir", str(dataset)],
    )  # fmt: skip


def _datalist(trained) -> dict:
    """The split the bundle wrote, with image paths made absolute (they are stored relative to the dataset)."""
    content = json.loads((trained.output_dir / "datalist.json").read_text())
    parts = {k: content[k] for k in ("training", "validation", "test")}
    return {k: [{**i, "image": str(trained.dataset / i["image"])} for i in v] for k, v in parts.items()}


def test_training_saves_the_best_model(trained):
    state = torch.load(trained.ckpt, map_location="cpu", weights_only=True)
    assert "encoder.conv1.weight" in state
    assert all(_datalist(trained)[part] for part in ("training", "validation", "test"))


def test_training_run_is_in_the_mlflow_sqlite_store(trained):
    # a client, not mlflow.set_tracking_uri: that exports MLFLOW_TRACKING_URI to later bundle runs
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained.output_dir / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and np.isfinite(metrics["train_loss"])


def test_evaluation_writes_per_case_metrics_and_summary(trained):
    configs = f"['{trained.configs / 'train.json'}','{trained.configs / 'evaluate.json'}']"
    bundle_cli("run", "evaluating", "--config_file", configs, *trained.location, *trained.dataset_args, *TINY, cwd=trained.cwd)
    with open(trained.output_dir / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    test_images = sorted(Path(i["image"]).name for i in _datalist(trained)["test"])
    assert sorted(r["case"] for r in rows) == test_images
    expected = {"dice", "iou", "precision", "recall", "accuracy", "f1", "hd95_px", "pixel_size_mm", "hc_mm", "hc_ref_mm", "hc_abs_error_mm"}
    assert expected <= set(rows[0])
    assert all(0.0 <= float(r["dice"]) <= 1.0 and float(r["hc_ref_mm"]) > 0 for r in rows)
    summary = json.loads((trained.output_dir / "metrics_summary.json").read_text())
    assert summary["cases"] == len(test_images) and summary["metrics"]["dice"]["count"] == len(test_images)


def test_inference_writes_masks_at_original_size_and_lists_a_broken_file(trained):
    inputs, out = trained.root / "infer_in", trained.root / "infer_out"
    inputs.mkdir()
    images = [Path(i["image"]) for i in _datalist(trained)["test"]]
    for image in images:
        shutil.copy(image, inputs)
    (inputs / "broken.png").write_bytes(images[0].read_bytes()[:500])
    result = bundle_cli(
        "run", "inference", "--config_file", str(trained.configs / "inference.json"),
        "--input_dir", str(inputs), "--output_dir", str(out), "--ckpt_path", str(trained.ckpt), "--image_size", "64",
        "--pixel_size_csv", str(trained.dataset / PIXEL_SIZE_CSV), "--save_overlay", "true",
        cwd=trained.cwd, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "1 image(s) failed" in result.stdout and "broken.png" in result.stdout
    with open(out / "head_circumference.csv") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    assert rows["broken.png"]["status"].startswith("failed:")
    for image in images:
        assert rows[image.name]["status"] == "ok" and float(rows[image.name]["pixel_size_mm"]) > 0
        mask = Image.open(out / f"{image.stem}_mask.png")
        assert mask.size == Image.open(image).size and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(out / f"{image.stem}_overlay.png").size == mask.size


def test_export_torchscript_matches_eager(trained):
    ts_path = trained.root / "model.ts"
    bundle_cli(
        "ckpt_export", "--net_id", "network_def", "--filepath", str(ts_path), "--ckpt_file", str(trained.ckpt),
        "--meta_file", str(trained.configs / "metadata.json"), "--config_file", str(trained.configs / "inference.json"),
        cwd=trained.cwd,
    )  # fmt: skip
    scripted, meta, extra = load_net_with_metadata(str(ts_path), more_extra_files=("inference.json",))
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 2 and "inference.json" in extra

    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.json")
    parser.update({"image_size": 64, "device": "$torch.device('cpu')"})
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(trained.ckpt, map_location="cpu", weights_only=True))
    image = parser.get_parsed_content("preprocessing")({"image": str(_datalist(trained)["test"][0]["image"])})["image"]
    eager.eval()
    with torch.no_grad():
        np.testing.assert_allclose(scripted(image[None]).numpy(), eager(image[None].as_tensor()).numpy(), atol=1e-4)


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) > 0 for p in sorted(folder.glob("*_mask.png"))}


def test_int8_export_and_inference_paths(trained):
    """quantize -> --precision int8 and auto use it, fp32 on request; a model.pt changed since is not paired with it."""
    if trained.kind != "real":
        pytest.skip("the INT8 path is checked on the real HC18 images (one export is enough)")
    bundle = trained.root / "int8_bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    shutil.copy(trained.ckpt, bundle / "models" / "model.pt")
    calibration = trained.dataset / IMAGE_FOLDER
    quantize = ("quantize", str(bundle), "--calibration_dir", str(calibration), "--num_inputs", "4", "--image_size", "64")
    # an INT8 model further from fp32 than asked is not written: one line, no file
    refused = bundle_cli(*quantize, "--min_dice", "1.01", cwd=trained.root, command=("-m", "custom_nets.deploy"), check=False)
    assert refused.returncode == 1 and not (bundle / "models" / "model_int8.onnx").exists()
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {bundle / 'models' / 'model.pt'}: the INT8 model's masks agree with fp32 at Dice ")
    # a one-epoch 64 px model is no reference for agreement: the bound of a trained one is in the benchmark
    result = bundle_cli(*quantize, "--min_dice", "0", cwd=trained.root, command=("-m", "custom_nets.deploy"))
    assert (bundle / "models" / "model_int8.onnx").is_file() and "foreground_dice_mean" in result.stdout
    inputs = trained.root / "int8_in"
    inputs.mkdir()
    for item in _datalist(trained)["test"]:
        shutil.copy(item["image"], inputs)

    def infer(precision: str, out: str, check: bool = True) -> subprocess.CompletedProcess:
        return bundle_cli(
            "run", "inference", "--config_file", "configs/inference.json", "--input_dir", str(inputs),
            "--output_dir", str(trained.root / out), "--image_size", "64", "--precision", precision, cwd=bundle, check=check,
        )  # fmt: skip

    auto = infer("auto", "out_auto")
    assert "inference path: int8 (ONNX Runtime, INT8 QDQ): INT8 model" in auto.stdout + auto.stderr
    assert "images/s" in auto.stdout + auto.stderr and "network" in auto.stdout + auto.stderr
    infer("fp32", "out_fp32")
    int8_masks, fp32_masks = _masks(trained.root / "out_auto"), _masks(trained.root / "out_fp32")
    assert int8_masks.keys() == fp32_masks.keys() and len(int8_masks) == len(_datalist(trained)["test"])
    for name, mask in int8_masks.items():
        assert mask.shape == fp32_masks[name].shape

    # retrained since the INT8 export: auto falls back and says why, an explicit int8 is refused in one line
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, bundle / "models" / "model.pt")
    fallback = infer("auto", "out_fallback")
    assert "(retrained since?)" in fallback.stdout + fallback.stderr and "inference path: int8" not in fallback.stdout + fallback.stderr
    refused = infer("int8", "out_refused", check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith("ERROR: precision int8 cannot run here: ")


def test_verify_metadata_offline():
    result = bundle_cli("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA), cwd=BUNDLE)
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_verify_net_in_out():
    result = bundle_cli(
        "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", "--n", "2",
        cwd=BUNDLE,
    )  # fmt: skip
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_multi_gpu_config_with_two_gloo_processes(tmp_path):
    dataset = generate(str(tmp_path / "synthetic"), num_images=8, height=96, width=128, seed=2)
    configs = f"['{BUNDLE / 'configs' / 'train.json'}','{BUNDLE / 'configs' / 'multi_gpu_train.json'}']"
    train = (
        "--nproc_per_node=2", "-m", "monai.bundle", "run", "training", "--config_file", configs,
        "--bundle_root", str(tmp_path / "bundle"), "--dataset_dir", dataset, *TINY,
    )  # fmt: skip
    bundle_cli(*train, cwd=tmp_path, command=("-m", "torch.distributed.run"))
    state = torch.load(tmp_path / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in state)  # saved unwrapped from DistributedDataParallel
    last = torch.load(tmp_path / "bundle" / "models" / "last_checkpoint.pt", map_location="cpu", weights_only=True)
    assert last["model"].keys() == state.keys() and last["trainer"]["iteration"] == last["trainer"]["epoch_length"]
    # every rank reads the same file; the run is complete already, so each says so and ends at once
    resumed = bundle_cli(*train, "--resume", "true", cwd=tmp_path, command=("-m", "torch.distributed.run"))
    assert (resumed.stdout + resumed.stderr).count("holds a finished run (1 of 1 epochs): nothing to do") == 2


def test_multi_gpu_evaluation_with_two_gloo_processes_writes_the_single_process_files(tmp_path, monkeypatch):
    dataset = generate(str(tmp_path / "synthetic"), num_images=24, height=96, width=128, seed=2)
    torch.manual_seed(0)  # an untrained network: evaluation only needs weights, and this spares a training run
    weights = AdaptiveCENet(spatial_dims=2, in_channels=1, out_channels=2).state_dict()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default per process; the same for the single run
    configs = [str(BUNDLE / "configs" / name) for name in ("train.json", "evaluate.json", "multi_gpu_evaluate.json")]
    for run, nproc in (("single", 1), ("ddp", 2)):
        (tmp_path / run / "models").mkdir(parents=True)
        torch.save(weights, tmp_path / run / "models" / "model.pt")
        args = ("run", "evaluating", "--config_file", str(configs[: 2 if nproc == 1 else 3]), "--bundle_root", str(tmp_path / run), "--dataset_dir", dataset, *TINY)
        args += ("--validate#dataset#data", "$@datalist['test'] + @datalist['validation']")  # 7 cases: 4 + 3 over two ranks
        launcher = ("-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "monai.bundle") if nproc > 1 else ("-m", "monai.bundle")
        bundle_cli(*args, cwd=tmp_path, command=launcher)
    for name in ("metrics_per_case.csv", "metrics_summary.csv", "metrics_summary.json"):
        assert (tmp_path / "ddp" / "eval" / name).read_bytes() == (tmp_path / "single" / "eval" / name).read_bytes(), name
    datalist = json.loads((tmp_path / "ddp" / "eval" / "datalist.json").read_text())
    cases = [Path(i["image"]).name for i in datalist["test"] + datalist["validation"]]
    with open(tmp_path / "ddp" / "eval" / "metrics_per_case.csv") as f:
        assert [r["case"] for r in csv.DictReader(f)] == cases  # dataset order, each case once
    assert len(cases) % 2 == 1  # an uneven split over the two ranks


def test_wrong_dataset_dir_is_a_one_line_error(tmp_path):
    result = bundle_cli(
        "run", "training", "--config_file", str(BUNDLE / "configs" / "train.json"), "--bundle_root", str(tmp_path),
        "--dataset_dir", str(tmp_path / "no_such_folder"), *TINY,
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"ERROR: {tmp_path / 'no_such_folder'}: dataset folder not found (set --dataset_dir to the HC18 folder)"
    assert "Traceback" not in result.stderr
