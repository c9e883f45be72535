"""
The research bundle as it is (``configs/train.json``, ``models/model.pt`` and ``model.ts``) in the real
MONAI Label server (``monaibundle`` sample app, MONAI Label's own env) with the checkout on ``PYTHONPATH``
for ``custom_nets``: ``/info/``, ``/infer`` on real images, corrected labels submitted, active learning,
and Train from MONAI Label closing the loop (1 short epoch on the submitted labels writes a new
``model.pt``, which the next ``/infer`` loads). A train request before any label is refused in one line.

One server per bundle (MONAI Label trains on every labelled image of its studies folder, so the
modalities must not share one). ``CUSTOM_NETS_SKIP_MONAILABEL=1`` skips these tests (never in CI).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from _export_helpers import BRATS2013_LAYOUT_CONFIG, REPO_ROOT, brats2013_metadata, check, exported_bundle, lung_ct_slabs, run_cli
from _monailabel_helpers import copy_sample_app, infer, monailabel_python, running_server, server_env, submit_label, train

pytestmark = [pytest.mark.monailabel, pytest.mark.slow]

TRAIN_TIMEOUT_S = 600
# MONAI Label's default split is 80/20 (partition_dataset): 3 labelled images are the fewest that leave
# one for the validation after which model.pt is written
LABELLED = 3


def _hc18_studies(shared_data: Path, studies: Path, labels: Path) -> tuple[list[Path], dict[str, Path]]:
    """5 real HC18 images; the filled HC18 annotations (0/1) of the first 3 as the annotator's labels."""
    source = shared_data / "hc18_subset" / "training_set"
    images = [Path(shutil.copy(p, studies / p.name)) for p in sorted(source.glob("*HC.png"))[:5]]
    corrected = {}
    for image in images[:LABELLED]:
        annotation = np.asarray(Image.open(source / f"{image.stem}_Annotation.png"))
        corrected[image.stem] = labels / image.name
        Image.fromarray((annotation > 0).astype(np.uint8)).save(corrected[image.stem])
    return images, corrected


def _lung_studies(shared_data: Path, studies: Path, labels: Path) -> tuple[list[Path], dict[str, Path]]:
    """4 slabs of 4 slices of the real lung CT (one through the nodule); the nodule masks of the first 3."""
    slabs = lung_ct_slabs(shared_data, studies, starts=[30, 8, 18, 40], labels_folder=labels)
    corrected = {path.name.split(".")[0]: label for path, label in slabs[:LABELLED]}
    for _, label in slabs[LABELLED:]:
        label.unlink()
    return [path for path, _ in slabs], corrected


def _brats_studies(shared_data: Path, studies: Path, labels: Path) -> tuple[list[Path], dict[str, Path]]:
    """
    4 studies of 6 axial slices of the real BraTS 2013 cases (through the tumour of each case, and 20 slices
    up from pat0003's), made from case folders by the documented ``python -m custom_nets brats_studies``
    (FLAIR and T1c stacked in one NIfTI, zero outside the brain mask); the label maps (0-4) of the first 3.
    """
    import nibabel as nib

    cases = studies.parent / "cases"
    slabs = []
    for name, offset in (("brats_2013_pat0003_1", 0), ("brats_2013_pat0005_1", 0), ("brats_2013_pat0006_1", 0), ("brats_2013_pat0003_1", 20)):
        source = shared_data / "brats2015" / name
        tumour = np.asarray(nib.load(source / "OTMultiClass.nii.gz").dataobj) > 0
        k0 = int(np.argmax(tumour.reshape(-1, tumour.shape[-1]).sum(0))) - 3 + offset
        case = cases / f"{name}_slab{k0:03d}"
        case.mkdir(parents=True)
        for file in ("Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd", "brainmask", "OTMultiClass"):
            volume = nib.load(source / f"{file}.nii.gz")
            affine = volume.affine.copy()
            affine[:3, 3] += affine[:3, 2] * k0  # origin of the first kept slice
            nib.save(nib.Nifti1Image(np.asarray(volume.dataobj)[..., k0 : k0 + 6], affine, volume.header), case / f"{file}.nii.gz")
        slabs.append(case)
    check(run_cli([sys.executable, "-m", "custom_nets", "brats_studies", str(cases), str(studies), "--layout", "brats2013"], cwd=studies.parent))
    images = [studies / f"{case.name}.nii.gz" for case in slabs]
    corrected = {case.name: Path(shutil.copy(case / "OTMultiClass.nii.gz", labels / f"{case.name}.nii.gz")) for case in slabs[:LABELLED]}
    return images, corrected


@dataclass(frozen=True)
class ResearchCase:
    name: str
    labels: dict[str, int]  # as /info reports them
    mask_suffix: str
    studies: Callable[[Path, Path, Path], tuple[list[Path], dict[str, Path]]]  # (shared_data, studies, labels)
    mask_values: set[int] = field(default_factory=lambda: {0, 1})  # in the mask /infer returns
    # a data-layout override merged into the served copy's configs, and the metadata of that layout
    layout: str | None = None
    metadata_patch: Callable[[dict], None] | None = None


RESEARCH_CASES = [
    ResearchCase("fetal_head_us_segmentation", {"fetal head": 1}, ".png", _hc18_studies),
    ResearchCase("lung_nodule_ct_segmentation", {"nodule": 1}, ".nii.gz", _lung_studies),
    # the real sample has FLAIR and T1c only: the bundle is served with the BraTS 2013 layout (2 sequences)
    ResearchCase("brain_tumor_mri_segmentation", {"necrotic core": 1, "edema": 2, "enhancing tumour": 4}, ".nii.gz",
                 _brats_studies, mask_values={0, 1, 2, 4}, layout=BRATS2013_LAYOUT_CONFIG, metadata_patch=brats2013_metadata),
]  # fmt: skip


def _merge_layout(bundle: Path, layout: str) -> None:
    """The served copy's ``inference.json`` and ``train.json`` with ``layout`` merged in, as docs/monailabel_slicer.md
    tells users to do for a model trained with a layout override (MONAI Label reads these two files only)."""
    from monai.bundle import ConfigParser

    for name in ("inference.json", "train.json"):
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / name), str(bundle / layout)])
        ConfigParser.export_config_file(parser.config, str(bundle / "configs" / name), indent=4)


def _image_id(path: Path) -> str:
    return path.name.split(".")[0]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=RESEARCH_CASES, ids=lambda c: c.name)
def research(request, tmp_path_factory, shared_data):
    """A server with one research bundle (model.pt and model.ts of a fresh network) and its real studies."""
    case, python = request.param, monailabel_python()
    root = tmp_path_factory.mktemp(case.name)
    app = copy_sample_app(python, root / "app")
    layout = (case.layout,) if case.layout else ()
    bundle = exported_bundle(case.name, app / "model" / case.name, layout, case.metadata_patch)
    if case.layout:
        _merge_layout(bundle, case.layout)
    studies, labels = root / "studies", root / "corrected"
    studies.mkdir()
    labels.mkdir()
    images, corrected = case.studies(shared_data, studies, labels)
    log = root / "server.log"
    with running_server(python, app, studies, [case.name], log, pythonpath=REPO_ROOT) as url:
        yield {"case": case, "url": url, "log": log, "bundle": bundle, "images": images, "corrected": corrected}


@pytest.fixture(scope="module")
def refused_train(research):
    """A train request while no image has a label (before ``labelled`` submits any)."""
    return train(research["url"], research["case"].name, TRAIN_TIMEOUT_S, max_epochs=1, device="cpu", multi_gpu=False)


@pytest.fixture(scope="module")
def labelled(research, refused_train):
    """The annotator's corrected labels, submitted as Slicer's *Submit Label* does."""
    for image_id, label in research["corrected"].items():
        response = submit_label(research["url"], image_id, label, research["case"].labels)
        assert response.status_code == 200, response.text[:500]
    return set(research["corrected"])


@pytest.fixture(scope="module")
def trained(research, labelled):
    """One short epoch from MONAI Label on the labelled images: the task and model.pt before and after."""
    model_pt = research["bundle"] / "models" / "model.pt"
    before = _md5(model_pt)
    # the server holds the network of the current model.pt (as after an annotator's Run), to see it reloaded
    assert infer(research["url"], research["case"].name, _image_id(research["images"][-1])).status_code == 200
    task = train(research["url"], research["case"].name, TRAIN_TIMEOUT_S, max_epochs=1, device="cpu", multi_gpu=False)
    return {"task": task, "before": before, "model_pt": model_pt}


def test_research_server_imports_custom_nets_from_the_checkout(tmp_path):
    """The research server's ``PYTHONPATH`` is the checkout: its current ``custom_nets``, never a stale copy."""
    python = monailabel_python()
    probe = run_cli([str(python), "-c", "import custom_nets, pydicom; print(custom_nets.__file__, pydicom.__version__)"],
                    cwd=tmp_path, env=server_env(python, REPO_ROOT))  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    module_file, pydicom_version = probe.stdout.split()
    assert Path(module_file).resolve().is_relative_to(REPO_ROOT)
    assert int(pydicom_version.split(".")[0]) < 3, "MONAI Label 0.8.5 needs pydicom < 3"


def test_info_lists_model_and_trainer(research):
    case, info = research["case"], requests.get(f"{research['url']}/info/", timeout=30).json()
    assert info["models"][case.name]["labels"] == case.labels
    assert info["models"][case.name]["dimension"] == 2
    assert case.name in info["trainers"], f"no trainer for {case.name}; server log:\n{research['log'].read_text()[-3000:]}"
    assert {"random", "first"} <= set(info["strategies"])


def test_infer_returns_mask_in_input_format_and_geometry(research, tmp_path):
    image = research["images"][-1]
    response = infer(research["url"], research["case"].name, _image_id(image))
    assert response.status_code == 200, response.text[:500]
    mask_path = tmp_path / f"mask{research['case'].mask_suffix}"
    mask_path.write_bytes(response.content)
    if mask_path.suffix == ".png":
        with Image.open(mask_path) as mask_image:
            assert mask_image.mode == "L", f"PNG mask mode {mask_image.mode}, want 8-bit gray"
            mask = np.asarray(mask_image)
        assert mask.dtype == np.uint8 and mask.shape == np.asarray(Image.open(image)).shape[:2]
    else:
        import nibabel as nib

        mask_img, volume = nib.load(str(mask_path)), nib.load(str(image))
        assert mask_img.shape[:3] == volume.shape[:3]
        np.testing.assert_allclose(mask_img.affine, volume.affine, atol=1e-3)
        mask = np.asarray(mask_img.dataobj)
    assert set(np.unique(mask).tolist()) <= research["case"].mask_values


def test_train_without_labels_is_refused_in_one_line(research, refused_train):
    assert refused_train["status"] == "ERROR"
    assert any(line.startswith("ERROR: no training cases") for line in refused_train["details"]), refused_train["details"][-10:]
    assert "Traceback" not in research["log"].read_text()


def test_active_learning_returns_an_unlabelled_image(research, labelled):
    unlabelled = {_image_id(p) for p in research["images"]} - labelled
    for strategy in ("first", "random"):
        response = requests.post(f"{research['url']}/activelearning/{strategy}", json={}, timeout=30)
        assert response.status_code == 200, response.text[:500]
        assert response.json()["id"] in unlabelled, f"{strategy}: {response.json()['id']} is not unlabelled"


def test_train_writes_a_new_model_that_the_next_infer_uses(research, trained):
    task = trained["task"]
    assert task["status"] == "DONE", "\n".join(task.get("details", [])[-30:])
    assert _md5(trained["model_pt"]) != trained["before"], "training from MONAI Label did not write a new model.pt"
    torch.load(trained["model_pt"], map_location="cpu", weights_only=True)
    response = infer(research["url"], research["case"].name, _image_id(research["images"][-1]))
    assert response.status_code == 200, response.text[:500]
    assert "Reload model from cache" in research["log"].read_text(), "the next /infer did not load the new model.pt"
