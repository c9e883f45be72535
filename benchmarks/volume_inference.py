"""
Whole-volume inference time and peak memory of the brain MRI and lung CT bundles, on CPU (or CUDA with
AMP when present), through each bundle's own ``configs/inference.json`` (same transforms, SliceInferer,
inversion and writers as ``python -m monai.bundle run inference``).

Each volume runs in a fresh child process so its peak resident memory (``ru_maxrss``) is its own. The
network has random weights: the arithmetic, and so the time, does not depend on the weights (the
per-nodule table is measured on whatever the random network predicts). A second, optional pass runs
under a torch dispatch mode that records the largest float64 tensor any torch operation creates, to
check that no full-volume float64 copy is made (file readers are checked by the tests).

Usage::

    python benchmarks/volume_inference.py --threads 2                       # 240x240x155 MRI, 512x512x300 CT
    python benchmarks/volume_inference.py --ct_shape 512,512,60 --float64_probe
    python benchmarks/volume_inference.py --cases ct --output benchmarks/results/volume_inference.json

It prints one table row per volume (seconds and peak RSS of each phase: loading + preprocessing,
network (SliceInferer), postprocessing (inversion to the input grid), writing the mask and tables;
total seconds, overall peak RSS and the RSS before the volume was read) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from process_memory import proc_status_mb, reset_peak_rss  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {"mri": REPO / "bundles" / "brain_tumor_mri_segmentation", "ct": REPO / "bundles" / "lung_nodule_ct_segmentation"}


def _ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    y, x = np.ogrid[: shape[0], : shape[1]]
    return ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2 <= 1.0


def write_mri_case(folder: Path, shape: tuple[int, int, int]) -> Path:
    """One BraTS-2020-layout case of ``shape`` with four sequences (brain ellipsoid, zero outside)."""
    import nibabel as nib

    case = folder / "BraTS20_Benchmark_001"
    case.mkdir(parents=True)
    rng = np.random.default_rng(0)
    zz = np.linspace(-1.0, 1.0, shape[2])
    for i, sequence in enumerate(("t1", "t1ce", "t2", "flair")):
        volume = np.zeros(shape, dtype=np.int16)
        for k, z in enumerate(zz):
            scale = max(1e-3, 1.0 - z * z) ** 0.5
            brain = _ellipse(shape[:2], (shape[0] / 2, shape[1] / 2), (0.4 * shape[0] * scale + 1, 0.35 * shape[1] * scale + 1))
            volume[..., k][brain] = (400 + 100 * i + rng.normal(0, 30, int(brain.sum()))).astype(np.int16)
        nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0])), case / f"BraTS20_Benchmark_001_{sequence}.nii.gz")
    return folder


def write_ct_case(folder: Path, shape: tuple[int, int, int], spacing=(0.7, 0.7, 1.0)) -> Path:
    """One LUNA16-style MetaImage CT of ``shape`` (air, body, two lungs, HU int16)."""
    import itk

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    body = _ellipse(shape[:2], (shape[0] / 2, shape[1] / 2), (0.45 * shape[0], 0.38 * shape[1]))
    lungs = _ellipse(shape[:2], (shape[0] / 2, 0.3 * shape[1]), (0.3 * shape[0], 0.12 * shape[1]))
    lungs |= _ellipse(shape[:2], (shape[0] / 2, 0.7 * shape[1]), (0.3 * shape[0], 0.12 * shape[1]))
    plane = np.where(lungs, -850, np.where(body, 40, -1000)).astype(np.int16)
    volume = np.empty(shape[::-1], dtype=np.int16)  # ITK's (z, y, x) order
    for k in range(shape[2]):
        volume[k] = plane.T + rng.integers(-20, 20, size=plane.T.shape, dtype=np.int16)
    image = itk.image_from_array(volume)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([-180.0, -180.0, -300.0])
    itk.imwrite(image, str(folder / "1.2.826.0.1.3680043.8.498.99.1.mhd"), compression=False)
    return folder


class _Timed:
    """Wraps a callable; adds its run time to ``totals[name + '_s']`` and its peak RSS to ``totals[name + '_peak_mb']``."""

    def __init__(self, fn, totals: dict, name: str) -> None:
        self.fn, self.totals, self.name = fn, totals, name

    def __call__(self, *args, **kwargs):
        per_phase_peak = reset_peak_rss()
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.totals[f"{self.name}_s"] = self.totals.get(f"{self.name}_s", 0.0) + time.perf_counter() - start
            if per_phase_peak:
                peak = max(self.totals.get(f"{self.name}_peak_mb", 0.0), (proc_status_mb("VmHWM") or float("nan")))
                self.totals[f"{self.name}_peak_mb"] = peak


def run_one(kind: str, input_dir: str, output_dir: str, float64_probe: bool) -> dict:
    """Child process: run the bundle's inference on ``input_dir`` and report times and memory."""
    import torch
    from monai.bundle import ConfigParser

    bundle = BUNDLES[kind]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "input_dir": input_dir, "output_dir": output_dir})
    runner = parser.get_parsed_content("runner")
    totals: dict[str, float] = {}
    runner.preprocessing = _Timed(runner.preprocessing, totals, "load_preprocess")
    runner.inferer = _Timed(runner.inferer, totals, "network")
    runner.postprocessing = _Timed(runner.postprocessing, totals, "postprocess")
    runner.case_outputs = [_Timed(fn, totals, "write") for fn in runner.case_outputs]
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    largest_float64 = 0
    start = time.perf_counter()
    if float64_probe:
        from torch.utils._python_dispatch import TorchDispatchMode

        class Float64Probe(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                nonlocal largest_float64
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                        largest_float64 = max(largest_float64, t.numel())
                return out

        with Float64Probe():
            rows = runner.run()
    else:
        rows = runner.run()
    total = time.perf_counter() - start
    image = next(iter(Path(input_dir).iterdir()))
    return {
        "case": kind,
        "status": rows[0]["status"],
        "device": str(runner.device),
        "threads": torch.get_num_threads(),
        "total_s": round(total, 2),
        **{k: round(v, 2) for k, v in totals.items()},
        # ru_maxrss is the whole life of the process; the per-phase peaks above reset the kernel's counter
        "peak_rss_mb": round(max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
                                 + [v for k, v in totals.items() if k.endswith("_peak_mb")]), 1),
        "rss_before_mb": round(rss_before_mb, 1),
        "largest_float64_tensor_elements": largest_float64 if float64_probe else None,
        "input": image.name,
    }


def _shape(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated sizes, got {text!r}")
    return values  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="mri,ct", help="comma-separated: mri, ct")
    parser.add_argument("--mri_shape", type=_shape, default=(240, 240, 155))
    parser.add_argument("--ct_shape", type=_shape, default=(512, 512, 300))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--float64_probe", action="store_true", help="also run once under the float64 probe (slower)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "volume_inference.json"))
    parser.add_argument("--_child", nargs=3, metavar=("KIND", "INPUT_DIR", "OUTPUT_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args._child:
        print(json.dumps(run_one(*args._child, float64_probe=args._probe)))
        return

    results = []
    with tempfile.TemporaryDirectory(prefix="volume_inference_") as tmp:
        for kind in [c.strip() for c in args.cases.split(",") if c.strip()]:
            shape = args.mri_shape if kind == "mri" else args.ct_shape
            inputs = Path(tmp) / f"{kind}_input"
            (write_mri_case if kind == "mri" else write_ct_case)(inputs, shape)
            for probe in (False, True) if args.float64_probe else (False,):
                command = [sys.executable, __file__, "--_child", kind, str(inputs), str(Path(tmp) / f"{kind}_out")]
                command += (["--threads", str(args.threads)] if args.threads else []) + (["--_probe"] if probe else [])
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{kind}: benchmark child failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["shape"] = "x".join(map(str, shape))
                results.append(row)

    phases = ("load_preprocess", "network", "postprocess", "write")
    print(f"{'case':<5} {'shape':<12} {'device':<7} {'thr':>3} " + " ".join(f"{p + ' s':>17}" for p in phases)
          + f" {'total s':>8} {'peak RSS MB':>11} {'RSS before MB':>13} {'max f64 elems':>13}")  # fmt: skip
    print(f"{'':<32} " + " ".join(f"{'(peak MB)':>17}" for _ in phases))
    for r in results:
        f64 = "-" if r["largest_float64_tensor_elements"] is None else str(r["largest_float64_tensor_elements"])
        cells = " ".join(f"{r.get(p + '_s', 0):>8.2f} ({r.get(p + '_peak_mb', float('nan')):>6.0f})" for p in phases)
        print(f"{r['case']:<5} {r['shape']:<12} {r['device']:<7} {r['threads']:>3} {cells} {r['total_s']:>8.2f} "
              f"{r['peak_rss_mb']:>11.0f} {r['rss_before_mb']:>13.0f} {f64:>13}")  # fmt: skip
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()
