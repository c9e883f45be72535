"""
Scale-out figures of batch inference through the real command line (fetal-head bundle, synthetic HC18
images, random weights: the batch handling is measured, not the model):

1. **Throughput**: cases/s of ``python -m monai.bundle run inference`` in one process and of
   ``torchrun --nproc_per_node=N`` on the same images, each process with one thread
   (``OMP_NUM_THREADS=1``, as torchrun sets it). By default each process also reads the next images and
writes the last results in two threads beside the network (the bundle's ``prefetch``), so one process
already keeps more than one core busy; ``--prefetch 0`` measures processes of one thread each. Two figures per run: the wall time of the whole
   command (start-up, merge and exit included, what a user waits for) and the inference loop alone
   (each rank's ``throughput:`` log line, summed over ranks).
2. **Kill and resume** (``--resume_images``): a single-process run is SIGKILLed once half of the
   images are in its journal, then rerun with ``--skip_existing true``. Checked: no finished case runs
   again (its mask file is not rewritten), every other case runs once, and the table has every image.

Target on a 2-core CPU: 2 processes >= 1.7x the cases/s of 1. On N GPUs or nodes the same command is
``torchrun --nnodes M --nproc_per_node G ... -m monai.bundle run inference ...`` (docs/batch_inference.md);
cases are dealt round-robin, so the loop scales with the number of processes until reading the
inputs or writing the outputs saturates the storage.

Both parts, about 10 minutes on 2 quiet cores; then the scaling of one-thread processes::

    python benchmarks/batch_throughput.py --images 300 --processes 1,2 --resume_images 1000
    python benchmarks/batch_throughput.py --images 300 --processes 1,2 --resume_images 0 --prefetch 0

Quick run::

    python benchmarks/batch_throughput.py --images 8 --processes 1,2 --resume_images 12 --height 64 --width 96
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "fetal_head_us_segmentation"
_THROUGHPUT = re.compile(r"throughput: ([\d.]+) images/s")
_SKIPPED = re.compile(r"skip_existing: (\d+) case\(s\) already complete, (\d+) to run")
TABLE = "head_circumference.csv"
JOURNAL = "head_circumference.journal.jsonl"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _inference_args(args: argparse.Namespace, data: Path, model: Path, out: Path) -> list[str]:
    return [
        "run", "inference", "--config_file", str(BUNDLE / "configs" / "inference.json"), "--ckpt_path", str(model),
        "--input_dir", str(data / "training_set"), "--output_dir", str(out), "--image_size", str(args.image_size),
        "--pixel_size_csv", str(data / "training_set_pixel_size_and_HC.csv"), "--precision", args.precision,
        *([] if args.prefetch is None else ["--runner#prefetch", str(args.prefetch)]),
    ]  # fmt: skip


def _command(processes: int, inference: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "monai.bundle", *inference]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "monai.bundle", *inference]


def throughput(args: argparse.Namespace, data: Path, model: Path, work: Path, images: int) -> list[dict]:
    rows = []
    for processes in args.processes:
        out = work / f"out_{processes}"
        start = time.perf_counter()
        result = subprocess.run(_command(processes, _inference_args(args, data, model, out)), capture_output=True, text=True, env=_env())
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"{processes} process(es): inference exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")
        loop = sum(float(v) for v in _THROUGHPUT.findall(result.stdout + result.stderr))
        rows.append({"processes": processes, "wall_s": wall, "cases_per_s_wall": images / wall, "cases_per_s_loop": loop, "table": out / TABLE})
    base = rows[0]
    threads = "prefetch and output threads beside the network" if args.prefetch is None or args.prefetch > 0 else "one thread"
    print(f"\nthroughput over {images} images ({args.height}x{args.width} PNG, network {args.image_size}², {args.precision}, 1 torch thread per process, {threads})")
    print("processes  wall_s  cases/s (wall)  speed-up  cases/s (loop)  speed-up  table equal to 1 process")
    for row in rows:
        same = row["table"].read_bytes() == base["table"].read_bytes()
        print(f"{row['processes']:9d}  {row['wall_s']:6.1f}  {row['cases_per_s_wall']:14.2f}  {row['cases_per_s_wall'] / base['cases_per_s_wall']:7.2f}x"
              f"  {row['cases_per_s_loop']:14.2f}  {row['cases_per_s_loop'] / base['cases_per_s_loop']:7.2f}x  {same}")
        row["table_equal"] = same
    return rows


def _journal_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_and_resume(args: argparse.Namespace, data: Path, model: Path, work: Path, images: int) -> bool:
    out = work / "resume"
    inference = _inference_args(args, data, model, out)
    with open(work / "killed.log", "w") as log:
        process = subprocess.Popen(_command(1, inference), stdout=log, stderr=subprocess.STDOUT, env=_env())
        while process.poll() is None and _journal_lines(out / JOURNAL) < images // 2:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines() if line.endswith("}")]
    finished = {r["row"]["mask"] for r in done if r["row"].get("status") == "ok"}
    written = {name: (out / name).stat().st_mtime_ns for name in finished}
    start = time.perf_counter()
    result = subprocess.run(_command(1, [*inference, "--skip_existing", "true"]), capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - start
    log = result.stdout + result.stderr
    skipped = _SKIPPED.search(log)
    kept, ran = (int(skipped.group(1)), int(skipped.group(2))) if skipped else (0, images)
    rewritten = [name for name, mtime in written.items() if (out / name).stat().st_mtime_ns != mtime]
    with open(out / TABLE, newline="") as f:
        table = list(csv.DictReader(f))
    checks = {
        "resumed run exited 0": result.returncode == 0,
        f"every finished case kept ({len(finished)} at the kill)": kept == len(finished),
        "no finished case's mask rewritten": not rewritten,
        f"the other {images - len(finished)} cases run once": ran == images - len(finished),
        f"table has all {images} images, all ok": len(table) == images and all(r["status"] == "ok" for r in table),
    }
    print(f"\nkill and resume over {images} images: SIGKILL with {len(finished)} finished; the resumed run kept {kept}, ran {ran} in {wall:.1f} s")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return all(checks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="images of the throughput runs (0: skip them)")
    parser.add_argument("--processes", type=lambda s: [int(p) for p in s.split(",")], default=[1, 2])
    parser.add_argument("--resume_images", type=int, default=1000, help="images of the kill-and-resume run (0: skip it)")
    parser.add_argument("--height", type=int, default=540)
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--image_size", type=int, default=256, help="the network's input size")
    parser.add_argument("--precision", default="fp32", help="the bundle's --precision (fp32: no INT8 model needed)")
    parser.add_argument(
        "--prefetch", type=int, help="the bundle's runner#prefetch; 0 keeps each process on one thread (no reading and "
        "writing threads beside the network), the setting for measuring how processes scale on few cores")
    parser.add_argument("--work_dir", type=Path, help="kept for inspection (default: a temporary folder)")
    args = parser.parse_args(argv)

    from custom_nets import AdaptiveCENet
    from custom_nets.data.synthetic_hc18 import generate

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="batch_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = work / "model.pt"
    torch.save(AdaptiveCENet(spatial_dims=2, in_channels=1, out_channels=2).state_dict(), model)
    ok = True
    if args.images:
        data = Path(generate(str(work / "throughput_data"), num_images=args.images, height=args.height, width=args.width))
        rows = throughput(args, data, model, work, args.images)
        ok &= all(row["table_equal"] for row in rows)
    if args.resume_images:
        data = Path(generate(str(work / "resume_data"), num_images=args.resume_images, height=args.height, width=args.width))
        ok &= kill_and_resume(args, data, model, work, args.resume_images)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
