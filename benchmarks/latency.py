"""
Latency, parameters, FLOPs and peak memory of AdaptiveCENet and its baselines (issues 2 and 11), per
precision/runtime mode, and the fetal-head bundle end to end.

Three tables, one process:

1. **Model only**: every network at every size in every mode (``fp32-eager``, ``fp32`` = channels_last,
   ``bf16``, ``int8`` = ONNX Runtime QDQ, ``torchscript``, ``onnxruntime``; see ``fast_modes.py``), on CPU
   and (when present) on CUDA with AMP float16. Within one (device, mode, size) group the repeats go
   round-robin over the networks, so slow background load hits all of them alike. The
   AdaptiveCENet/CENet ratio is reported per mode. Peak RSS of a CPU forward is measured per network
   and size in a fresh subprocess (so the allocator state of other networks does not leak into it).
2. **End to end** (``end_to_end.py``): the fetal bundle's real ``run inference`` over ``--e2e_images``
   real HC18 images from disk to masks + ``head_circumference.csv``, per mode: images/s and ms per image
   and stage from ``runner.profile``, in the Model Zoo's form (model computation vs end to end).
3. **Parity** (``--parity_dir`` with ``--ckpt``): per mode, masks and head circumferences against
   fp32-eager and Dice against the ground truth on the test split of an HC18 folder.

The CPU model and its ISA flags (``custom_nets.engines.fast_path.cpu_info``), torch and onnxruntime
versions head the printout and the JSON. Writes ``latency.json`` and ``latency.png`` to ``--output_dir``.

Full measurement (roughly 45 minutes on 2 quiet CPU cores: emulated bf16 and the INT8 quantizations take most)::

    python benchmarks/latency.py --threads 2 --repeats 10 --warmup 3

Quick smoke run::

    python benchmarks/latency.py --networks UNet --sizes 64 --repeats 1 --warmup 1 --modes fp32-eager --e2e_images 0
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from custom_nets.atomic_write import atomic_path, write_text_atomic
from custom_nets.deploy.onnx_runtime import onnxruntime_forward_for
from custom_nets.engines.fast_path import choose_precision, cpu_info
from custom_nets.errors import InputError
from custom_nets.networks import registry
from custom_nets.networks.registry import NETWORKS

# benchmarks/ is on sys.path when run as a script
import end_to_end
from fast_modes import bf16_is_emulated, describe_isa, fast_forward, int8_forward
from process_memory import proc_status_mb, reset_peak_rss

DEFAULT_NETWORKS = ("AdaptiveCENet", "CENet", "UNet", "ResNetUNet34")
DEFAULT_SIZES = (256, 512, 1024)
#: Model-only modes; ``eager`` is kept as another name of ``fp32-eager`` (earlier commands use it).
MODES = ("fp32-eager", "fp32", "bf16", "int8", "torchscript", "onnxruntime")
MODE_ALIASES = {"eager": "fp32-eager"}
PRECISION_MODES = ("fp32", "bf16", "int8")  # issue 11: the ratio target holds in each of these too
ENGINES = {
    "fp32-eager": "PyTorch eager",
    "fp32": "PyTorch channels_last",
    "bf16": "PyTorch autocast bf16 + channels_last",
    "int8": "ONNX Runtime INT8 QDQ",
    "onnxruntime": "ONNX Runtime fp32",
}
LATENCY_RATIO_TARGET = 0.9  # AdaptiveCENet / CENet, CPU, every size (issue 2: eager; issue 11: every mode)
SPEEDUP_TARGET = 2.5  # issue 11: AdaptiveCENet at 256^2, best fast mode vs fp32-eager
SPEEDUP_SIZE = 256
DEFAULT_E2E_SIZE = 256  # the fetal bundle's network input
E2E_TARGET_IMAGES_PER_S = 30.0  # issue 11: fetal head end to end on a CPU with AMX or AVX-512-BF16/VNNI
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
    return registry.build_network(name, spatial_dims=2, in_channels=in_channels, out_channels=out_channels).eval()


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

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    isa = cpu_info()
    info = {
        "cpu": cpu,
        "cpu_info": isa,
        "isa": describe_isa(isa),
        "bf16_emulated": bf16_is_emulated(isa),
        "onnxruntime": ort_version,
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


def engine_of(mode: str, how: str) -> str:
    """What runs a row, e.g. ``"PyTorch autocast bf16 + channels_last (emulated)"``, ``"torch.jit.script"``."""
    if mode == "torchscript":
        return f"torch.jit.{how}"
    emulated = " (emulated: no native bf16)" if mode == "bf16" and bf16_is_emulated() else ""
    return ENGINES[mode] + emulated


def network_def(name: str, args: argparse.Namespace) -> dict:
    """The bundle-config ``network_def`` of a benchmarked network (how the INT8 quantizer builds it)."""
    return registry.network_def(name, spatial_dims=2, in_channels=args.in_channels, out_channels=args.out_channels)


def precision_runner(name: str, model: nn.Module, mode: str, size: int, args: argparse.Namespace, workdir: Path) -> Callable:
    """The ``fp32``/``bf16``/``int8`` forward of ``model`` at ``size`` (int8: quantized here, calibrated on real HC18 images)."""
    if mode != "int8":
        return fast_forward(model, mode)
    if args.in_channels != 1:
        raise InputError(f"int8 calibration uses the fetal bundle's 1-channel preprocessing, not --in_channels {args.in_channels}")
    images = args.data_dir / "training_set"
    if not images.is_dir():
        raise InputError(f"{images}: calibration images not found; set --data_dir to an HC18 folder")
    forward, quantized = int8_forward(model.cpu(), network_def(name, args), size, images, workdir / f"int8_{name}",
                                      num_inputs=args.calibration_inputs, threads=args.threads)  # fmt: skip
    log(f"{name} int8 at {size}: {quantized['calibration_inputs']} calibration images, arg-max agreement with fp32 "
        f"{quantized['argmax_agreement_mean']:.4f} (random weights)")  # fmt: skip
    return forward


def benchmark(args: argparse.Namespace) -> dict:
    """Time, count and measure every network of ``args``; the report that is printed and saved."""
    with end_to_end.scratch_dir() as tmp:  # checkpoints, INT8 models, pipeline outputs
        return _benchmark(args, Path(tmp))


def _benchmark(args: argparse.Namespace, workdir: Path) -> dict:
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
            "unet_config": {k: v for k, v in NETWORKS["UNet"].items() if k != "_target_"},
            "cuda_precision": "torch.autocast float16 (AMP)",
            "data_dir": str(args.data_dir),
            "calibration_inputs": args.calibration_inputs,
            "e2e_images": args.e2e_images,
            "image_size": args.image_size,
            "ckpt": str(args.ckpt) if args.ckpt else "random weights (seed 0)",
            "int8_model": str(args.int8_model) if args.int8_model else None,
        },
        "notes": [FLOPS_NOTE, RSS_NOTE, "latency: median of --repeats forwards after --warmup, no_grad"],
        "skipped": [],
        "results": [],
        "rss": [],
        "end_to_end": [],
        "parity": None,
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
                    if mode == "fp32-eager":
                        runners[name], how[name] = model, "eager"
                        continue
                    if mode in PRECISION_MODES:
                        if device != "cpu":
                            continue  # the fast CPU paths; CUDA rows are fp32-eager/torchscript under AMP
                        try:
                            runners[name], how[name] = precision_runner(name, model, mode, size, args, workdir), mode
                        except Exception as e:  # e.g. onnxruntime missing, no calibration images
                            skip(name, e)
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
                        "engine": engine_of(mode, how[name]),
                        "emulated": mode == "bf16" and report["machine"]["bf16_emulated"],
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
                    log(f"{name:<14} {mode:<11} {row['device']:<14} {size:>5}  {median:10.2f} ms  {row['engine']}")
        if device == "cuda":
            for model in models.values():
                model.to("cpu")
            torch.cuda.empty_cache()

    if not args.no_rss:
        for name in models:
            for size in args.sizes:
                report["rss"].append(measure_rss(name, size, args))
                log(f"peak RSS {name} {size}: {report['rss'][-1]}")
    run_end_to_end(args, report, workdir)
    if args.parity_dir:
        report["parity"] = end_to_end.parity(
            args.parity_dir, [m for m in args.modes if m in end_to_end.E2E_MODES], args.ckpt, args.int8_model,
            args.image_size, workdir / "parity", split=args.parity_split, limit=args.parity_images or None,
            calibration_inputs=args.calibration_inputs, min_dice=args.int8_min_dice, log=log,
        )  # fmt: skip
        skipped.extend(report["parity"]["skipped"])
    report["ratios"] = latency_ratios(report["results"])
    report["targets"] = check_targets(report)
    return report


def run_end_to_end(args: argparse.Namespace, report: dict, workdir: Path) -> None:
    """The fetal bundle end to end per mode over ``--e2e_images`` real HC18 images (skipped when 0)."""
    modes = [m for m in args.modes if m in end_to_end.E2E_MODES]
    if not args.e2e_images or not modes:
        return
    try:
        images = end_to_end.hc18_images(args.data_dir / "training_set", args.e2e_images)
    except InputError as e:
        report["skipped"].append({"table": "end_to_end", "reason": str(e)})
        log(f"end to end: skipped: {e}")
        return
    ckpt = args.ckpt or end_to_end.random_checkpoint(workdir / "e2e" / "model.pt")
    int8_model = args.int8_model
    if "int8" in modes and int8_model is None:
        calibration = end_to_end.hc18_images(args.data_dir / "training_set", 10**9)
        try:
            int8_model = end_to_end.make_int8_model(  # random weights: timed only, the quantizer's Dice guard is off
                ckpt, calibration, workdir / "e2e", args.image_size, args.calibration_inputs, args.int8_min_dice if args.ckpt else 0.0
            )
        except Exception as e:  # e.g. onnxruntime missing: the int8 row then carries the bundle's own refusal
            log(f"end to end: no INT8 model: {_error_line(e)}")
    auto = choose_precision("auto", "cpu", int8_model, checkpoint=ckpt)
    report["end_to_end_settings"] = {
        "bundle": "bundles/fetal_head_us_segmentation (configs/inference.json, runner.run())",
        "images": len(images),
        "first_image": Path(images[0]).name,
        "image_size": args.image_size,
        "warmup_images": args.e2e_warmup,
        "weights": str(args.ckpt) if args.ckpt else "random weights (seed 0): timing only, masks are meaningless",
        "int8_model": str(int8_model) if args.int8_model else "made from the checkpoint by quantize_bundle (training_set images)",
        "auto_picks": f"{auto.precision}: {auto.reason}",
    }
    log(f"end to end: {len(images)} images, auto picks {auto.precision} ({auto.reason})")
    csv = args.data_dir / end_to_end.PIXEL_SIZE_CSV
    rows, skipped = end_to_end.end_to_end(
        modes, images, ckpt, int8_model, csv if csv.is_file() else None, args.image_size, workdir, warmup=args.e2e_warmup, log=log
    )
    report["end_to_end"] = rows
    report["skipped"].extend(skipped)


def latency_ratios(results: list[dict]) -> list[dict]:
    """AdaptiveCENet / CENet median latency per device, mode and size."""
    ms = {(r["device"], r["mode"], r["size"], r["network"]): r["median_ms"] for r in results}
    ratios = []
    for (device, mode, size, name), value in ms.items():
        if name == "AdaptiveCENet" and (device, mode, size, "CENet") in ms:
            ratio = round(value / ms[(device, mode, size, "CENet")], 3)
            ratios.append({"device": device, "mode": mode, "size": size, "ratio": ratio})
    return ratios


def _ratio_target(ratios: list[dict], modes: tuple[str, ...]) -> bool | None:
    """False on any miss; True only when every mode of ``modes`` was measured at every default size."""
    if any(r["ratio"] > LATENCY_RATIO_TARGET for r in ratios):
        return False
    return True if {(r["mode"], r["size"]) for r in ratios} >= {(m, s) for m in modes for s in DEFAULT_SIZES} else None


def _speedup_target(results: list[dict]) -> dict:
    """AdaptiveCENet at 256^2 on CPU: the best of fp32/bf16/int8 against fp32-eager (emulated bf16 left out)."""
    rows = {r["mode"]: r for r in results if r["network"] == "AdaptiveCENet" and r["size"] == SPEEDUP_SIZE and r["device"] == "cpu"}
    fast = {m: r["median_ms"] for m, r in rows.items() if m in PRECISION_MODES and not r["emulated"]}
    target = f"AdaptiveCENet {SPEEDUP_SIZE}^2 network alone >= {SPEEDUP_TARGET}x faster than fp32-eager"
    if "fp32-eager" not in rows or not fast:
        return {"target": target, "met": None}
    best = min(fast, key=fast.get)
    speedup = rows["fp32-eager"]["median_ms"] / fast[best]
    return {"target": target, "met": speedup >= SPEEDUP_TARGET, "best_mode": best, "speedup": round(speedup, 2)}


def _e2e_target(report: dict) -> dict:
    """Fetal head end to end: the best mode's images/s; the 30 images/s target is for CPUs with AMX or AVX-512-BF16/VNNI."""
    flags = set(report["machine"]["cpu_info"]["flags"])
    applies = bool(flags & {"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni"})
    target = (
        f">= {E2E_TARGET_IMAGES_PER_S:.0f} images/s end to end (fetal head, {DEFAULT_E2E_SIZE}^2) "
        "on a CPU with AMX or AVX-512-BF16/VNNI"
    )
    rows = [r for r in report["end_to_end"] if "emulated" not in r["mode"]]
    if not rows:
        return {"target": target, "met": None}
    best = max(rows, key=lambda r: r["images_per_second"])
    result = {"target": target, "best_mode": best["mode"], "images_per_second": best["images_per_second"]}
    sized = report["settings"]["image_size"] == DEFAULT_E2E_SIZE
    if not applies:  # issue 11: "on a CPU without them, the best mode that CPU has and its figure"
        return {**result, "met": None, "note": "this CPU has neither: information only"}
    return {**result, "met": best["images_per_second"] >= E2E_TARGET_IMAGES_PER_S if sized else None}


def check_targets(report: dict) -> dict:
    cpu_ratios = [r for r in report["ratios"] if r["device"] == "cpu" and r["mode"] == "fp32-eager" and r["size"] in DEFAULT_SIZES]
    all_sizes = {r["size"] for r in cpu_ratios} == set(DEFAULT_SIZES)
    fast_ratios = [r for r in report["ratios"] if r["device"] == "cpu" and r["mode"] in PRECISION_MODES and r["size"] in DEFAULT_SIZES]
    parity = report.get("parity") or {}
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
        "latency_ratio_fast_modes": {
            "target": f"AdaptiveCENet/CENet CPU <= {LATENCY_RATIO_TARGET} in {', '.join(PRECISION_MODES)} at {DEFAULT_SIZES} px",
            "met": _ratio_target(fast_ratios, PRECISION_MODES),
            "sizes_measured": sorted({f"{r['mode']} {r['size']}" for r in fast_ratios}),
        },
        "network_speedup": _speedup_target(report["results"]),
        "end_to_end": _e2e_target(report),
        "parity": {
            "target": "per image Dice >= 0.99 and |HC diff| <= 0.3 mm vs fp32-eager; mean GT Dice drop <= 0.005",
            "met": all(s["met"] for s in parity["summary"].values()) if parity else None,
            "modes_measured": sorted(parity["summary"]) if parity else [],
        },
        "memory": {
            "target": f"process peak RSS <= {MEMORY_TARGET_MB:.0f} MB for a {MEMORY_TARGET_SIZE}^2 CPU forward",
            "met": (not failed and all(r["process_peak_rss_mb"] <= MEMORY_TARGET_MB for r in big)) if at_size else None,
            "networks_measured": [r["network"] for r in big],
            "probe_failed": failed,
        },
    }


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``; a missing value is ``-``, padded to the spec's width so columns stay aligned."""
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())
    return format("-", f">{width}") if value is None else format(value, spec)


def format_report(report: dict) -> str:
    """The header (command, machine, ISA), the model-only table, ratios, end-to-end and parity tables, targets."""
    machine, settings = report["machine"], report["settings"]
    lines = [
        f"command: {report['command']}",
        f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), onnxruntime {machine['onnxruntime'] or 'not installed'}, "
        f"monai {machine['monai']}, CUDA: {machine['cuda'] or 'none'}",
        f"ISA: {machine['isa']}",
        f"batch 1, in_channels {settings['in_channels']}, out_channels {settings['out_channels']}, "
        f"median of {settings['repeats']} after {settings['warmup']} warm-up; "
        f"UNet = monai.networks.nets.UNet({', '.join(f'{k}={v}' for k, v in settings['unet_config'].items())})",
        *[f"note: {n}" for n in report["notes"]],
        "",
    ]
    lines += _model_table(report)
    lines += _end_to_end_table(report)
    lines += _parity_table(report.get("parity"))
    for target in report["targets"].values():
        met = {True: "MET", False: "NOT MET", None: "not measured"}[target["met"]]
        details = ", ".join(f"{k} {v}" for k, v in target.items() if k not in ("target", "met") and v not in (None, []))
        lines.append(f"target: {target['target']}: {met}" + (f" ({details})" if details else ""))
    for s in report["skipped"]:
        lines.append(f"skipped: {json.dumps(s)}")
    for r in report["rss"]:
        if "error" in r:
            lines.append(f"RSS {r['network']} {r['size']}: {r['error']}")
    return "\n".join(lines)


def _model_table(report: dict) -> list[str]:
    rss = {(r["network"], r["size"]): r for r in report["rss"] if "process_peak_rss_mb" in r}
    header = (
        f"{'network':<14} {'mode':<11} {'device':<14} {'size':>5} {'median ms':>10} {'params M':>9} "
        f"{'GFLOPs':>9} {'GFLOP/s':>9} {'RSS MB':>8} {'fwd MB':>8} {'CUDA MB':>8}  engine"
    )
    lines = ["model only", header, "-" * len(header)]
    for r in report["results"]:
        mem = rss.get((r["network"], r["size"]), {}) if r["device"] == "cpu" and r["mode"] == "fp32-eager" else {}
        lines.append(
            f"{r['network']:<14} {r['mode']:<11} {r['device']:<14} {r['size']:>5} {r['median_ms']:>10.2f} "
            f"{r['params_m']:>9.2f} {_fmt(r['gflops'], '9.2f')} {_fmt(r['achieved_gflop_s'], '9.1f')} "
            f"{_fmt(mem.get('process_peak_rss_mb'), '8.0f')} {_fmt(mem.get('forward_rss_mb'), '8.0f')} "
            f"{_fmt(r['cuda_peak_mb'], '8.0f')}  {r['engine']}"
        )
    lines.append("")
    for r in report["ratios"]:
        if r["device"] == "cpu":
            verdict = f"{'meets' if r['ratio'] <= LATENCY_RATIO_TARGET else 'MISSES'} target <= {LATENCY_RATIO_TARGET}"
        else:
            verdict = "information only: the target is on CPU"
        emulated = " (bf16 emulated)" if r["mode"] == "bf16" and report["machine"]["bf16_emulated"] else ""
        lines.append(f"AdaptiveCENet/CENet {r['mode']} latency {r['device']} {r['size']}^2: {r['ratio']:.3f} ({verdict}){emulated}")
    return lines + [""]


def _end_to_end_table(report: dict) -> list[str]:
    """The Model Zoo's form (model computation vs end to end, ms per image, speed-up) and the stages."""
    rows = report["end_to_end"]
    if not rows:
        return []
    e2e = report["end_to_end_settings"]
    base = next((r for r in rows if r["mode"] == "fp32-eager"), None)
    others = [r for r in rows if r is not base] if base else []  # speed-up columns: over fp32-eager
    lines = [
        f"end to end: fetal head bundle `run inference`, {e2e['images']} real HC18 images from disk "
        f"(from {e2e['first_image']}) to masks + head_circumference.csv, network input {e2e['image_size']}^2, {e2e['warmup_images']} warm-up image(s) first",
        f"weights: {e2e['weights']}; auto picks {e2e['auto_picks']}",
        "| method | " + " | ".join([f"{r['mode']} (ms)" for r in rows] + [f"speedup {r['mode']}" for r in others]) + " |",
        "|---|" + "---|" * (len(rows) + len(others)),
    ]
    for label, key in (("model computation", "network_ms"), ("end2end", "wall_ms")):
        cells = [_fmt(r["stages_ms"].get(key), ".1f") for r in rows]
        if base:
            cells += [_fmt(base["stages_ms"][key] / r["stages_ms"][key] if r["stages_ms"].get(key) else None, ".2f") for r in others]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    stages = list(dict.fromkeys(k for r in rows for k in r["stages_ms"] if k != "wall_ms"))
    header = f"{'mode':<16} {'images/s':>9} {'wall ms':>8} " + " ".join(f"{k.removesuffix('_ms'):>18}" for k in stages)
    lines += ["", "ms per image per stage (stages overlap: prefetch and output threads)", header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['mode']:<16} {r['images_per_second']:>9.2f} {r['stages_ms']['wall_ms']:>8.1f} "
            + " ".join(_fmt(r["stages_ms"].get(k), "18.1f") for k in stages)
            + (f"  ({r['failed']} failed)" if r["failed"] else "")
        )
    for r in rows:
        lines.append(f"{r['mode']}: {r['path']}")
    return lines + [""]


def _parity_table(parity: dict | None) -> list[str]:
    if not parity:
        return []
    b = parity["bounds"]
    lines = [
        f"parity: {parity['images']} {parity['split']}-split images of {parity['hc18_dir']}, reference {parity['reference']}; "
        f"bounds: Dice >= {b['dice_vs_fp32']}, |HC diff| <= {b['hc_diff_mm']} mm, GT Dice drop <= {b['gt_dice_drop']}",
        "| mode | Dice vs fp32 mean | min | HC diff mean mm | max mm | GT Dice mean | min | GT drop mean "
        "| within Dice | within HC | within GT drop | met |",
        "|---|" + "---|" * 11,
    ]
    for mode, s in parity["summary"].items():
        mode += " (emulated)" if "emulated" in s["path"] else ""
        if not s.get("images"):
            lines.append(f"| {mode} | all {s['failed']} image(s) failed |" + " |" * 10)
            continue
        w = s["share_within"]
        lines.append(
            f"| {mode} | {s['dice_vs_fp32_mean']:.4f} | {s['dice_vs_fp32_min']:.4f} | {_fmt(s['hc_diff_mm_mean'], '.3f')} "
            f"| {_fmt(s['hc_diff_mm_max'], '.3f')} | {s['gt_dice_mean']:.4f} | {s['gt_dice_min']:.4f} | {s['gt_dice_drop_mean']:+.4f} "
            f"| {w['dice_vs_fp32']:.0%} | {w['hc_diff_mm']:.0%} | {w['gt_dice_drop']:.0%} | {'yes' if s['met'] else 'NO'} |"
        )
    return lines + [""]


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
        panels.append(("CPU fp32-eager forward: process peak RSS", "MB", "process_peak_rss_mb", rss_rows))
    cols = min(max(len(panels), 1), 4)
    grid = -(-max(len(panels), 1) // cols)
    fig, axes = plt.subplots(grid, cols, figsize=(4.8 * cols, 4 * grid), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, unit, key, rows) in zip(axes.flat, panels):
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _csv(kind: Callable) -> Callable[[str], list]:
    return lambda text: [kind(v.strip()) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", type=_csv(str), default=list(DEFAULT_NETWORKS),
                        help=f"comma-separated, from {', '.join(NETWORKS)} (default: {','.join(DEFAULT_NETWORKS)})")
    parser.add_argument("--sizes", type=_csv(int), default=list(DEFAULT_SIZES),
                        help="comma-separated square input sides, multiples of 32 (default: 256,512,1024)")
    parser.add_argument("--modes", type=_csv(str), default=list(MODES),
                        help=f"comma-separated from {','.join(MODES)} (default: all; 'eager' = fp32-eager); fp32-eager, fp32, "
                             "bf16 and int8 also make the end-to-end and parity tables; int8 and onnxruntime need onnxruntime")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per network/size/mode (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards first (TorchScript needs >= 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--in_channels", type=int, default=1)
    parser.add_argument("--out_channels", type=int, default=2)
    parser.add_argument("--cpu_only", action="store_true", help="skip CUDA even when present")
    parser.add_argument("--no_rss", action="store_true", help="skip the per-network peak RSS subprocesses")
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--data_dir", type=Path, default=end_to_end.default_hc18_dir(),
                        help="HC18 folder (training_set/, pixel-size CSV): int8 calibration and end-to-end images "
                             "(default: $SHARED_DATA/hc18_subset or ../shared/data/hc18_subset)")
    parser.add_argument("--calibration_inputs", type=int, default=8, help="real images per INT8 calibration (default 8)")
    parser.add_argument("--e2e_images", type=int, default=100, help="images of the end-to-end table (default 100; 0: no table)")
    parser.add_argument("--e2e_warmup", type=int, default=2, help="untimed images before each end-to-end run (default 2)")
    parser.add_argument("--image_size", type=int, default=DEFAULT_E2E_SIZE, help="network input of the bundle runs (default 256)")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="trained model.pt of the fetal bundle (default: random weights, timing only)")
    parser.add_argument("--int8_model", type=Path, default=None,
                        help="INT8 model made from --ckpt by `custom_nets.deploy quantize` (default: made here)")
    parser.add_argument("--int8_min_dice", type=float, default=None,
                        help="the quantizer's guard for the INT8 model made from --ckpt (default: its own, 0.98); "
                             "0 shows the parity of a model it would refuse")
    parser.add_argument("--parity_dir", type=Path, default=None,
                        help="HC18 folder for the parity table (needs --ckpt); its test split is compared")
    parser.add_argument("--parity_split", default="test", choices=("training", "validation", "test", "all"))
    parser.add_argument("--parity_images", type=int, default=0, help="first N images of the split (default 0: all)")
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
    args.modes = list(dict.fromkeys(MODE_ALIASES.get(m, m) for m in args.modes))
    bad_modes = [m for m in args.modes if m not in MODES]
    if bad_modes:
        parser.error(f"unknown mode(s) {bad_modes}; choose from {', '.join(MODES)}")
    if args.parity_dir and not args.ckpt:
        parser.error("--parity_dir needs --ckpt (a trained model.pt of the fetal bundle): parity of random weights says nothing")
    for option in ("ckpt", "int8_model"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            parser.error(f"--{option} {path}: file not found")
    if args.parity_dir and not (args.parity_dir / end_to_end.PIXEL_SIZE_CSV).is_file():
        parser.error(f"--parity_dir {args.parity_dir}: not an HC18 folder (no {end_to_end.PIXEL_SIZE_CSV})")
    if args.image_size <= 0 or args.image_size % 32 or args.e2e_images < 0 or args.calibration_inputs < 1:
        parser.error("--image_size must be a positive multiple of 32, --e2e_images >= 0 and --calibration_inputs >= 1")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe_rss:
        name, size = args.probe_rss
        print(json.dumps(probe_rss(name, int(size), args.in_channels, args.out_channels, args.threads)))
        return
    try:
        if args.ckpt:
            end_to_end.check_checkpoint(args.ckpt)
        report = benchmark(args)
    except InputError as e:  # a file or folder the user gave cannot be used: one line, no traceback
        sys.exit(f"latency.py: error: {e}")
    text = format_report(report)
    print("\n" + text)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output_dir / "latency.json", json.dumps(report, indent=2))
    plot(report, args.output_dir / "latency.png")
    print(f"\nwrote {args.output_dir / 'latency.json'} and {args.output_dir / 'latency.png'}")


if __name__ == "__main__":
    main()
