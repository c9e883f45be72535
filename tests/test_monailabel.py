"""
The hand-off bundle in the real MONAI Label server (``monaibundle`` sample app) from MONAI Label's own
virtual env, which has MONAI but not ``custom_nets``: ``GET /info/``, ``POST /infer/<model>`` on real
images, a corrected label submitted back (the feedback loop), and a broken bundle refused with its reason.

The env is built once by ``scripts/setup_monailabel_env.sh`` (several minutes the first time, then
reused from ``~/.cache``). ``CUSTOM_NETS_SKIP_MONAILABEL=1`` skips these tests (never set it in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from _export_helpers import HANDOFF_CASES, REPO_ROOT, exported_bundle, handoff_params, run_cli
from custom_nets.deploy import export_handoff

pytestmark = [pytest.mark.monailabel, pytest.mark.slow]

SERVER_START_TIMEOUT_S = 240
BROKEN = "broken_bundle_without_model_ts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def monailabel_python() -> Path:
    if os.environ.get("CUSTOM_NETS_SKIP_MONAILABEL", "") not in ("", "0"):
        pytest.skip("CUSTOM_NETS_SKIP_MONAILABEL is set: not building MONAI Label's env")
    result = run_cli(["bash", str(REPO_ROOT / "scripts" / "setup_monailabel_env.sh")], cwd=REPO_ROOT, timeout=1800)
    assert result.returncode == 0, f"setup_monailabel_env.sh failed:\n{result.stderr[-3000:]}"
    python = Path(result.stdout.strip().splitlines()[-1])
    assert python.is_file(), f"setup_monailabel_env.sh did not print a python: {result.stdout[-500:]}"
    return python


@pytest.fixture(scope="module")
def server(monailabel_python, tmp_path_factory, shared_data):
    """One server with every present hand-off bundle, plus a copy without model.ts; stopped at the end."""
    root = tmp_path_factory.mktemp("monailabel")
    # from the folder the server runs in (not the repository root, where ./custom_nets is importable)
    probe = run_cli([str(monailabel_python), "-c", "import custom_nets"], cwd=root)
    assert probe.returncode != 0, "custom_nets must not be importable in MONAI Label's env"
    sample_apps = sorted(monailabel_python.parents[1].glob("**/sample-apps/monaibundle"))
    assert sample_apps, f"no monaibundle sample app under {monailabel_python.parents[1]}"
    app = Path(shutil.copytree(sample_apps[0], root / "app"))
    studies = root / "studies"
    studies.mkdir()

    cases = [c for c in HANDOFF_CASES if (c.bundle_dir / "configs" / "inference_ts.json").is_file()]
    images = {}
    for case in cases:
        bundle = exported_bundle(case.name, root / "research" / case.name, case.export_configs, case.metadata_patch)
        export_handoff(bundle, app / "model" / case.name, case.export_configs)
        images[case.name] = (case.study_input or case.real_input)(shared_data, studies)
    if not cases:
        pytest.skip("no bundle with configs/inference_ts.json in the repository")
    broken = shutil.copytree(app / "model" / cases[0].name, app / "model" / BROKEN)
    (broken / "models" / "model.ts").unlink()

    port = _free_port()
    log_path = root / "server.log"
    command = [
        str(monailabel_python.parent / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies),
        "--conf", "models", ",".join([c.name for c in cases] + [BROKEN]), "--conf", "sam2", "false",
        "--conf", "zoo_source", "github", "--conf", "preload", "false", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = dict(os.environ, PATH=f"{monailabel_python.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/info/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(2)
        yield {"url": url, "log": log_path, "images": images, "studies": studies}
    finally:  # the server's whole process group (it was started in a session of its own)
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=wait_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.mark.parametrize("case", handoff_params())
def test_info_lists_model_with_labels_and_dimension(case, server):
    models = requests.get(f"{server['url']}/info/", timeout=30).json()["models"]
    assert case.name in models, f"{case.name} not served; models: {sorted(models)}"
    assert models[case.name]["type"] == "segmentation"
    assert models[case.name]["labels"] == case.labels
    assert models[case.name]["dimension"] == case.dimension


@pytest.mark.parametrize("case", handoff_params())
def test_infer_returns_mask_with_input_geometry(case, server, tmp_path):
    image = server["images"][case.name]
    response = requests.post(
        f"{server['url']}/infer/{case.name}",
        params={"image": image.name.split(".")[0], "output": "image"},
        files={"params": (None, json.dumps({"device": "cpu"}))},
        timeout=300,
    )
    assert response.status_code == 200, response.text[:500]
    mask_path = tmp_path / f"mask{case.mask_suffix}"
    mask_path.write_bytes(response.content)
    if case.mask_suffix == ".png":
        mask, picture = np.asarray(Image.open(mask_path)), np.asarray(Image.open(image))
        assert mask.shape == picture.shape[:2]
    else:
        import nibabel as nib

        mask_img, volume = nib.load(str(mask_path)), nib.load(str(image))
        assert mask_img.shape[:3] == volume.shape[:3]
        np.testing.assert_allclose(mask_img.affine, volume.affine, atol=1e-3)
        mask = np.asarray(mask_img.dataobj)
    assert set(np.unique(mask).tolist()) <= case.server_mask_values


@pytest.mark.parametrize("case", handoff_params())
def test_submitted_label_lands_in_datastore(case, server, tmp_path):
    """The annotator's corrected label goes back to the server: the data the next training round uses."""
    image = server["images"][case.name]
    image_id = image.name.split(".")[0]
    label = tmp_path / image.name
    if case.mask_suffix == ".png":
        Image.fromarray(np.zeros(np.asarray(Image.open(image)).shape[:2], np.uint8)).save(label)
    else:
        import nibabel as nib

        volume = nib.load(str(image))
        nib.save(nib.Nifti1Image(np.zeros(volume.shape[:3], np.uint8), volume.affine), str(label))
    with open(label, "rb") as f:
        response = requests.put(
            f"{server['url']}/datastore/label",
            params={"image": image_id, "tag": "final"},
            files={"label": (label.name, f), "params": (None, json.dumps({"label_info": [{"name": n, "idx": i} for n, i in case.labels.items()]}))},
            timeout=60,
        )  # fmt: skip
    assert response.status_code == 200, response.text[:500]
    datastore = requests.get(f"{server['url']}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "final" in datastore["objects"][image_id]["labels"]
    assert (server["studies"] / "labels" / "final" / image.name).is_file()


def test_bundle_without_model_ts_is_refused_with_its_reason(server):
    models = requests.get(f"{server['url']}/info/", timeout=30).json()["models"]
    assert BROKEN not in models
    log = server["log"].read_text()
    assert f"{BROKEN} as neither model.pt nor model.ts exists" in log
