"""
Every bundle's ``multi_gpu_evaluate.json`` on top of its ``train.json`` and ``evaluate.json``: each case once
(no shuffling, no padding), the per-case metrics handler on every rank (its save is collective), the model
card's command. The fetal bundle's 2-process run is in ``tests/bundles/test_fetal_head_bundle.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
NAMES = ["fetal_head_us_segmentation", "brain_tumor_mri_segmentation", "lung_nodule_ct_segmentation"]
CONFIGS = ["train.json", "evaluate.json", "multi_gpu_evaluate.json"]


@pytest.fixture(params=NAMES)
def bundle(request) -> Path:
    return BUNDLES / request.param


def _merged(bundle: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in CONFIGS])
    return parser


def test_each_case_is_evaluated_once(bundle):
    parser = _merged(bundle)
    sampler = parser.get("validate#sampler")
    assert sampler["_target_"] == "DistributedSampler" and sampler["dataset"] == "@validate#dataset"
    assert sampler["even_divisible"] is False and sampler["shuffle"] is False
    assert parser.get("validate#dataloader#sampler") == "@validate#sampler"
    assert parser.get("validate#dataloader#shuffle") is False


def test_case_metrics_saver_runs_on_every_rank(bundle):
    parser = _merged(bundle)
    handlers = parser.get("validate#handlers")
    assert any(h["_target_"].endswith("CaseMetricsSaver") for h in handlers)
    # only StatsHandler is left out on ranks > 0: the saver gathers the rows of all ranks
    assert "not isinstance(h, monai.handlers.StatsHandler)" in parser.get("validate#evaluator#val_handlers")
    assert parser.get("run") == ["$@validate#evaluator.run()"]
    assert any("destroy_process_group" in line for line in parser.get("finalize"))


def test_model_card_gives_the_command(bundle):
    card = (bundle / "docs" / "README.md").read_text()
    assert "'configs/train.json','configs/evaluate.json','configs/multi_gpu_evaluate.json'" in card
    assert "torchrun" in card and "run evaluating" in card
