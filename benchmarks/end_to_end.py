"""
End to end and parity figures of ``benchmarks/latency.py``: the fetal-head bundle's real ``run inference``.

The pipeline is built with ``monai.bundle.ConfigParser`` from ``bundles/fetal_head_us_segmentation/
configs/inference.json`` exactly as ``python -m monai.bundle run --config_file configs/inference.json``
builds it (``initialize``, then ``runner.run()``), with only these overrides: the checkpoint, the
INT8 model, the output folder, the HC18 pixel-size CSV (head circumference in mm), the list of
inputs, ``device`` = CPU, ``runner#exit_code_on_failure`` = None (a failed image is counted, not an
exit) and the precision:

==============  ==================================================================================
mode            override
==============  ==================================================================================
``fp32-eager``  ``fast_network`` = ``@network`` (the pipeline without the fast path)
``fp32``        ``precision`` = ``fp32`` (channels_last)
``bf16``        ``precision`` = ``bf16``; on a CPU without native bf16 the bundle refuses it, so there
                ``fast_network`` = ``FastForward(@network, 'bf16', @device)`` (oneDNN emulation), labelled
                ``emulated``
``int8``        ``precision`` = ``int8`` with an INT8 model made from the same ``model.pt``
==============  ==================================================================================

:func:`end_to_end` times the pipeline over real HC18 images (images/s and ``runner.profile``'s ms per
image and stage); :func:`parity` compares each mode's masks and head circumferences with ``fp32-eager``
and with the ground truth on the test split of an HC18 folder.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from PIL import Image

from custom_nets.engines.folder_inference import list_images, one_line_error
from custom_nets.errors import InputError
from fast_modes import FETAL_BUNDLE, bf16_is_emulated

__all__ = [
    "E2E_MODES",
    "PARITY_BOUNDS",
    "default_hc18_dir",
    "random_checkpoint",
    "check_checkpoint",
    "make_int8_model",
    "run_pipeline",
    "end_to_end",
    "dice",
    "parity",
]

E2E_MODES = ("fp32-eager", "fp32", "bf16", "int8")
#: Issue 11: per image Dice >= 0.99 and |HC difference| <= 0.3 mm vs fp32; mean Dice vs ground truth drops <= 0.005.
PARITY_BOUNDS = {"dice_vs_fp32": 0.99, "hc_diff_mm": 0.3, "gt_dice_drop": 0.005}
REFERENCE_MODE = "fp32-eager"
PIXEL_SIZE_CSV = "training_set_pixel_size_and_HC.csv"


def default_hc18_dir() -> Path:
    """The real HC18 sample: ``$SHARED_DATA/hc18_subset``, else ``../shared/data/hc18_subset`` beside the repository."""
    shared = os.environ.get("SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(shared) / "hc18_subset"


def _parser(
    mode: str, inputs: list[dict], ckpt: Path, int8_model: Path | None, output_dir: Path, pixel_size_csv: Path | None, image_size: int
) -> ConfigParser:
    """The bundle's inference config with the benchmark's overrides for ``mode`` (see the module docstring)."""
    parser = ConfigParser()
    parser.read_config(str(FETAL_BUNDLE / "configs" / "inference.json"))
    overrides = {
        "bundle_root": str(FETAL_BUNDLE),
        "ckpt_path": str(ckpt),
        "int8_model": str(int8_model) if int8_model else None,
        "output_dir": str(output_dir),
        "pixel_size_csv": str(pixel_size_csv) if pixel_size_csv else None,
        "image_size": image_size,
        "device": "$torch.device('cpu')",
        "runner#exit_code_on_failure": None,
        "runner#inputs": inputs,  # instead of the whole --input_dir folder
    }
    if mode == "fp32-eager":
        overrides["fast_network"] = "@network"
    elif mode == "bf16" and bf16_is_emulated():
        overrides["fast_network"] = "$custom_nets.engines.fast_path.FastForward(@network, 'bf16', @device)"
    else:
        overrides["precision"] = mode
    for key, value in overrides.items():
        parser[key] = value
    return parser


def random_checkpoint(path: Path, seed: int = 0) -> Path:
    """A ``model.pt`` of the bundle's ``network_def`` with seeded random weights (timing needs no training)."""
    parser = ConfigParser()
    parser.read_config(str(FETAL_BUNDLE / "configs" / "inference.json"))
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def check_checkpoint(ckpt: Path) -> None:
    """
    Load ``ckpt`` into the bundle's ``network_def`` now, so a wrong file stops the run before the long tables.

    Raises:
        InputError: one line naming the file and the problem.
    """
    from custom_nets.checkpoints import load_checkpoint

    parser = ConfigParser()
    parser.read_config(str(FETAL_BUNDLE / "configs" / "inference.json"))
    try:
        parser.get_parsed_content("network_def").load_state_dict(load_checkpoint(ckpt, map_location="cpu"))
    except RuntimeError as e:  # missing/unexpected keys, other shapes: another network's weights
        raise InputError(f"{ckpt}: not a model.pt of the fetal bundle's network ({_error_line(e)})") from None


def make_int8_model(
    ckpt: Path, calibration_images: Sequence[str], workdir: Path, image_size: int, num_inputs: int, min_dice: float | None = None
) -> Path:
    """
    The bundle's INT8 model of ``ckpt`` (``custom_nets.deploy quantize``), calibrated on ``calibration_images`` only.

    ``min_dice``: the quantizer's guard (INT8 vs fp32 masks on the calibration inputs); None keeps its default,
    so a trained model gets exactly the INT8 model a user would get (or its refusal). Random weights pass 0:
    their INT8 model is only timed.

    Raises:
        QuantizationError: the INT8 masks are too far from fp32 (the message has the Dice).
    """
    from custom_nets.deploy.quantize import quantize_bundle

    calibration_dir = workdir / "calibration"  # quantize_bundle reads a folder: links to exactly these images
    calibration_dir.mkdir(parents=True, exist_ok=True)
    for image in calibration_images:
        link = calibration_dir / Path(image).name
        if not link.exists():
            link.symlink_to(Path(image).resolve())
    out = workdir / "model_int8.onnx"
    quantize_bundle(
        FETAL_BUNDLE, calibration_dir, output=str(out), ckpt_file=str(ckpt), num_inputs=num_inputs,
        overrides={"image_size": image_size, "device": "$torch.device('cpu')"},
        **({} if min_dice is None else {"min_dice": min_dice}),
    )  # fmt: skip
    return out


class _PathLog(logging.Handler):
    """Keeps the fast path's one log line (which path it took and why)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_pipeline(
    mode: str,
    inputs: Sequence[str | dict],
    ckpt: Path,
    int8_model: Path | None,
    output_dir: Path,
    pixel_size_csv: Path | None,
    image_size: int,
    warmup: int = 0,
) -> dict:
    """
    Build the bundle's pipeline for ``mode``, run it on the first ``warmup`` inputs (untimed: oneDNN
    primitives, ONNX Runtime arenas), then on all ``inputs``.

    Returns:
        ``rows`` (the results table, with the ``mask`` file name), ``profile`` (``runner.profile``), ``path``
        (the fast path's log line), ``outputs`` (mask files written), ``csv_rows`` (rows of the
        ``head_circumference.csv`` written).

    Raises:
        InputError: the bundle refuses the mode here (its one line, e.g. no INT8 model).
    """
    items = [dict(i) if isinstance(i, dict) else {"image": os.fspath(i)} for i in inputs]
    parser = _parser(mode, items, ckpt, int8_model, output_dir, pixel_size_csv, image_size)
    handler, path_logger = _PathLog(), logging.getLogger("custom_nets.engines.fast_path")
    level = path_logger.level
    path_logger.addHandler(handler)
    path_logger.setLevel(logging.INFO)
    try:
        parser.get_parsed_content("initialize")  # as `monai.bundle run`: weights loaded, determinism set
        runner = parser.get_parsed_content("runner")
    finally:
        path_logger.removeHandler(handler)
        path_logger.setLevel(level)
    if warmup:
        runner.inputs = items[:warmup]
        runner.run()
    runner.inputs = items
    rows = [{k: _number(v) if k == "hc_mm" else v for k, v in row.items()} for row in runner.run()]
    if handler.lines:
        path = handler.lines[-1]
    elif mode == "bf16":
        path = "inference path: bf16 emulated by oneDNN (this CPU has no native bf16; the bundle refuses it, FastForward runs it)"
    else:
        path = "inference path: fp32 eager PyTorch (fast_network = @network: the pipeline without the fast path)"
    return {
        "rows": rows,
        "profile": dict(runner.profile),
        "path": path,
        "outputs": len([p for p in output_dir.iterdir() if p.suffix == ".png"]),
        "csv_rows": _csv_rows(output_dir / "head_circumference.csv"),
    }


def _number(cell: object) -> object:
    """A table cell as a float when it is one (``FolderInference.run`` returns the cells as written to the CSV)."""
    try:
        return float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return cell


def _csv_rows(path: Path) -> int:
    """Data rows of a CSV the pipeline wrote (0 when it is missing)."""
    if not path.is_file():
        return 0
    with open(path, newline="", encoding="utf-8") as f:
        return max(sum(1 for _ in csv.reader(f)) - 1, 0)


def _error_line(e: BaseException) -> str:
    """The innermost cause in one line (MONAI wraps config errors as ``Failed to evaluate ...``)."""
    return one_line_error(e)


def end_to_end(
    modes: Sequence[str],
    images: Sequence[str],
    ckpt: Path,
    int8_model: Path | None,
    pixel_size_csv: Path | None,
    image_size: int,
    workdir: Path,
    warmup: int = 2,
    log=print,
) -> tuple[list[dict], list[dict]]:
    """
    Time the bundle's pipeline per mode over ``images`` (files to masks + ``head_circumference.csv``).

    Returns the rows (mode, images/s, ms per image per stage, the path line) and the modes skipped with
    their one-line reason.
    """
    rows, skipped = [], []
    for mode in modes:
        out = workdir / f"e2e_{mode}"
        try:
            run = run_pipeline(mode, images, ckpt, int8_model, out, pixel_size_csv, image_size, warmup=warmup)
        except Exception as e:  # the bundle's refusal (e.g. no INT8 model) is a result, not a crash
            skipped.append({"table": "end_to_end", "mode": mode, "reason": _error_line(e)})
            log(f"end to end: skipping {mode}: {_error_line(e)}")
            continue
        failed = sum(1 for r in run["rows"] if r["status"] != "ok")
        hcs = [r.get("hc_mm") for r in run["rows"] if r["status"] == "ok"]
        profile = {k: round(v, 3) for k, v in run["profile"].items()}
        rows.append(
            {
                "mode": mode + (" (emulated)" if mode == "bf16" and bf16_is_emulated() else ""),
                "images": len(images),
                "failed": failed,
                "masks_written": run["outputs"],
                "csv_rows": run["csv_rows"],
                "hc_mm_found": sum(1 for h in hcs if isinstance(h, float) and math.isfinite(h)),
                "images_per_second": profile.pop("images_per_second"),
                "stages_ms": profile,
                "path": run["path"],
            }
        )
        log(f"end to end {mode:<10} {rows[-1]['images_per_second']:7.2f} images/s  {run['path']}")
    return rows, skipped


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _read_mask(path: Path) -> np.ndarray:
    """A written (or ground-truth) PNG mask as a boolean array, non-zero = head."""
    with Image.open(path) as im:
        return np.asarray(im) > 0


def _hc_difference(hc: float | None, reference: float | None) -> float | None:
    """|HC - reference| in mm; 0 when neither mask has a head (both NaN), None when only one has."""
    missing = [v is None or not math.isfinite(v) for v in (hc, reference)]
    if all(missing):
        return 0.0
    return None if any(missing) else abs(hc - reference)


def parity(
    hc18_dir: Path,
    modes: Sequence[str],
    ckpt: Path,
    int8_model: Path | None,
    image_size: int,
    workdir: Path,
    split: str = "test",
    limit: int | None = None,
    calibration_inputs: int = 32,
    min_dice: float | None = None,
    log=print,
) -> dict:
    """
    Masks and head circumferences of every mode against ``fp32-eager`` and the ground truth.

    ``hc18_dir`` holds the HC18 layout (``training_set/``, the pixel-size CSV). Its subject-disjoint split
    is the bundle's (``custom_nets.data.hc18.datalist``, seed 0, as ``train.json``); ``split``
    images are compared (the first ``limit``). Without ``int8_model`` one is made from ``ckpt``,
    calibrated on the training split only, with the quantizer's guard ``min_dice`` (None: its default).

    Returns:
        ``per_image`` rows per mode, a ``summary`` per mode (mean/min Dice vs fp32-eager, max HC
        difference, mean Dice vs ground truth and its drop, the share of images within each bound,
        ``met``), and ``skipped`` modes with their reason.
    """
    from custom_nets.data import hc18

    datalist = hc18.datalist(hc18_dir, workdir / "datalist.json", seed=0)
    items = datalist[split] if split != "all" else [i for part in datalist.values() for i in part]
    items = items[:limit] if limit else items
    if not items:
        raise InputError(f"{hc18_dir}: the {split} split is empty")
    log(f"parity: {len(items)} {split} image(s) of {hc18_dir}")
    if "int8" in modes and int8_model is None:
        try:
            training = [i["image"] for i in datalist["training"]]
            int8_model = make_int8_model(ckpt, training, workdir, image_size, calibration_inputs, min_dice)
        except Exception as e:  # e.g. onnxruntime missing: the int8 mode is then skipped with the bundle's refusal
            log(f"parity: no INT8 model: {_error_line(e)}")
    inputs = [{"image": i["image"], "hc_ref_mm": i["hc_ref_mm"]} for i in items]
    truth = {Path(i["image"]).name: _read_mask(Path(i["label"])) for i in items}
    runs, skipped = {}, []
    for mode in [REFERENCE_MODE, *(m for m in modes if m != REFERENCE_MODE)]:
        try:
            out, sizes_csv = workdir / f"parity_{mode}", hc18_dir / PIXEL_SIZE_CSV
            run = run_pipeline(mode, inputs, ckpt, int8_model, out, sizes_csv, image_size)
        except Exception as e:
            if mode == REFERENCE_MODE:
                raise
            skipped.append({"table": "parity", "mode": mode, "reason": _error_line(e)})
            log(f"parity: skipping {mode}: {_error_line(e)}")
            continue
        # the mask files as written (what a user gets), in the orientation of the input PNG like the annotations
        masks = {r["image"]: _read_mask(out / r["mask"]) for r in run["rows"] if r["status"] == "ok"}
        runs[mode] = {"masks": masks, "hc": {r["image"]: r.get("hc_mm") for r in run["rows"]}, "path": run["path"]}
    reference = runs[REFERENCE_MODE]
    per_image, summary = {}, {}
    for mode, run in runs.items():
        rows = []
        for name, gt in truth.items():
            mask, ref_mask = run["masks"].get(name), reference["masks"].get(name)
            if mask is None or ref_mask is None:
                rows.append({"image": name, "error": "no mask (the image failed in this mode or in fp32-eager)"})
                continue
            if mask.shape != gt.shape:
                rows.append({"image": name, "error": f"mask of {mask.shape} for an annotation of {gt.shape}"})
                continue
            rows.append(
                {
                    "image": name,
                    "dice_vs_fp32": round(dice(mask, ref_mask), 5),
                    "hc_diff_mm": _hc_difference(run["hc"].get(name), reference["hc"].get(name)),
                    "gt_dice": round(dice(mask, gt), 5),
                    "gt_dice_drop": round(dice(ref_mask, gt) - dice(mask, gt), 5),
                }
            )
        per_image[mode] = rows
        summary[mode] = _summarise(rows, run["path"])
        s = summary[mode]
        log(f"parity {mode:<10} Dice vs fp32 mean {s['dice_vs_fp32_mean']} min {s['dice_vs_fp32_min']}, "
            f"HC diff max {s['hc_diff_mm_max']} mm, GT Dice {s['gt_dice_mean']} (drop {s['gt_dice_drop_mean']})")  # fmt: skip
    return {
        "hc18_dir": str(hc18_dir),
        "split": split,
        "images": len(items),
        "reference": REFERENCE_MODE,
        "bounds": PARITY_BOUNDS,
        "summary": summary,
        "per_image": per_image,
        "skipped": skipped,
    }


def _summarise(rows: list[dict], path: str) -> dict:
    """Mean/min Dice vs fp32, max HC difference, mean GT Dice and drop, shares within the bounds, verdict."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {"images": 0, "failed": len(rows), "met": False, "path": path}
    dices = [r["dice_vs_fp32"] for r in ok]
    hc = [r["hc_diff_mm"] for r in ok]
    drops = [r["gt_dice_drop"] for r in ok]
    hc_known = [h for h in hc if h is not None]  # None: a head in one mode's mask only, out of bounds
    within = {
        "dice_vs_fp32": sum(d >= PARITY_BOUNDS["dice_vs_fp32"] for d in dices) / len(rows),
        "hc_diff_mm": sum(h is not None and h <= PARITY_BOUNDS["hc_diff_mm"] for h in hc) / len(rows),
        "gt_dice_drop": sum(d <= PARITY_BOUNDS["gt_dice_drop"] for d in drops) / len(rows),
    }
    mean_drop = statistics.fmean(drops)
    return {
        "images": len(ok),
        "failed": len(rows) - len(ok),
        "dice_vs_fp32_mean": round(statistics.fmean(dices), 5),
        "dice_vs_fp32_min": round(min(dices), 5),
        "hc_diff_mm_mean": round(statistics.fmean(hc_known), 4) if hc_known else None,
        "hc_diff_mm_max": round(max(hc_known), 4) if hc_known else None,
        "hc_one_sided": sum(h is None for h in hc),
        "gt_dice_mean": round(statistics.fmean(r["gt_dice"] for r in ok), 5),
        "gt_dice_min": round(min(r["gt_dice"] for r in ok), 5),
        "gt_dice_drop_mean": round(mean_drop, 5),
        "share_within": {k: round(v, 4) for k, v in within.items()},
        # issue 11: every image within the Dice and HC bounds, and the mean GT Dice drop within its bound
        "met": within["dice_vs_fp32"] == 1.0 and within["hc_diff_mm"] == 1.0 and mean_drop <= PARITY_BOUNDS["gt_dice_drop"],
        "path": path,
    }


def hc18_images(image_dir: Path, count: int) -> list[str]:
    """The first ``count`` HC18 images of ``image_dir`` (``*_Annotation.png`` masks left out), sorted by name."""
    return list_images(image_dir, exclude=["*_Annotation.png"])[:count]


def scratch_dir(parent: Path | None = None) -> tempfile.TemporaryDirectory:
    """A temporary folder for checkpoints, INT8 models and pipeline outputs (removed at the end)."""
    return tempfile.TemporaryDirectory(prefix="latency_", dir=parent)
