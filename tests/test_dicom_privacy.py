"""
The lung CT bundle (and, for single ultrasound frames, the fetal head bundle) never copies a patient's name, id or birth date from DICOM headers into what it
writes: output names and files, console output, the log file, or the MLflow store.

A small DICOM series (32 x 32 x 8) is written with ``PatientName=Doe^Jane``, ``PatientID=PID-12345``,
``PatientBirthDate=19700101`` in a folder the user named ``series_01``; with the real sample data, the
real TCIA series (pseudonymised ``ACRIN-FLT-Breast_001``) joins it under the name ``series_02``. The
bundle's real ``python -m monai.bundle`` CLI then runs inference (with the bundle's ``logging.conf``
plus a DEBUG log file) and an evaluation on the same series with ``--tracking mlflow`` (MONAI's sqlite
store under the output folder), and every name, byte, log line and MLflow record is searched.
"""

from __future__ import annotations

import configparser
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from _export_helpers import REPO_ROOT, copy_bundle, write_initial_checkpoint
from custom_nets.data.synthetic_dicom import write_dicom_series
from image_files import write_dicom_2d

BUNDLE = "lung_nodule_ct_segmentation"
IDENTIFIERS = {"PatientName": "Doe^Jane", "PatientID": "PID-12345", "PatientBirthDate": "19700101"}
# several spellings: the DICOM values, their parts, another date format, and ITK's keys of the patient tags
FORBIDDEN = ("Doe^Jane", "Doe", "Jane", "PID-12345", "19700101", "1970-01-01", "0010|0010", "0010|0020", "0010|0030")
REAL_SERIES_IDENTIFIERS = ("ACRIN-FLT-Breast_001", "Breast_001")  # the real series' PatientName and PatientID
TINY = ["--image_size", "[32,32]", "--num_workers", "0"]
NODULE_LPS_MM = (16.0, 16.0, 10.0, 6.0)  # x, y, z centre and diameter of the blob written into the series


def _write_identified_series(folder: Path) -> list[str]:
    """A CT series with a soft-tissue blob at :data:`NODULE_LPS_MM`, its slices carrying :data:`IDENTIFIERS`."""
    import pydicom

    ii, jj, kk = np.meshgrid(np.arange(32), np.arange(32), np.arange(8), indexing="ij")
    blob = (ii - 16) ** 2 + (jj - 16) ** 2 + ((kk - 4) * 2.5) ** 2 <= 9
    hu = np.where(blob, 40, -800) + np.random.default_rng(0).normal(0, 10, blob.shape)
    files = write_dicom_series(hu.astype(np.int16), folder, spacing=(1.0, 1.0, 2.5), patient_name=IDENTIFIERS["PatientName"])
    for file in files:
        ds = pydicom.dcmread(file)
        ds.PatientID, ds.PatientBirthDate = IDENTIFIERS["PatientID"], IDENTIFIERS["PatientBirthDate"]
        ds.save_as(file)
    return files


def _leaks(text: str | bytes, forbidden: tuple[str, ...]) -> list[str]:
    if isinstance(text, bytes):
        return [word for word in forbidden if word.encode() in text]
    return [word for word in forbidden if word in text]


def _file_leaks(root: Path, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """Every file under ``root``: its relative name, its bytes, and the bytes inside ``.gz`` files."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        hits = _leaks(name, forbidden)
        if path.is_file():
            data = path.read_bytes()
            hits += _leaks(data, forbidden)
            if path.name.endswith(".gz"):
                hits += _leaks(gzip.decompress(data), forbidden)
        if hits:
            found[name] = sorted(set(hits))
    return found


def _logging_conf_with_file(bundle: Path, log_file: Path) -> Path:
    """The bundle's ``logging.conf`` plus a DEBUG file handler on the root logger."""
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(bundle / "configs" / "logging.conf")
    conf["handlers"]["keys"] += ",fileHandler"
    conf["logger_root"]["handlers"] += ",fileHandler"
    conf["logger_root"]["level"] = "DEBUG"
    conf["handler_fileHandler"] = {"class": "FileHandler", "level": "DEBUG", "formatter": "fullFormatter", "args": repr((str(log_file), "w"))}
    path = log_file.with_suffix(".conf")
    with open(path, "w") as f:
        conf.write(f)
    return path


def _bundle_cli(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MONAI's sqlite default under output_dir
    return subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, request):
    """
    A bundle copy with a freshly initialised checkpoint, an input folder with the identified series (and
    the real one when the sample data is there), and the strings that must not appear anywhere.
    """
    root = tmp_path_factory.mktemp("dicom_privacy")
    bundle = copy_bundle(BUNDLE, root / "bundle")
    write_initial_checkpoint(bundle)
    inputs = root / "inputs"
    _write_identified_series(inputs / "series_01")
    cases, forbidden = ["series_01"], FORBIDDEN
    try:
        shared_data = request.getfixturevalue("shared_data")
        os.symlink(shared_data / "lung_ct" / "acrin_flt_breast_001" / "dicom", inputs / "series_02")
        cases, forbidden = [*cases, "series_02"], FORBIDDEN + REAL_SERIES_IDENTIFIERS
    except pytest.skip.Exception:
        pass  # no real data here: the synthetic series still runs
    return SimpleNamespace(root=root, bundle=bundle, inputs=inputs, cases=cases, forbidden=forbidden)


@pytest.fixture(scope="module")
def inference(workspace):
    root, bundle, inputs = workspace.root, workspace.bundle, workspace.inputs
    outputs, log_file = root / "inference", root / "logs" / "inference.log"
    log_file.parent.mkdir()
    result = _bundle_cli("run", "inference", "--config_file", bundle / "configs" / "inference.json", "--bundle_root", bundle,
                         "--input_dir", inputs, "--output_dir", outputs, "--logging_file", _logging_conf_with_file(bundle, log_file), *TINY)  # fmt: skip
    return result, outputs, log_file


@pytest.fixture(scope="module")
def evaluation(workspace):
    """``run evaluating`` on the synthetic series (its nodule as annotation), tracked in MLflow."""
    root, bundle, inputs = workspace.root, workspace.bundle, workspace.inputs
    outputs = root / "evaluation"
    case = {"image": str(inputs / "series_01"), "nodules": [list(NODULE_LPS_MM)]}
    override = root / "dicom_test_set.json"
    override.write_text(json.dumps({"validate#dataset#data": [case]}))
    configs = repr([str(bundle / "configs" / name) for name in ("train.json", "evaluate.json")] + [str(override)])
    result = _bundle_cli("run", "evaluating", "--config_file", configs, "--bundle_root", bundle, "--output_dir", outputs, "--tracking", "mlflow", *TINY)
    return result, outputs


def test_the_test_series_carries_the_identifiers(tmp_path):
    """Control: the identifiers are really in the input headers, so their absence downstream means something."""
    import pydicom

    files = _write_identified_series(tmp_path / "series")
    ds = pydicom.dcmread(files[0])
    assert {tag: str(ds.get(tag)) for tag in IDENTIFIERS} == IDENTIFIERS


def test_reading_the_series_keeps_no_identifier_in_its_metadata(tmp_path):
    from custom_nets.data.volume_io import read_volume

    _write_identified_series(tmp_path / "series_01")
    image = read_volume(tmp_path / "series_01")
    assert image.shape == (1, 32, 32, 8)
    assert image.meta["case"] == "series_01"
    assert _leaks(repr(dict(image.meta)), FORBIDDEN) == []


@pytest.mark.slow
def test_inference_on_the_series_succeeds(inference, workspace):
    result, outputs, _ = inference
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {"nodules.csv", "results.csv", "results.journal.jsonl", "results.lock", *(f"{case}_seg.nii.gz" for case in workspace.cases)}
    assert {p.name for p in outputs.iterdir()} == expected


@pytest.mark.slow
def test_inference_output_names_and_bytes_hold_no_identifier(inference, workspace):
    _, outputs, _ = inference
    assert _file_leaks(outputs, workspace.forbidden) == {}


@pytest.mark.slow
def test_inference_console_output_holds_no_identifier(inference, workspace):
    result, _, _ = inference
    assert "series_01" in result.stdout  # the run did log its cases
    assert _leaks(result.stdout + result.stderr, workspace.forbidden) == []


@pytest.mark.slow
def test_inference_log_file_holds_no_identifier(inference, workspace):
    _, _, log_file = inference
    text = log_file.read_text()
    assert "series_01" in text
    assert _leaks(text, workspace.forbidden) == []


@pytest.mark.slow
def test_evaluation_with_mlflow_on_the_series_succeeds(evaluation):
    result, outputs = evaluation
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (outputs / "mlruns.db").is_file()
    assert "series_01" in (outputs / "metrics_per_case.csv").read_text()


@pytest.mark.slow
def test_evaluation_mlflow_runs_hold_no_identifier(evaluation):
    import mlflow
    from monai.utils import path_to_sqlite_uri

    _, outputs = evaluation
    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(str(outputs / "mlruns.db")))
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert runs and any(run.data.metrics for run in runs)  # the evaluation was recorded

    def artifact_paths(run_id: str, path: str | None = None) -> list[str]:
        found = []
        for item in client.list_artifacts(run_id, path):
            found += artifact_paths(run_id, item.path) if item.is_dir else [item.path]
        return found

    records = [e.name for e in experiments]
    for run in runs:
        records += [run.info.run_name or "", json.dumps(run.data.params), json.dumps(run.data.tags), *run.data.metrics]
        records += [str(run.inputs), *artifact_paths(run.info.run_id)]
    assert _leaks("\n".join(records), FORBIDDEN) == []


@pytest.mark.slow
def test_evaluation_store_outputs_and_console_hold_no_identifier(evaluation):
    """The sqlite file, MLflow's artifact folder, the metric tables and the console, as bytes."""
    result, outputs = evaluation
    assert _file_leaks(outputs, FORBIDDEN) == {}
    assert _leaks(result.stdout + result.stderr, FORBIDDEN) == []


@pytest.mark.slow
def test_fetal_head_inference_on_an_ultrasound_dicom_writes_no_identifier(tmp_path):
    """The 2D bundle: mask (a new DICOM object), overlay, CSV, console and log hold none of the patient's tags."""
    import pydicom

    bundle = copy_bundle("fetal_head_us_segmentation", tmp_path / "bundle")
    write_initial_checkpoint(bundle)
    rng = np.random.default_rng(0)
    (tmp_path / "inputs").mkdir()
    scan = write_dicom_2d(tmp_path / "inputs" / "frame_01.dcm", rng.integers(0, 255, (64, 96)), pixel_spacing=(0.2, 0.2), patient_name=IDENTIFIERS["PatientName"])
    ds = pydicom.dcmread(scan)
    ds.PatientID, ds.PatientBirthDate = IDENTIFIERS["PatientID"], IDENTIFIERS["PatientBirthDate"]
    ds.save_as(scan)
    outputs, log_file = tmp_path / "outputs", tmp_path / "logs" / "inference.log"
    log_file.parent.mkdir()
    result = _bundle_cli("run", "inference", "--config_file", bundle / "configs" / "inference.json", "--bundle_root", bundle,
                         "--input_dir", scan.parent, "--output_dir", outputs, "--save_overlay", "true", "--image_size", "64",
                         "--logging_file", _logging_conf_with_file(bundle, log_file))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (outputs / "frame_01_mask.dcm").is_file() and (outputs / "frame_01_overlay.png").is_file()
    assert _file_leaks(outputs, FORBIDDEN) == {}
    assert _leaks(result.stdout + result.stderr, FORBIDDEN) == [] and _leaks(log_file.read_text(), FORBIDDEN) == []
    assert log_file.read_text().strip()  # the log was written, so the search above searched something
