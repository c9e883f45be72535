"""
Shared by the export and MONAI Label tests: which bundles can be handed off, their sample inputs, a
freshly initialised checkpoint exported by the real ``monai.bundle ckpt_export`` CLI, and a Python
environment in which ``custom_nets`` cannot be imported.

A new bundle joins these tests by adding a :class:`HandoffCase` to :data:`HANDOFF_CASES` (and its
``configs/inference_ts.json``); cases whose bundle folder is not there yet are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
# bundle outputs of earlier runs that a copy must not drag along (large, and not part of the bundle)
_NOT_COPIED = shutil.ignore_patterns("models", "eval", "data", "mlruns", "__pycache__", "*.pyc")

_BLOCKER = '''"""Installed by a test: make `import {package}` fail, as in an install without it."""
import sys


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "{package}" or name.startswith("{package}."):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
'''


def _synthetic_ultrasound(folder: Path) -> Path:
    """A small grayscale picture with a bright elliptical ring in speckle (not square, odd size)."""
    rng = np.random.default_rng(0)
    h, w = 150, 212
    yy, xx = np.mgrid[:h, :w]
    r = np.sqrt(((yy - 70) / 50.0) ** 2 + ((xx - 110) / 80.0) ** 2)
    image = 40 + 150 * np.exp(-(((r - 1.0) / 0.06) ** 2)) + rng.rayleigh(20, (h, w))
    path = folder / "synthetic_001_HC.png"
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    return path


def _real_hc18(shared_data: Path, folder: Path) -> Path:
    source = shared_data / "hc18_subset" / "training_set" / "001_HC.png"
    return Path(shutil.copy(source, folder / source.name))


def _synthetic_ct(folder: Path) -> Path:
    """A small CT-like NIfTI (int16 HU, 1 x 0.8 x 2.5 mm): air around a body with a soft-tissue blob."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    shape = (72, 60, 3)
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    body = ((ii - 36) / 30.0) ** 2 + ((jj - 30) / 26.0) ** 2 < 1
    blob = (ii - 40) ** 2 + (jj - 25) ** 2 + ((kk - 1) * 3) ** 2 < 36
    hu = np.where(body, -800, -1000) + np.where(blob, 840, 0) + rng.normal(0, 20, shape)
    path = folder / "synthetic_ct.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([1.0, 0.8, 2.5, 1.0])), str(path))
    return path


def _real_lung_ct(shared_data: Path, folder: Path) -> Path:
    """4 axial slices through the nodule of the real pyradiomics lung CT, as NIfTI (full 512 x 512 slices)."""
    return lung_ct_slabs(shared_data, folder, starts=None)[0][0]


def lung_ct_slabs(
    shared_data: Path, folder: Path, starts: list[int] | None, labels_folder: Path | None = None
) -> list[tuple[Path, Path | None]]:
    """
    Slabs of 4 axial slices of the real pyradiomics lung CT as NIfTI (int16, the CT's affine moved to the
    first kept slice), starting at ``starts`` (``None``: one slab centred on the nodule); with
    ``labels_folder``, each slab's nodule mask (uint8 0/1, same name and geometry) is written there too.
    """
    import nibabel as nib
    from monai.transforms import LoadImage

    image = LoadImage(image_only=True)(str(shared_data / "lung_ct" / "lung1_image.nrrd"))
    label = np.asarray(LoadImage(image_only=True)(str(shared_data / "lung_ct" / "lung1_label.nrrd")))
    if starts is None:
        k = int(np.argmax(label.reshape(-1, label.shape[-1]).sum(0)))  # slice with most nodule voxels
        starts, names = [min(max(k - 2, 0), image.shape[-1] - 4)], ["lung1_nodule_slices"]
    else:
        names = [f"lung1_slab{k0:02d}" for k0 in starts]
    slabs = []
    for k0, name in zip(starts, names):
        affine = np.asarray(image.affine, dtype=np.float64).copy()
        affine[:3, 3] += affine[:3, 2] * k0  # origin of the first kept slice
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(image)[..., k0 : k0 + 4].astype(np.int16), affine), str(path))
        label_path = None
        if labels_folder is not None:
            label_path = labels_folder / path.name
            nib.save(nib.Nifti1Image((label[..., k0 : k0 + 4] > 0).astype(np.uint8), affine), str(label_path))
        slabs.append((path, label_path))
    return slabs


def _synthetic_brats_case(folder: Path) -> Path:
    """One synthetic BraTS-2020-layout case folder (4 sequences, 48 x 40 x 5)."""
    from custom_nets.data import synthetic_brats

    synthetic_brats.generate(str(folder), num_cases=1, shape=(48, 40, 5))
    (folder / "name_mapping.csv").unlink(missing_ok=True)
    return folder / "BraTS20_Training_001"


def _real_brats2013_study(shared_data: Path, folder: Path) -> Path:
    """FLAIR and T1c of a real BraTS 2013 case as one 2-channel NIfTI (channels last, as MONAI Label studies
    are single files), cut to 6 axial slices through the tumour to keep CPU inference short."""
    import nibabel as nib

    case = shared_data / "brats2015" / "brats_2013_pat0003_1"
    volumes = [nib.load(str(case / f"{s}_subtrMeanDivStd.nii.gz")) for s in ("Flair", "T1c")]
    tumour = np.asarray(nib.load(str(case / "OTMultiClass.nii.gz")).dataobj) > 0
    k = int(np.argmax(tumour.reshape(-1, tumour.shape[-1]).sum(0)))
    k0 = min(max(k - 3, 0), tumour.shape[-1] - 6)
    data = np.stack([np.asarray(v.dataobj, dtype=np.float32)[..., k0 : k0 + 6] for v in volumes], axis=-1)
    affine = volumes[0].affine.copy()
    affine[:3, 3] += affine[:3, 2] * k0
    path = folder / f"{case.name}_slab.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


BRATS2013_LAYOUT_CONFIG = "configs/layout_brats2013.json"


def brats2013_metadata(metadata: dict) -> None:
    """The input of a model trained on the BraTS 2013 layout (``configs/layout_brats2013.json``): FLAIR, T1c."""
    image = metadata["network_data_format"]["inputs"]["image"]
    image["num_channels"], image["channel_def"] = 2, {"0": "FLAIR", "1": "T1c"}


@dataclass(frozen=True)
class HandoffCase:
    """One bundle as the hand-off tests see it."""

    name: str
    dimension: int  # what MONAI Label must report
    labels: dict[str, int]  # foreground labels MONAI Label must report (background left out, as it does)
    mask_suffix: str  # the TorchScript-only inference writes `<input stem><mask_postfix><mask_suffix>`
    synthetic_input: Callable[[Path], Path]
    real_input: Callable[[Path, Path], Path] | None  # (shared_data, folder) -> input for the bundle CLI
    onnx_input_shape: tuple[int, ...]  # the fixed shape the preprocessing feeds the network
    mask_values: set[int] = field(default_factory=lambda: {0, 255})  # in the written mask file
    mask_postfix: str = "_mask"
    server_mask_values: set[int] = field(default_factory=lambda: {0, 1})  # in masks MONAI Label returns
    # MONAI Label: one file per study (default: real_input), and how the served model was trained/exported
    study_input: Callable[[Path, Path], Path] | None = None
    export_configs: tuple[str, ...] = ()
    metadata_patch: Callable[[dict], None] | None = None

    @property
    def bundle_dir(self) -> Path:
        return BUNDLES_DIR / self.name


HANDOFF_CASES = [
    HandoffCase(
        name="fetal_head_us_segmentation",
        dimension=2,
        labels={"fetal head": 1},
        mask_suffix=".png",
        synthetic_input=_synthetic_ultrasound,
        real_input=_real_hc18,
        onnx_input_shape=(1, 1, 256, 256),
    ),
    # slice-wise 2D network on CT volumes: MONAI Label reports dimension 2 (from the network's input shape)
    HandoffCase(
        name="lung_nodule_ct_segmentation",
        dimension=2,
        labels={"nodule": 1},
        mask_suffix=".nii.gz",
        synthetic_input=_synthetic_ct,
        real_input=_real_lung_ct,
        onnx_input_shape=(1, 1, 512, 512),
        mask_values={0, 1},
        mask_postfix="_seg",
    ),
    # slice-wise on MRI; outputs TC/WT/ET regions, written as a BraTS label map (0, 1, 2, 4). The real
    # sample has FLAIR and T1c only, so the bundle CLI runs on synthetic 4-sequence cases and MONAI Label
    # serves a model exported for the BraTS 2013 layout (2 sequences). MONAI Label names the labels from
    # the output channel_def, which names the label map's values
    HandoffCase(
        name="brain_tumor_mri_segmentation",
        dimension=2,
        labels={"necrotic core": 1, "edema": 2, "enhancing tumour": 4},
        mask_suffix=".nii.gz",
        synthetic_input=_synthetic_brats_case,
        real_input=None,
        onnx_input_shape=(1, 4, 256, 256),
        mask_values={0, 1, 2, 4},
        mask_postfix="_seg",
        server_mask_values={0, 1, 2, 4},
        study_input=_real_brats2013_study,
        export_configs=(BRATS2013_LAYOUT_CONFIG,),
        metadata_patch=brats2013_metadata,
    ),
]


def bundle_names() -> list[str]:
    """Every bundle folder of the repository with an inference config and metadata."""
    return sorted(
        p.name for p in BUNDLES_DIR.iterdir()
        if (p / "configs" / "inference.json").is_file() and (p / "configs" / "metadata.json").is_file()
    )  # fmt: skip


def handoff_params() -> list:
    """``pytest.param`` per case; skipped (with why) while the bundle or its ``inference_ts.json`` is missing."""
    params = []
    for case in HANDOFF_CASES:
        missing = [p for p in ("configs/inference.json", "configs/inference_ts.json") if not (case.bundle_dir / p).is_file()]
        marks = pytest.mark.skip(reason=f"{case.name}: {', '.join(missing)} not in the repository yet") if missing else ()
        params.append(pytest.param(case, id=case.name, marks=marks))
    return params


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command, text output captured (the caller asserts on the return code and the messages)."""
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stderr[-3000:]}"
    return result


def env_without_custom_nets(folder: Path) -> dict[str, str]:
    """Environment variables for a Python in which ``import custom_nets`` raises ``ModuleNotFoundError``."""
    return env_without(folder, "custom_nets")


def env_without(folder: Path, package: str) -> dict[str, str]:
    """Environment variables for a Python in which ``import <package>`` raises ``ModuleNotFoundError``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_BLOCKER.format(package=package))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def copy_bundle(name: str, dest: Path) -> Path:
    """Bundle ``name``'s configs, docs and licence in ``dest`` (no models or outputs of earlier runs)."""
    shutil.copytree(BUNDLES_DIR / name, dest, ignore=_NOT_COPIED)
    (dest / "models").mkdir(exist_ok=True)
    return dest


def write_initial_checkpoint(bundle: Path, seed: int = 0, extra_configs: tuple[str, ...] = ()) -> Path:
    """``models/model.pt``: the state dict of the bundle's own ``network_def``, freshly initialised with ``seed``."""
    from monai.bundle import ConfigParser

    torch.manual_seed(seed)
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "inference.json")] + [str(bundle / c) for c in extra_configs])
    parser["bundle_root"] = str(bundle)
    path = bundle / "models" / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


CKPT_EXPORT = [
    "ckpt_export", "--net_id", "network_def", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
    "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
]  # fmt: skip


def export_torchscript(bundle: Path, extra_configs: tuple[str, ...] = ()) -> Path:
    """Write ``models/model.ts`` with the documented ``python -m monai.bundle ckpt_export`` command."""
    args = list(CKPT_EXPORT)
    if extra_configs:
        args[-1] = repr(["configs/inference.json", *extra_configs])
    check(run_cli([sys.executable, "-m", "monai.bundle", *args], cwd=bundle))
    return bundle / "models" / "model.ts"


def exported_bundle(
    name: str, dest: Path, extra_configs: tuple[str, ...] = (), metadata_patch: Callable[[dict], None] | None = None
) -> Path:
    """A copy of bundle ``name`` with a fresh ``model.pt`` and the ``model.ts`` that ckpt_export made of it
    (with ``extra_configs`` merged after ``inference.json`` and the copy's metadata changed by ``metadata_patch``)."""
    bundle = copy_bundle(name, dest)
    if metadata_patch is not None:
        meta_path = bundle / "configs" / "metadata.json"
        metadata = json.loads(meta_path.read_text())
        metadata_patch(metadata)
        meta_path.write_text(json.dumps(metadata, indent=4))
    write_initial_checkpoint(bundle, extra_configs=extra_configs)
    export_torchscript(bundle, extra_configs)
    return bundle


def sample_inputs(case: HandoffCase, folder: Path, request: pytest.FixtureRequest) -> list[Path]:
    """A synthetic input always, and the real sample when ``shared_data`` is there (else that part is skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs = [case.synthetic_input(folder)]
    if case.real_input is None:
        return inputs
    try:
        inputs.append(case.real_input(request.getfixturevalue("shared_data"), folder))
    except pytest.skip.Exception:
        pass  # local run without the data: the synthetic input still runs
    return inputs
