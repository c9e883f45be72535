"""For test_tracking.py and test_compare.py: a real ``mlflow server``, a tiny real MONAI training, a tiny bundle."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(root: Path, timeout: float = 60.0) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, local artifact root); yields its URI."""
    mlflow_cli = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "w")
    cmd = [mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--default-artifact-root", str(root / "artifacts")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, 15)  # the server's own process group (gunicorn/uvicorn workers included)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def _disc_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
    radius = rng.uniform(size * 0.15, size * 0.3)
    label = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).astype(np.uint8)
    image = np.clip(label * 0.6 + 0.2 + 0.15 * rng.standard_normal((size, size)), 0, 1)
    return image.astype(np.float32), label


def write_bundle_card(bundle_root: Path, name: str = "tiny_test_bundle") -> Path:
    """``configs/metadata.json`` and ``docs/README.md`` as a bundle has them."""
    (bundle_root / "configs").mkdir(parents=True, exist_ok=True)
    (bundle_root / "docs").mkdir(parents=True, exist_ok=True)
    (bundle_root / "configs" / "metadata.json").write_text(json.dumps({"name": name, "version": "0.1.2"}))
    (bundle_root / "docs" / "README.md").write_text(f"# {name}\n\nModel card of a throwaway test bundle.\n")
    return bundle_root


def tiny_training(
    tracking_uri: str | None,
    experiment: str,
    bundle_root: Path | None = None,
    lr: float = 1e-3,
    max_epochs: int = 2,
    run_name: str | None = None,
    extra_handlers: tuple = (),
    seed: int = 0,
    train_artifacts: str | None = None,
):
    """
    A real MONAI ``SupervisedTrainer`` + ``SupervisedEvaluator`` on synthetic discs (4 train, 2 val, 32x32,
    tiny UNet), with MONAI's ``MLFlowHandler`` set up as ``--tracking mlflow`` does (unless ``tracking_uri``
    is None) and ``MLflowRunParams`` before it. Returns the trainer (not yet run).
    """
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import LrScheduleHandler, MeanDice, MLFlowHandler, ValidationHandler, from_engine
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import AsDiscreted, Compose

    from custom_nets.tracking import MLflowRunParams
    from custom_nets.tracking import run_name as make_run_name

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(6):
        image, label = _disc_sample(rng, 32)
        samples.append({"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label).float()[None]})
    device = torch.device("cpu")
    net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
    name = run_name or make_run_name(net, loss, lr)
    trackers = {}
    if tracking_uri is not None:
        common = {"tracking_uri": tracking_uri, "experiment_name": experiment, "run_name": name}
        trackers["val"] = [MLFlowHandler(iteration_log=False, **common)]
        trackers["train"] = [
            MLFlowHandler(
                iteration_log=True,
                epoch_log=True,
                tag_name="train_loss",
                output_transform=from_engine(["loss"], first=True),
                close_on_complete=True,
                artifacts=train_artifacts,
                **common,
            )
        ]
    post = Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=2), AsDiscreted(keys="label", to_onehot=2)])
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=DataLoader(Dataset(samples[4:]), batch_size=1),
        network=net,
        postprocessing=post,
        key_val_metric={
            "val_mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
        },
        val_handlers=trackers.get("val"),
    )
    handlers = [
        LrScheduleHandler(scheduler, print_lr=False),
        ValidationHandler(validator=evaluator, interval=1, epoch_level=True),
        MLflowRunParams(bundle_root=bundle_root, extra_params={"seed": seed}),
        *extra_handlers,
        *trackers.get("train", []),
    ]
    return SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=DataLoader(Dataset(samples[:4]), batch_size=2, shuffle=False),
        network=net,
        optimizer=optimizer,
        loss_function=loss,
        train_handlers=handlers,
    )


TRAIN_JSON = {
    "imports": ["$import glob", "$import custom_nets", "$import custom_nets.errors", "$import custom_nets.tracking"],
    "bundle_root": ".",
    "ckpt_dir": "$@bundle_root + '/models'",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/workspace/data",
    "seed": 0,
    "max_epochs": 5,
    "val_interval": 1,
    "learning_rate": 0.001,
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "images": "$sorted(glob.glob(@dataset_dir + '/images/*.png'))",
    "labels": "$sorted(glob.glob(@dataset_dir + '/labels/*.png'))",
    "datalist": "$[{'image': i, 'label': l} for i, l in zip(@images, @labels)]",
    "network_def": {"_target_": "custom_nets.AdaptiveCENet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2},
    "network": "$@network_def.to(@device)",
    "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
    "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate"},
    "experiment_name": "$custom_nets.tracking.experiment_name(@bundle_root)",
    "run_name": "$custom_nets.tracking.run_name(@network_def, @loss, @learning_rate)",
    "train": {
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": ["image", "label"]},
                {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"]},
                {"_target_": "ScaleIntensityd", "keys": "image"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$@datalist[:4]", "transform": "@train#preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 2, "num_workers": 0},
        "handlers": [
            {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
             "interval": "@val_interval"},
            {"_target_": "StatsHandler", "tag_name": "train_loss",
             "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
            {"_target_": "custom_nets.tracking.MLflowRunParams", "bundle_root": "@bundle_root",
             "extra_params": {"seed": "@seed"}},
            {"_target_": "custom_nets.tracking.ProgressLogger", "interval": 1},
        ],
        "trainer": {
            "_target_": "SupervisedTrainer",
            "max_epochs": "@max_epochs",
            "device": "@device",
            "train_data_loader": "@train#dataloader",
            "network": "@network",
            "loss_function": "@loss",
            "optimizer": "@optimizer",
            "train_handlers": "@train#handlers",
        },
    },
    "validate": {
        "preprocessing": "%train#preprocessing",
        "dataset": {"_target_": "Dataset", "data": "$@datalist[4:]", "transform": "@validate#preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1, "num_workers": 0},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True, "to_onehot": 2},
                {"_target_": "AsDiscreted", "keys": "label", "to_onehot": 2},
            ],
        },
        "handlers": [
            {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
             "save_key_metric": True, "key_metric_filename": "model.pt"},
        ],
        "key_metric": {
            "val_mean_dice": {"_target_": "MeanDice", "include_background": False,
                              "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}
        },
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@validate#dataloader",
            "network": "@network",
            "postprocessing": "@validate#postprocessing",
            "key_val_metric": "@validate#key_metric",
            "val_handlers": "@validate#handlers",
        },
    },
    "initialize": ["$custom_nets.errors.install_excepthook()", "$monai.utils.set_determinism(seed=@seed)"],
    "run": ["$@train#trainer.run()"],
    "training": "@run",
}  # fmt: skip


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def write_tiny_bundle(root: Path, cases: int = 6, size: int = 32, network_def: dict | None = None) -> tuple[Path, Path]:
    """A throwaway bundle in the Model Zoo key layout (not under ``bundles/``) and its PNG dataset; 4 train cases."""
    bundle = write_bundle_card(root / "tiny_test_bundle")
    config = dict(TRAIN_JSON, network_def=network_def or TRAIN_JSON["network_def"])
    (bundle / "configs" / "train.json").write_text(json.dumps(config, indent=2))
    (bundle / "configs" / "logging.conf").write_text(LOGGING_CONF)
    data = root / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(cases):
        image, label = _disc_sample(rng, size)
        Image.fromarray((image * 255).astype(np.uint8)).save(data / "images" / f"case_{i:02d}.png")
        Image.fromarray(label).save(data / "labels" / f"case_{i:02d}.png")
    return bundle, data
