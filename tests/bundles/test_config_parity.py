"""
The configs of a bundle agree: training, evaluation and inference build the same network, and evaluation and
inference turn the same real input into the same network input (the image pipeline the model was validated
with is the one it is served with). Each config is standalone, as in the Model Zoo, so this test is what keeps
their copies of the pipeline equal; the model-only hand-off's masks are compared with the research inference
in ``test_export.py``.

A new bundle is tested by adding one entry to ``REAL_INPUTS``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from _export_helpers import BUNDLES_DIR
from custom_nets.data.brats import BRATS2013_LAYOUT, brats_case


def _fetal(data: Path) -> tuple[dict, str, tuple[str, ...]]:
    folder = data / "hc18_subset" / "training_set"
    return {"image": str(folder / "001_HC.png"), "label": str(folder / "001_HC_Annotation.png")}, str(folder / "001_HC.png"), ()


def _lung(data: Path) -> tuple[dict, str, tuple[str, ...]]:
    scan = str(data / "lung_ct" / "acrin_flt_breast_001" / "ct.nii.gz")
    return {"image": scan, "nodules": []}, scan, ()


def _brain(data: Path) -> tuple[dict, str, tuple[str, ...]]:
    case_dir = sorted((data / "brats2015").iterdir())[0]
    return brats_case(case_dir, **BRATS2013_LAYOUT), str(case_dir), ("configs/layout_brats2013.json",)


#: per bundle: the evaluation item, the inference input and the extra configs of one real case of ``SHARED_DATA``
REAL_INPUTS = {
    "fetal_head_us_segmentation": _fetal,
    "lung_nodule_ct_segmentation": _lung,
    "brain_tumor_mri_segmentation": _brain,
}


def _parser(bundle: str, *configs: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_meta(str(BUNDLES_DIR / bundle / "configs" / "metadata.json"))
    parser.read_config([str(BUNDLES_DIR / bundle / c) for c in configs])
    parser["bundle_root"] = str(BUNDLES_DIR / bundle)
    return parser


def test_every_bundle_is_listed():
    bundles = {p.parent.parent.name for p in BUNDLES_DIR.glob("*/configs/inference.json")}
    assert bundles == set(REAL_INPUTS)


@pytest.mark.parametrize("bundle", sorted(REAL_INPUTS))
def test_every_config_builds_the_same_network(bundle):
    configs = sorted(p.name for p in (BUNDLES_DIR / bundle / "configs").glob("*.json") if p.name != "metadata.json")
    defined = {c: json.loads((BUNDLES_DIR / bundle / "configs" / c).read_text()).get("network_def") for c in configs}
    definitions = {c: d for c, d in defined.items() if d is not None and c != "inference_ts.json"}  # the hand-off loads model.ts
    assert {"train.json", "inference.json"} <= set(definitions)
    assert all(d == definitions["train.json"] for d in definitions.values()), definitions

    shapes = []
    for configs_used in (["configs/train.json"], ["configs/train.json", "configs/evaluate.json"], ["configs/inference.json"]):
        network = _parser(bundle, *configs_used).get_parsed_content("network_def")
        shapes.append((type(network).__name__, {k: tuple(v.shape) for k, v in network.state_dict().items()}))
    assert shapes[0] == shapes[1] == shapes[2]


@pytest.mark.parametrize("bundle", sorted(REAL_INPUTS))
def test_evaluation_and_inference_give_the_network_the_same_input(bundle, shared_data):
    item, inference_input, extra = REAL_INPUTS[bundle](shared_data)
    evaluation = _parser(bundle, "configs/train.json", "configs/evaluate.json", *extra).get_parsed_content("validate#preprocessing")
    inference = _parser(bundle, "configs/inference.json", *extra).get_parsed_content("preprocessing")

    evaluated = torch.as_tensor(evaluation(dict(item))["image"])
    inferred = torch.as_tensor(inference({"image": inference_input})["image"])

    assert evaluated.shape == inferred.shape
    torch.testing.assert_close(evaluated, inferred, rtol=1e-5, atol=1e-5)
