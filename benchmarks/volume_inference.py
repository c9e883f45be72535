"""
Whole-volume inference time and peak memory of the brain MRI and lung CT bundles, on CPU (or CUDA),
through each bundle's own ``configs/inference.json`` (same transforms, SliceInferer, fast path,
inversion and writers as ``python -m monai.bundle run inference``), in each precision mode of the fast
path (``--precision fp32|bf16|int8|auto``, :mod:`custom_nets.engines.fast_path`).

Each volume and mode runs in a fresh child process so its peak resident memory (``VmHWM``) is its
own. The network has random weights (saved as the bundle's ``models/model.pt`` in a scratch copy of
the bundle): the arithmetic, and so the time, does not depend on the weights. For ``int8`` the INT8
model is made from that checkpoint by ``custom_nets.deploy quantize``, calibrated on slices of the
generated volume (needs ``onnxruntime``; without it the mode is reported as skipped). A mode the CPU
cannot run (``bf16`` without AMX/AVX512-BF16) is skipped with its one-line reason. A second, optional
pass runs under a torch dispatch mode that records the largest float64 tensor any torch operation
creates, to check that no full-volume float64 copy is made.

Usage::

    python benchmarks/volume_inference.py --threads 2                       # 240x240x155 MRI, 512x512x300 CT; fp32, int8
    python benchmarks/volume_inference.py --cases ct --ct_shape 512,512,60 --precisions fp32,bf16,int8
    python benchmarks/volume_inference.py --ct_shape 512,512,60 --float64_probe --precisions fp32

It prints the CPU model and its ISA flags, then one row per volume and mode: seconds and peak RSS of
each phase (loading + preprocessing, network (SliceInferer), postprocessing (inversion to the input
grid), writing the mask and tables), whole-volume seconds, slices/s (whole volume and network alone),
overall peak RSS and the RSS before the volume was read, with the targets of issue 11 (CT
512x512x300 <= 30 s, MRI 240x240x155 <= 10 s, peak RSS <= 3 GB on 2 cores), and writes them as JSON.
The first volume of a process also pays the readers' lazy imports (ITK: seconds), inside
``load_preprocess``; ``imports_s`` is measured apart so it can be told from the per-volume work.
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
#: Whole-volume targets of issue 11 on 2 cores: CT 512x512x300 and MRI 240x240x155 (4 sequences), peak RSS.
TARGETS_S = {"ct": 30.0, "mri": 10.0}
TARGET_RSS_MB = 3 * 1024.0


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


def _peak_rss_mb() -> float:
    """This process's resident-memory high-water mark: ``VmHWM`` where Linux has it, else ``ru_maxrss``.

    ``ru_maxrss`` survives ``execve``: a child started from a parent that holds torch and the quantized
    model would report the parent's size at the fork, whereas ``VmHWM`` belongs to the child's own memory.
    """
    return proc_status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(kind: str, bundle_root: str, input_dir: str, output_dir: str, precision: str, float64_probe: bool) -> dict:
    """Child process: run the bundle's inference in ``precision`` on ``input_dir`` and report times and memory."""
    import torch
    from monai.bundle import ConfigParser

    from custom_nets.data.volume_io import check_volume_input, list_volume_inputs
    from custom_nets.engines.fast_path import PrecisionUnavailableError
    from custom_nets.errors import exception_chain
    from custom_nets.checkpoints import load_checkpoint

    parser = ConfigParser()
    parser.read_config(str(BUNDLES[kind] / "configs" / "inference.json"))
    parser.update({"bundle_root": bundle_root, "input_dir": input_dir, "output_dir": output_dir, "precision": precision})
    parser.get_parsed_content("network").load_state_dict(load_checkpoint(parser.get_parsed_content("ckpt_path"), map_location="cpu"))
    try:
        runner = parser.get_parsed_content("runner")
    except Exception as e:  # the mode cannot run on this machine: a row that says why, not a failed benchmark
        cause = next((c for c in exception_chain(e) if isinstance(c, PrecisionUnavailableError)), None)
        if cause is None:
            raise
        return {"case": kind, "precision": precision, "status": f"skipped: {cause}"}
    # the readers' lazy imports (ITK loads its modules on first use: seconds) are paid once per process, not per volume
    start = time.perf_counter()
    cases = list_volume_inputs(input_dir) if kind == "ct" else sorted(Path(input_dir).iterdir())
    for path in cases:
        check_volume_input(path if kind == "ct" else next(path.glob("*.nii.gz")))
    imports_s = time.perf_counter() - start
    totals: dict[str, float] = {}
    runner.preprocessing = _Timed(runner.preprocessing, totals, "load_preprocess")
    runner.inferer = _Timed(runner.inferer, totals, "network")
    runner.postprocessing = _Timed(runner.postprocessing, totals, "postprocess")
    runner.case_outputs = [_Timed(fn, totals, "write") for fn in runner.case_outputs]
    rss_before_mb = _peak_rss_mb()
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
    return {
        "case": kind,
        "precision": getattr(runner.network, "precision", precision),
        "status": rows[0]["status"],
        "device": str(runner.device),
        "threads": torch.get_num_threads(),
        "slices_per_batch": int(parser.get_parsed_content("slices_per_inference_batch")),
        "imports_s": round(imports_s, 2),
        "total_s": round(total, 2),
        **{k: round(v, 2) for k, v in totals.items()},
        # the per-phase peaks above reset the kernel's high-water mark: the overall peak is the largest of all
        "peak_rss_mb": round(max([rss_before_mb, _peak_rss_mb()] + [v for k, v in totals.items() if k.endswith("_peak_mb")]), 1),
        "rss_before_mb": round(rss_before_mb, 1),
        "largest_float64_tensor_elements": largest_float64 if float64_probe else None,
        "input": cases[0].name,
    }


def scratch_bundle(kind: str, folder: Path, calibration_dir: Path, precisions: list[str], num_inputs: int) -> tuple[Path, dict]:
    """
    A copy of the bundle's configs in ``folder`` with a random-weight ``models/model.pt`` and, when
    ``int8`` (or ``auto``) is asked for and onnxruntime is installed, its INT8 model made by
    :func:`custom_nets.deploy.quantize.quantize_bundle` on ``num_inputs`` slices of ``calibration_dir``.
    Returns the folder and the quantizer's report (``{"skipped": reason}`` when no INT8 model was made).
    """
    import shutil

    import torch
    from monai.bundle import ConfigParser

    shutil.copytree(BUNDLES[kind] / "configs", folder / "configs")
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    (folder / "models").mkdir()
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "models" / "model.pt")
    if not {"int8", "auto"} & set(precisions):
        return folder, {}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return folder, {"skipped": "onnxruntime is not installed (pip install 'custom_nets[fast]')"}
    from custom_nets.deploy.quantize import quantize_bundle

    # random weights, for timing only: no agreement bound
    return folder, quantize_bundle(folder, calibration_dir, num_inputs=num_inputs, min_dice=0.0)


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
    parser.add_argument("--precisions", default="fp32,int8", help="comma-separated fast-path modes: fp32, bf16, fp16, int8, auto")
    parser.add_argument("--calibration_inputs", type=int, default=8, help="slices the INT8 model is calibrated on")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--float64_probe", action="store_true", help="also run once under the float64 probe (slower)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "volume_inference.json"))
    parser.add_argument("--_child", nargs=5, metavar=("KIND", "BUNDLE_ROOT", "INPUT_DIR", "OUTPUT_DIR", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args._child:
        print(json.dumps(run_one(*args._child, float64_probe=args._probe)))
        return

    from custom_nets.engines.fast_path import PRECISIONS, cpu_info

    precisions = [p.strip().lower() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"--precisions: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}; ISA flags: {', '.join(cpu['flags']) or 'none of ' + '/'.join(('avx2', 'avx512', 'vnni', 'amx'))}; "
          f"torch dispatch {cpu['torch_capability']}; {args.threads or 'default'} thread(s)")  # fmt: skip
    results, quantized = [], {}
    with tempfile.TemporaryDirectory(prefix="volume_inference_") as tmp:
        for kind in [c.strip() for c in args.cases.split(",") if c.strip()]:
            shape = args.mri_shape if kind == "mri" else args.ct_shape
            inputs = Path(tmp) / f"{kind}_input"
            (write_mri_case if kind == "mri" else write_ct_case)(inputs, shape)
            root, quantized[kind] = scratch_bundle(kind, Path(tmp) / f"{kind}_bundle", inputs, precisions, args.calibration_inputs)
            for precision in precisions:
                if precision == "int8" and "skipped" in quantized[kind]:
                    results.append({"case": kind, "precision": precision, "status": f"skipped: {quantized[kind]['skipped']}"})
                    continue
                for probe in (False, True) if args.float64_probe else (False,):
                    out = Path(tmp) / f"{kind}_out_{precision}"
                    command = [sys.executable, __file__, "--_child", kind, str(root), str(inputs), str(out), precision]
                    command += (["--threads", str(args.threads)] if args.threads else []) + (["--_probe"] if probe else [])
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode != 0:
                        sys.exit(f"{kind} {precision}: benchmark child failed:\n{done.stderr[-3000:]}")
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    row["shape"] = "x".join(map(str, shape))
                    if "total_s" in row:
                        slices = shape[2]  # SliceInferer runs over the last axis, whose size Resized keeps (-1)
                        row["slices"] = slices
                        row["slices_per_s"] = round(slices / row["total_s"], 2)
                        row["network_slices_per_s"] = round(slices / row["network_s"], 2)
                    results.append(row)

    phases = ("load_preprocess", "network", "postprocess", "write")
    print(f"{'case':<5} {'shape':<12} {'mode':<5} {'thr':>3} " + " ".join(f"{p + ' s':>17}" for p in phases)
          + f" {'total s':>8} {'slices/s':>8} {'net sl/s':>8} {'peak RSS MB':>11} {'RSS before MB':>13} {'max f64 elems':>13}")  # fmt: skip
    print(f"{'':<27} " + " ".join(f"{'(peak MB)':>17}" for _ in phases))
    for r in results:
        if "total_s" not in r:
            print(f"{r['case']:<5} {r.get('shape', ''):<12} {r['precision']:<5} {r['status']}")
            continue
        f64 = "-" if r["largest_float64_tensor_elements"] is None else str(r["largest_float64_tensor_elements"])
        cells = " ".join(f"{r.get(p + '_s', 0):>8.2f} ({r.get(p + '_peak_mb', float('nan')):>6.0f})" for p in phases)
        print(f"{r['case']:<5} {r['shape']:<12} {r['precision']:<5} {r['threads']:>3} {cells} {r['total_s']:>8.2f} "
              f"{r['slices_per_s']:>8.2f} {r['network_slices_per_s']:>8.2f} {r['peak_rss_mb']:>11.0f} {r['rss_before_mb']:>13.0f} {f64:>13}")  # fmt: skip
    print(f"targets (issue 11, 2 cores): CT {TARGETS_S['ct']:.0f} s for 512x512x300, MRI {TARGETS_S['mri']:.0f} s for 240x240x155, "
          f"peak RSS <= {TARGET_RSS_MB:.0f} MB; readers' one-time imports are not in these times (imports_s in the JSON)")  # fmt: skip
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu": cpu}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "quantization": quantized, "results": results}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()
