"""
Training speed of a bundle in each training precision: seconds per iteration and images/s of the real
bundle trainer (``configs/train.json`` through MONAI's ``ConfigWorkflow``, as ``monai.bundle run
training`` runs it), with the CPU model and its ISA flags.

Each mode is one ``--train_precision`` (``fp32``, ``bf16``, ``auto``...) optionally with
``+channels_last`` or ``-channels_last`` (default: the ``auto`` choice of
``custom_nets.engines.training_precision``). The default compares plain fp32 (``fp32-channels_last``,
MONAI's trainer as it was), fp32 with ``channels_last`` and the fast path ``auto``. The modes run
``--rounds`` times in turn, so that slow background load hits all of them alike; an iteration is timed from Ignite's ``ITERATION_STARTED`` to
``ITERATION_COMPLETED`` (batch to device, forward, loss, backward, optimizer step, the bundle's
iteration handlers), the data loading before it is not. Validation is switched off. Epoch time is the
median iteration time times the iterations of one epoch on the full training split. The CPU seconds of
the process per iteration (all its threads) are printed too: on a machine shared with other jobs they
vary less than the wall time.

Fetal head bundle on the HC18 sample (10-20 minutes on 2 CPU cores at batch 16)::

    python benchmarks/training_speed.py --dataset_dir ../shared/data/hc18_subset

Quick run::

    python benchmarks/training_speed.py --dataset_dir ../shared/data/hc18_subset --batch_size 4 --iterations 2 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from custom_nets.engines.fast_path import cpu_info

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "bundles" / "fetal_head_us_segmentation"
DEFAULT_DATA = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data")) / "hc18_subset"


def parse_mode(mode: str) -> tuple[str, str]:
    """``"fp32+channels_last"`` -> ``("fp32", "true")``; ``"auto"`` -> ``("auto", "auto")``."""
    for sign, value in (("+", "true"), ("-", "false")):
        if mode.endswith(f"{sign}channels_last"):
            return mode[: -len("channels_last") - 1], value
    return mode, "auto"


def run_mode(args: argparse.Namespace, mode: str, root: Path) -> tuple[list[tuple[float, float]], int, str]:
    """
    Train ``args.warmup + args.iterations`` iterations in ``mode``: (wall, CPU) seconds of each timed
    iteration, the iterations of one epoch and the choice's log line.
    """
    precision, channels_last = parse_mode(mode)
    configs = args.bundle / "configs"
    steps = args.warmup + args.iterations
    workflow = ConfigWorkflow(
        config_file=str(configs / "train.json"),
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(args.dataset_dir),
        image_size=args.image_size,
        num_workers=0,  # loading is not timed; workers would compete with the timed iterations for the cores
        val_interval=10**6,  # no validation
        train_precision=precision,
        train_channels_last=channels_last,
        **{
            "train#dataset#cache_rate": 0.0,
            "validate#dataset#cache_rate": 0.0,
            "train#dataloader#batch_size": args.batch_size,
            "train#trainer#max_epochs": 1,
            "train#trainer#epoch_length": steps,
        },
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    epoch_iterations = len(trainer.data_loader)
    times: list[tuple[float, float]] = []
    start = [0.0, 0.0]

    def started(_) -> None:
        start[:] = time.perf_counter(), time.process_time()

    def completed(_) -> None:
        times.append((time.perf_counter() - start[0], time.process_time() - start[1]))

    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, completed)
    workflow.run()
    workflow.finalize()
    choice = workflow.parser.get_parsed_content("training_precision")
    return times[args.warmup :], epoch_iterations, choice.describe()


def benchmark(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    info = cpu_info()
    results = {mode: {"seconds": [], "cpu_seconds": []} for mode in args.modes}
    with tempfile.TemporaryDirectory(prefix="training_speed_") as tmp:
        for r in range(args.rounds):
            order = args.modes[r % len(args.modes) :] + args.modes[: r % len(args.modes)]
            for mode in order:
                times, epoch_iterations, choice = run_mode(args, mode, Path(tmp) / f"{mode}_{r}")
                results[mode]["seconds"] += [wall for wall, _ in times]
                results[mode]["cpu_seconds"] += [cpu for _, cpu in times]
                results[mode].update(epoch_iterations=epoch_iterations, choice=choice)
                print(f"round {r + 1}/{args.rounds} {mode}: {', '.join(f'{w:.2f}' for w, _ in times)} s/iteration", flush=True)
    for res in results.values():
        median, best = statistics.median(res["seconds"]), min(res["seconds"])
        res.update(median_s=median, min_s=best, images_per_s=args.batch_size / median, epoch_s=median * res["epoch_iterations"])
        res["median_cpu_s"] = statistics.median(res["cpu_seconds"])
    return {
        "cpu": info,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bundle": args.bundle.name,
        "dataset_dir": str(args.dataset_dir),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "results": results,
    }


def print_report(report: dict) -> None:
    cpu = report["cpu"]
    print(f"\nCPU: {cpu['model']}; flags: {' '.join(cpu['flags']) or 'none'}; torch {report['torch']}, "
          f"{report['threads']} threads; onednn_max_isa: {cpu['onednn_max_isa']}")  # fmt: skip
    print(f"{report['bundle']}, batch {report['batch_size']}, {report['image_size']}x{report['image_size']}\n")
    print("| mode | s/iteration (median) | s/iteration (min) | CPU s/iteration | images/s | epoch (s) | chosen |")
    print("|---|---|---|---|---|---|---|")
    (first, base), *_ = ((m, r["median_s"]) for m, r in report["results"].items())
    for mode, res in report["results"].items():
        speedup = f" ({base / res['median_s']:.2f}x)" if mode != first else ""
        print(f"| {mode} | {res['median_s']:.2f}{speedup} | {res['min_s']:.2f} | {res['median_cpu_s']:.2f} | {res['images_per_s']:.2f} | "
              f"{res['epoch_s']:.0f} | {res['choice'].split(': ', 1)[1]} |")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle folder (default: fetal head)")
    parser.add_argument("--dataset_dir", type=Path, default=DEFAULT_DATA, help="the bundle's --dataset_dir")
    parser.add_argument("--modes", type=lambda s: s.split(","),
                        default=["fp32-channels_last", "fp32+channels_last", "auto"],
                        help="comma-separated train_precision[+|-channels_last]; the first is the baseline")  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=16, help="the bundle's training batch size")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per mode and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (oneDNN primitive creation)")
    parser.add_argument("--rounds", type=int, default=2, help="times each mode runs, in turn")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output_json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = benchmark(args)
    print_report(report)
    if args.output_json:
        args.output_json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
