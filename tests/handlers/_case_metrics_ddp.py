"""
Run by tests/handlers/test_case_metrics_saver.py, as one plain process or under ``torchrun`` (gloo, CPU): a MONAI
SupervisedEvaluator with a CaseMetricsSaver over seven cases of different sizes, one with an empty
prediction (Hausdorff distance inf) and some with a text column.

    python tests/handlers/_case_metrics_ddp.py OUT [--even_divisible]
    python -m torch.distributed.run --nproc_per_node=2 tests/handlers/_case_metrics_ddp.py OUT [--even_divisible]

Each rank writes to ``OUT/rank<r>`` (only rank 0 should write anything) and puts its
``engine.state.metrics`` in ``OUT/state_rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from monai.data import DataLoader, Dataset, DistributedSampler, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import ConfusionMatrix, HausdorffDistance, MeanDice, from_engine
from monai.transforms import AsDiscreted

from custom_nets.handlers.case_metrics_saver import CaseMetricsSaver


class Passthrough(torch.nn.Module):
    """Logits that make the binary image itself the prediction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([1 - x, x], dim=1) * 10


def square(lo: int, hi: int, size: int = 16) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, lo:hi, lo:hi] = 1
    return mask


def cases() -> list[dict]:
    """Seven cases named out of alphabetical order, so that dataset order is not sorted order."""
    pairs = [(square(4, 8), square(4, 8)), (square(4, 8), square(4, 10)), (torch.zeros(1, 16, 16), square(4, 8))]
    pairs += [(square(2, 2 + k), square(3, 3 + k)) for k in range(4, 8)]
    names = ["g", "c", "a", "f", "b", "e", "d"]
    return [
        {
            "image": MetaTensor(pred, meta={"filename_or_obj": f"/data/{name}.png"}),
            "label": label,
            "size_px": float(label.sum()),
            "note": "small" if label.sum() < 20 else "",
        }
        for name, (pred, label) in zip(names, pairs)
    ]


def main(out: Path, even_divisible: bool) -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group(backend="gloo")
    rank = dist.get_rank() if distributed else 0
    out.mkdir(parents=True, exist_ok=True)
    dataset = Dataset(cases())
    sampler = DistributedSampler(dataset, even_divisible=even_divisible, shuffle=False) if distributed else None
    key_metric = {"val_mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))}
    extra = {
        "val_precision": ConfusionMatrix(include_background=False, metric_name="precision", compute_sample=True, output_transform=from_engine(["pred", "label"])),
        "val_hd95": HausdorffDistance(include_background=False, percentile=95, output_transform=from_engine(["pred", "label"])),
    }  # fmt: skip
    saver = CaseMetricsSaver(
        output_dir=out / f"rank{rank}",
        metrics={"dice": key_metric["val_mean_dice"], "precision": extra["val_precision"], "hd95": extra["val_hd95"]},
        case_metrics=[lambda case: {"size_px": case["size_px"], "note": case["note"]}],
        publish=["size_px"],
    )
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(dataset, batch_size=2, sampler=sampler),
        network=Passthrough(),
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2),
        key_val_metric=key_metric,
        additional_metrics=extra,
        val_handlers=[saver],
    )
    evaluator.run()
    (out / f"state_rank{rank}.json").write_text(json.dumps({"size_px": evaluator.state.metrics["size_px"]}))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), even_divisible="--even_divisible" in sys.argv[2:])
