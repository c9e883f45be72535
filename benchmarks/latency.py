"""
Latency, parameters, FLOPs and peak memory of AdaptiveCENet and its baselines (issue 2 targets).

One process times every network at every size, eager and TorchScript, on CPU and (when present) on
CUDA with AMP float16. Within one (device, mode, size) group the repeats go round-robin over the
networks, so slow background load hits all of them alike. Peak RSS of a CPU forward is measured per
network and size in a fresh subprocess (so the allocator state of other networks does not leak into
the figure). Prints a table, the AdaptiveCENet/CENet ratio and the 2 GB check, and writes
``latency.json`` and ``latency.png`` to ``--output_dir``.

Full measurement (a few minutes on 2 CPU cores)::

    python benchmarks/latency.py --threads 2 --repeats 10 --warmup 3

Quick smoke run::

    python benchmarks/latency.py --networks UNet --sizes 64 --repeats 1 --warmup 1 --modes eager
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from custom_nets.deploy.onnx_runtime import onnxruntime_forward_for
from process_memory import proc_status_mb, reset_peak_rss  # benchmarks/ is on sys.path when run as a script

# MONAI UNet baseline: a standard 2D configuration (5 levels, 4 down-samplings, residual units).
UNET_CONFIG = {"channels": (32, 64, 128, 256, 512), "strides": (2, 2, 2, 2), "num_res_units": 2}

# name -> (module path, class name, extra constructor arguments)
NETWORKS: dict[str, tuple[str, str, dict]] = {
    "AdaptiveCENet": ("custom_nets.networks.nets.adaptive_cenet", "AdaptiveCENet", {}),
    "CENet": ("custom_nets.networks.nets.cenet", "CENet", {}),
    "UNet": ("monai.networks.nets", "UNet", UNET_CONFIG),
    "ResNetUNet34": ("custom_nets.networks.nets.resnet_unet", "ResNetUNet", {"depth": 34}),
    "ResNetUNet101": ("custom_nets.networks.nets.resnet_unet", "ResNetUNet", {"depth": 101}),
    "ShallowSegNet": ("custom_nets.networks.nets.shallow_segnet", "ShallowSegNet", {}),
}
DEFAULT_NETWORKS = ("AdaptiveCENet", "CENet", "UNet", "ResNetUNet34")
DEFAULT_SIZES = (256, 512, 1024)
LATENCY_RATIO_TARGET = 0.9  # AdaptiveCENet / CENet, eager, CPU, every size
MEMORY_TARGET_MB = 2048.0  # peak RSS of a 1024^2 CPU forward
MEMORY_TARGET_SIZE = 1024
FLOPS_NOTE = (
    "FLOPs from torch.utils.flop_counter.FlopCounterMode: 2 x multiply-accumulates (FLOPs = 2*MAC) of "
    "convolutions (incl. transposed) and matrix products only; element-wise ops, norms, pooling and "
    "interpolation are not counted"
)
RSS_NOTE = (
    "peak RSS: each network/size runs one eager CPU forward (batch 1, no_grad) in a fresh subprocess; "
    "'RSS MB' is that subprocess's peak resident memory over its life (Python + torch + monai + model + "
    "forward), 'fwd MB' is the peak during the forward minus the resident memory just before it "
    "(Linux VmHWM, reset before the forward)"
)


def build_network(name: str, in_channels: int, out_channels: int) -> nn.Module:
    """Instantiate a benchmarked network by its name in :data:`NETWORKS` (eval mode)."""
    module_path, class_name, extra = NETWORKS[name]
    cls = getattr(importlib.import_module(module_path), class_name)
    return cls(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, **extra).eval()


def count_params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def count_gflops(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def to_torchscript(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, str]:
    """``torch.jit.script``; ``torch.jit.trace`` (size-specific) only if scripting fails, with a note why."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.9 deprecation notices for torch.jit
        try:
            return torch.jit.script(model), "script"
        except Exception as e:  # scripting errors come in several types
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            with torch.no_grad():
                return torch.jit.trace(model, example), f"trace (script failed: {reason})"


def _ru_maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def probe_rss(name: str, size: int, in_channels: int, out_channels: int, threads: int | None) -> dict:
    """
    Run in a fresh subprocess: one eager CPU forward and its RSS figures.

    Linux: ``VmHWM`` is reset just before the forward and read after it, so the forward's own peak is
    isolated. ``ru_maxrss`` is not used there: after fork + exec it carries the parent's high-water mark.
    """
    if threads:
        torch.set_num_threads(threads)
    model = build_network(name, in_channels, out_channels)
    x = torch.randn(1, in_channels, size, size)
    gc.collect()
    before, setup_peak = proc_status_mb("VmRSS"), proc_status_mb("VmHWM")
    if before is not None and setup_peak is not None and reset_peak_rss():
        with torch.no_grad():
            model(x)
        forward_peak = proc_status_mb("VmHWM") or 0.0
        process_peak, method = max(setup_peak, forward_peak), "VmHWM reset before the forward"
    else:  # elsewhere: the high-water mark since start (an upper bound for the forward's increase)
        before = _ru_maxrss_mb()
        with torch.no_grad():
            model(x)
        forward_peak = process_peak = _ru_maxrss_mb()
        method = "ru_maxrss (not resettable here)"
    return {
        "network": name,
        "size": size,
        "process_peak_rss_mb": round(process_peak, 1),
        "forward_peak_rss_mb": round(forward_peak, 1),
        "forward_rss_mb": round(max(forward_peak - before, 0.0), 1),
        "method": method,
    }


def measure_rss(name: str, size: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe_rss", name, str(size)]
    cmd += ["--in_channels", str(args.in_channels), "--out_channels", str(args.out_channels)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"network": name, "size": size, "error": f"RSS probe failed: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import monai

    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(fn: Callable, x: torch.Tensor, device: str) -> float:
    """One forward, in milliseconds (CUDA: AMP float16, synchronised before and after)."""
    _synchronize(device)
    start = time.perf_counter()
    amp = torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), amp:
        fn(x)
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", flush=True)


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def build_models(names: list[str], in_channels: int, out_channels: int, skipped: list[dict]) -> dict[str, nn.Module]:
    models = {}
    for name in names:
        try:
            models[name] = build_network(name, in_channels, out_channels)
        except Exception as e:  # a missing or broken network must not stop the others
            skipped.append({"network": name, "reason": _error_line(e)})
            log(f"skipping {name}: {_error_line(e)}")
    return models


def time_group(
    runners: dict[str, Callable], x: torch.Tensor, device: str, warmup: int, repeats: int, skip: Callable
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """
    Warm each runner up, then time ``repeats`` forwards round-robin over the runners, so slow background
    load is shared fairly. Returns the times (ms) and, on CUDA, the peak allocated MB of the last warm-up.
    A runner that fails is reported through ``skip(name, error)`` and dropped.
    """
    runners = dict(runners)
    times: dict[str, list[float]] = {name: [] for name in runners}
    cuda_peak: dict[str, float] = {}
    for name in list(runners):
        try:
            for i in range(warmup):
                if device == "cuda" and i == warmup - 1:
                    torch.cuda.reset_peak_memory_stats()
                run_once(runners[name], x, device)
            if device == "cuda" and warmup:
                cuda_peak[name] = torch.cuda.max_memory_allocated() / 2**20
        except Exception as e:  # e.g. out of memory: record it, go on with the others
            skip(name, e)
            del runners[name], times[name]
    for _ in range(repeats):
        for name in list(runners):
            try:
                times[name].append(run_once(runners[name], x, device))
            except Exception as e:
                skip(name, e)
                del runners[name], times[name]
    return times, cuda_peak


def benchmark(args: argparse.Namespace) -> dict:
    """Time, count and measure every network of ``args``; the report that is printed and saved."""
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    if "cuda" in devices:
        torch.backends.cudnn.benchmark = True  # autotuned during warm-up, steady state timed
    report: dict = {
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "machine": machine_info(),
        "settings": {
            "batch": 1,
            "in_channels": args.in_channels,
            "out_channels": args.out_channels,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "sizes": args.sizes,
            "modes": args.modes,
            "devices": devices,
            "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
            "cuda_precision": "torch.autocast float16 (AMP)",
        },
        "notes": [FLOPS_NOTE, RSS_NOTE, "latency: median of --repeats forwards after --warmup, no_grad"],
        "skipped": [],
        "results": [],
        "rss": [],
    }
    skipped = report["skipped"]

    models = build_models(args.networks, args.in_channels, args.out_channels, skipped)
    log(f"built {', '.join(models) or 'no network'}")
    params = {name: count_params_m(m) for name, m in models.items()}
    flops: dict[tuple[str, int], float] = {}
    for name, model in models.items():
        for size in args.sizes:
            try:
                flops[(name, size)] = count_gflops(model, torch.randn(1, args.in_channels, size, size))
            except Exception as e:
                skipped.append({"network": name, "size": size, "reason": f"FLOP count: {_error_line(e)}"})
    log("counted FLOPs")

    for device in devices:
        on_device = {name: model.to(device) for name, model in models.items()}
        scripted: dict[str, tuple[nn.Module, str]] = {}
        for size in args.sizes:
            x = torch.randn(1, args.in_channels, size, size, device=device)
            for mode in args.modes:

                def skip(name: str, e: BaseException, mode: str = mode, size: int = size) -> None:
                    entry = {"network": name, "mode": mode, "device": device, "size": size, "reason": _error_line(e)}
                    skipped.append(entry)
                    log(f"skipping {entry}")

                runners: dict[str, Callable] = {}
                how: dict[str, str] = {}
                for name, model in on_device.items():
                    if mode == "eager":
                        runners[name], how[name] = model, "eager"
                        continue
                    if mode == "onnxruntime":
                        if device != "cpu":
                            continue  # ONNX Runtime rows: CPU execution provider only
                        try:
                            runners[name] = onnxruntime_forward_for(model, x, threads=args.threads)
                            how[name] = "onnxruntime-cpu"
                        except Exception as e:  # onnxruntime missing (the ImportError names the extra), export failure
                            skip(name, e)
                        continue
                    try:
                        if name not in scripted or scripted[name][1] != "script":
                            scripted[name] = to_torchscript(model, x)  # a trace is redone per size
                            log(f"{name}: torch.jit.{scripted[name][1]}")
                        runners[name], how[name] = scripted[name]
                    except Exception as e:
                        skip(name, e)
                times, cuda_peak = time_group(runners, x, device, args.warmup, args.repeats, skip)
                for name, samples in times.items():
                    median = statistics.median(samples)
                    gflops = flops.get((name, size))
                    row = {
                        "network": name,
                        "mode": mode,
                        "torchscript": how[name],
                        "device": device + (" amp-fp16" if device == "cuda" else ""),
                        "size": size,
                        "median_ms": round(median, 3),
                        "min_ms": round(min(samples), 3),
                        "max_ms": round(max(samples), 3),
                        "params_m": round(params[name], 3),
                        "gflops": None if gflops is None else round(gflops, 3),
                        "achieved_gflop_s": None if gflops is None else round(gflops / (median / 1e3), 2),
                        "cuda_peak_mb": round(cuda_peak[name], 1) if name in cuda_peak else None,
                    }
                    report["results"].append(row)
                    log(f"{name:<14} {mode:<11} {row['device']:<14} {size:>5}  {median:10.2f} ms")
        if device == "cuda":
            for model in models.values():
                model.to("cpu")
            torch.cuda.empty_cache()

    if not args.no_rss:
        for name in models:
            for size in args.sizes:
                report["rss"].append(measure_rss(name, size, args))
                log(f"peak RSS {name} {size}: {report['rss'][-1]}")
    report["ratios"] = latency_ratios(report["results"])
    report["targets"] = check_targets(report)
    return report


def latency_ratios(results: list[dict]) -> list[dict]:
    """AdaptiveCENet / CENet median latency, eager, per device and size."""
    eager = {(r["device"], r["size"], r["network"]): r["median_ms"] for r in results if r["mode"] == "eager"}
    ratios = []
    for (device, size, name), ms in sorted(eager.items()):
        if name == "AdaptiveCENet" and (device, size, "CENet") in eager:
            ratios.append({"device": device, "size": size, "ratio": round(ms / eager[(device, size, "CENet")], 3)})
    return ratios


def check_targets(report: dict) -> dict:
    cpu_ratios = [r for r in report["ratios"] if r["device"] == "cpu" and r["size"] in DEFAULT_SIZES]
    all_sizes = {r["size"] for r in cpu_ratios} == set(DEFAULT_SIZES)
    at_size = [r for r in report["rss"] if r.get("size") == MEMORY_TARGET_SIZE]
    big = [r for r in at_size if "process_peak_rss_mb" in r]
    failed = [r["network"] for r in at_size if "error" in r]  # e.g. killed for memory: not a pass
    return {
        "latency_ratio": {
            "target": f"AdaptiveCENet/CENet eager CPU <= {LATENCY_RATIO_TARGET} at {DEFAULT_SIZES} px",
            # a miss at any size is a miss; a pass needs all three sizes
            "met": False
            if any(r["ratio"] > LATENCY_RATIO_TARGET for r in cpu_ratios)
            else (True if all_sizes else None),
            "sizes_measured": [r["size"] for r in cpu_ratios],
        },
        "memory": {
            "target": f"process peak RSS <= {MEMORY_TARGET_MB:.0f} MB for a {MEMORY_TARGET_SIZE}^2 CPU forward",
            "met": (not failed and all(r["process_peak_rss_mb"] <= MEMORY_TARGET_MB for r in big)) if at_size else None,
            "networks_measured": [r["network"] for r in big],
            "probe_failed": failed,
        },
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict) -> str:
    rss = {(r["network"], r["size"]): r for r in report["rss"] if "process_peak_rss_mb" in r}
    settings = report["settings"]
    lines = [
        f"command: {report['command']}",
        f"machine: {report['machine']['cpu']}, {report['machine']['logical_cpus']} logical CPUs, "
        f"torch {report['machine']['torch']} ({report['machine']['torch_threads']} threads), "
        f"monai {report['machine']['monai']}, CUDA: {report['machine']['cuda'] or 'none'}",
        f"batch 1, in_channels {settings['in_channels']}, out_channels {settings['out_channels']}, "
        f"median of {settings['repeats']} after {settings['warmup']} warm-up; "
        f"UNet = monai.networks.nets.UNet({', '.join(f'{k}={v}' for k, v in settings['unet_config'].items())})",
        *[f"note: {n}" for n in report["notes"]],
        "",
    ]
    header = (
        f"{'network':<14} {'mode':<11} {'device':<14} {'size':>5} {'median ms':>10} {'params M':>9} "
        f"{'GFLOPs':>9} {'GFLOP/s':>9} {'RSS MB':>8} {'fwd MB':>8} {'CUDA MB':>8}"
    )
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        mem = rss.get((r["network"], r["size"]), {}) if r["device"] == "cpu" and r["mode"] == "eager" else {}
        lines.append(
            f"{r['network']:<14} {r['mode']:<11} {r['device']:<14} {r['size']:>5} {r['median_ms']:>10.2f} "
            f"{r['params_m']:>9.2f} {_fmt(r['gflops'], '9.2f')} {_fmt(r['achieved_gflop_s'], '9.1f')} "
            f"{_fmt(mem.get('process_peak_rss_mb'), '8.0f')} {_fmt(mem.get('forward_rss_mb'), '8.0f')} "
            f"{_fmt(r['cuda_peak_mb'], '8.0f')}"
        )
    torchscript_notes = {r["network"]: r["torchscript"] for r in report["results"] if r["mode"] == "torchscript"}
    for name, how in torchscript_notes.items():
        if how != "script":
            lines.append(f"note: {name} torchscript rows use torch.jit.{how}")
    lines.append("")
    for r in report["ratios"]:
        if r["device"] == "cpu":
            verdict = f"{'meets' if r['ratio'] <= LATENCY_RATIO_TARGET else 'MISSES'} target <= {LATENCY_RATIO_TARGET}"
        else:
            verdict = "information only: the target is on CPU"
        lines.append(f"AdaptiveCENet/CENet eager latency {r['device']} {r['size']}^2: {r['ratio']:.3f} ({verdict})")
    for target in report["targets"].values():
        met = {True: "MET", False: "NOT MET", None: "not measured"}[target["met"]]
        measured = target.get("sizes_measured", target.get("networks_measured"))
        lines.append(f"target: {target['target']}: {met}" + (f" (measured: {measured})" if measured else ""))
    for s in report["skipped"]:
        lines.append(f"skipped: {json.dumps(s)}")
    for r in report["rss"]:
        if "error" in r:
            lines.append(f"RSS {r['network']} {r['size']}: {r['error']}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Latency against input side per (device, mode), and peak RSS when measured; log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    groups = sorted({(r["device"], r["mode"]) for r in report["results"]})
    rss_rows = [r for r in report["rss"] if "process_peak_rss_mb" in r]
    panels = []  # (title, unit, key, rows)
    for device, mode in groups:
        rows = [r for r in report["results"] if (r["device"], r["mode"]) == (device, mode)]
        panels.append((f"{device}, {mode}: median latency", "ms", "median_ms", rows))
    if rss_rows:
        panels.append(("CPU eager forward: process peak RSS", "MB", "process_peak_rss_mb", rss_rows))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.8 * max(len(panels), 1), 4), squeeze=False)
    for ax, (title, unit, key, rows) in zip(axes[0], panels):
        for name in dict.fromkeys(r["network"] for r in rows):
            pts = sorted((r["size"], r[key]) for r in rows if r["network"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if key == "process_peak_rss_mb":
            ax.axhline(MEMORY_TARGET_MB, color="red", linestyle="--", linewidth=1, label="2 GB target")
        sizes = sorted({r["size"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set(title=title, xlabel="input side (px), batch 1", ylabel=unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"{machine['cpu']}, torch {machine['torch']}, {machine['torch_threads']} CPU threads", fontsize=9)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    plt.close(fig)


def _atomic_write(path: Path, write: Callable, binary: bool = False) -> None:
    """Write through a temporary file in the same folder and ``os.replace`` it: never a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _csv(kind: Callable) -> Callable[[str], list]:
    return lambda text: [kind(v.strip()) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", type=_csv(str), default=list(DEFAULT_NETWORKS),
                        help=f"comma-separated, from {', '.join(NETWORKS)} (default: {','.join(DEFAULT_NETWORKS)})")
    parser.add_argument("--sizes", type=_csv(int), default=list(DEFAULT_SIZES),
                        help="comma-separated square input sides, multiples of 32 (default: 256,512,1024)")
    parser.add_argument("--modes", type=_csv(str), default=["eager", "torchscript", "onnxruntime"],
                        help="comma-separated from eager,torchscript,onnxruntime (default: all three; onnxruntime needs the onnx extra)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per network/size/mode (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards first (TorchScript needs >= 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--in_channels", type=int, default=1)
    parser.add_argument("--out_channels", type=int, default=2)
    parser.add_argument("--cpu_only", action="store_true", help="skip CUDA even when present")
    parser.add_argument("--no_rss", action="store_true", help="skip the per-network peak RSS subprocesses")
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--probe_rss", nargs=2, metavar=("NETWORK", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    lookup = {n.lower(): n for n in NETWORKS}
    unknown = [n for n in args.networks if n.lower() not in lookup]
    if unknown:
        parser.error(f"unknown network(s) {unknown}; choose from {', '.join(NETWORKS)}")
    args.networks = [lookup[n.lower()] for n in args.networks]
    bad_sizes = [s for s in args.sizes if s <= 0 or s % 32]
    if bad_sizes:
        parser.error(f"sizes must be positive multiples of 32, got {bad_sizes}")
    bad_modes = [m for m in args.modes if m not in ("eager", "torchscript", "onnxruntime")]
    if bad_modes:
        parser.error(f"unknown mode(s) {bad_modes}; choose from eager, torchscript, onnxruntime")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe_rss:
        name, size = args.probe_rss
        print(json.dumps(probe_rss(name, int(size), args.in_channels, args.out_channels, args.threads)))
        return
    report = benchmark(args)
    text = format_report(report)
    print("\n" + text)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(args.output_dir / "latency.json", lambda f: json.dump(report, f, indent=2))
    plot(report, args.output_dir / "latency.png")
    print(f"\nwrote {args.output_dir / 'latency.json'} and {args.output_dir / 'latency.png'}")


if __name__ == "__main__":
    main()
