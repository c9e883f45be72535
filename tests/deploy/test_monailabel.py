"""
The hand-off bundle in the real MONAI Label server (``monaibundle`` sample app) from MONAI Label's own
virtual env, which has MONAI but not ``custom_nets``: ``GET /info/``, ``POST /infer/<model>`` on real
images, a corrected label submitted back (the feedback loop), and a broken bundle refused with its reason.

The env is built once by ``scripts/setup_monailabel_env.sh`` (several minutes the first time, then
reused from ``~/.cache``). ``CUSTOM_NETS_SKIP_MONAILABEL=1`` skips these tests (never set it in CI).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from _export_helpers import HANDOFF_CASES, exported_bundle, handoff_params, run_cli
from _monailabel_helpers import copy_sample_app, infer, monailabel_python, running_server, server_env, submit_label
from custom_nets.deploy import export_handoff

pytestmark = [pytest.mark.monailabel, pytest.mark.slow]

BROKEN = "broken_bundle_without_model_ts"


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_data):
    """One server with every present hand-off bundle, plus a copy without model.ts; stopped at the end."""
    python = monailabel_python()
    root = tmp_path_factory.mktemp("monailabel")
    # as the server runs: from its folder (not the repository root, where ./custom_nets is importable), no PYTHONPATH
    probe = run_cli([str(python), "-c", "import custom_nets"], cwd=root, env=server_env(python))
    assert probe.returncode != 0, "custom_nets must not be importable in MONAI Label's env"
    app = copy_sample_app(python, root / "app")
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

    log_path = root / "server.log"
    with running_server(python, app, studies, [c.name for c in cases] + [BROKEN], log_path) as url:
        yield {"url": url, "log": log_path, "images": images, "studies": studies}


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
    response = infer(server["url"], case.name, image.name.split(".")[0])
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
    response = submit_label(server["url"], image_id, label, case.labels)
    assert response.status_code == 200, response.text[:500]
    datastore = requests.get(f"{server['url']}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "final" in datastore["objects"][image_id]["labels"]
    assert (server["studies"] / "labels" / "final" / image.name).is_file()


def test_bundle_without_model_ts_is_refused_with_its_reason(server):
    models = requests.get(f"{server['url']}/info/", timeout=30).json()["models"]
    assert BROKEN not in models
    log = server["log"].read_text()
    assert f"{BROKEN} as neither model.pt nor model.ts exists" in log
