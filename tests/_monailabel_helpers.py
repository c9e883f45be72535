"""
Shared by the MONAI Label tests: MONAI Label's own env (built once by ``scripts/setup_monailabel_env.sh``),
a copy of its ``monaibundle`` sample app, a real server on 127.0.0.1 (started in a session of its own and
stopped with its whole process group) and the REST calls the tests make (infer, submit a label, train).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from _export_helpers import REPO_ROOT, run_cli

SERVER_START_TIMEOUT_S = 240


@functools.cache
def monailabel_python() -> Path:
    """The python of MONAI Label's env (built on first use; skipped with ``CUSTOM_NETS_SKIP_MONAILABEL=1``)."""
    if os.environ.get("CUSTOM_NETS_SKIP_MONAILABEL", "") not in ("", "0"):
        pytest.skip("CUSTOM_NETS_SKIP_MONAILABEL is set: not building MONAI Label's env")
    result = run_cli(["bash", str(REPO_ROOT / "scripts" / "setup_monailabel_env.sh")], cwd=REPO_ROOT, timeout=1800)
    assert result.returncode == 0, f"setup_monailabel_env.sh failed:\n{result.stderr[-3000:]}"
    python = Path(result.stdout.strip().splitlines()[-1])
    assert python.is_file(), f"setup_monailabel_env.sh did not print a python: {result.stdout[-500:]}"
    return python


def copy_sample_app(python: Path, dest: Path) -> Path:
    """A copy of MONAI Label's ``monaibundle`` sample app (bundles go to ``<dest>/model/<name>``)."""
    sample_apps = sorted(python.parents[1].glob("**/sample-apps/monaibundle"))
    assert sample_apps, f"no monaibundle sample app under {python.parents[1]}"
    app = Path(shutil.copytree(sample_apps[0], dest))
    (app / "model").mkdir(exist_ok=True)
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(python: Path, pythonpath: Path | None = None) -> dict[str, str]:
    """The environment of a server from ``python``'s env: its ``bin`` first on ``PATH``, and ``pythonpath``
    as the only ``PYTHONPATH`` (none when ``None``: the caller's own ``PYTHONPATH`` is never passed on)."""
    env = dict(os.environ, PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


@contextlib.contextmanager
def running_server(
    python: Path, app: Path, studies: Path, models: list[str], log_path: Path, pythonpath: Path | None = None
) -> Iterator[str]:
    """
    ``monailabel start_server`` for ``models`` of ``app`` on ``studies``; yields its URL once ``/info/`` answers.
    ``pythonpath`` is the only ``PYTHONPATH`` the server gets (the research bundles: the checkout, for
    ``custom_nets``); without it the server runs with none, as at a site without our code.
    """
    command = [
        str(python.parent / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies),
        "--conf", "models", ",".join(models), "--conf", "sam2", "false", "--conf", "zoo_source", "github",
        "--conf", "preload", "false", "--host", "127.0.0.1", "--port", str(port := _free_port()),
    ]  # fmt: skip
    env = server_env(python, pythonpath)
    with open(log_path, "w") as log:  # from the log's folder: not the repository root, where ./custom_nets is importable
        process = subprocess.Popen(command, cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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
        yield url
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


def infer(url: str, model: str, image_id: str) -> requests.Response:
    """``POST /infer/<model>`` on CPU, the mask file as the answer."""
    return requests.post(
        f"{url}/infer/{model}",
        params={"image": image_id, "output": "image"},
        files={"params": (None, json.dumps({"device": "cpu"}))},
        timeout=300,
    )


def submit_label(url: str, image_id: str, label: Path, labels: dict[str, int]) -> requests.Response:
    """``PUT /datastore/label`` with tag ``final``: what Slicer's *Submit Label* sends."""
    with open(label, "rb") as f:
        return requests.put(
            f"{url}/datastore/label",
            params={"image": image_id, "tag": "final"},
            files={"label": (label.name, f), "params": (None, json.dumps({"label_info": [{"name": n, "idx": i} for n, i in labels.items()]}))},
            timeout=60,
        )  # fmt: skip


def train(url: str, model: str, timeout_s: float, **request) -> dict:
    """``POST /train/<model>`` (MONAI Label runs it in a subprocess, as for Slicer's *Train*); waits for the
    task to end and returns it (``status`` ``DONE`` or ``ERROR``, ``details``: the task's output lines)."""
    response = requests.post(f"{url}/train/{model}", json=request, timeout=60)
    assert response.status_code == 200, response.text[:500]
    task_id = response.json()["id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(5)
        task = requests.get(f"{url}/train/", params={"check_if_running": "false"}, timeout=30).json()
        if task.get("id") == task_id and task.get("status") not in ("SUBMITTED", "RUNNING"):
            return task
    requests.delete(f"{url}/train/", timeout=30)
    pytest.fail(f"training {model} did not end within {timeout_s} s")
