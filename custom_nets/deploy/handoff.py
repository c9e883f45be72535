"""
Hand-off package of a trained bundle for a site that has MONAI but not ``custom_nets``.

``python -m monai.bundle ckpt_export`` writes ``models/model.ts`` (TorchScript, with ``metadata.json`` and
the bundle's ``inference.json`` embedded). That research ``inference.json`` imports ``custom_nets``
(network class, folder runner, head-circumference CSV), so MONAI Label (which reads
``configs/inference.json`` of a bundle) and MONAI Deploy (which reads ``inference.json`` embedded in
``model.ts``) cannot use it at a clinical site. Each bundle therefore ships ``configs/inference_ts.json``,
a small override that takes the network from ``models/model.ts`` and writes masks with MONAI's own
``SaveImaged``. :func:`export_handoff` merges the two into the hand-off bundle's ``configs/inference.json``,
checks that nothing in it refers to ``custom_nets``, checks ``model.ts`` against ``metadata.json`` with a
forward pass, and embeds the merged config in the hand-off copy of ``model.ts``.

When the bundle has an INT8 model (``models/model_int8.onnx`` from ``custom_nets.deploy quantize``) made from
its current ``model.pt``, the hand-off carries it too, with ``scripts/onnx_network.py`` (an ONNX Runtime
session as a network, no ``custom_nets`` in it) and ``configs/inference_int8.json``, the override that
runs it. A site then needs MONAI and ``onnxruntime`` only::

    python -m monai.bundle run inference --config_file "['configs/inference.json','configs/inference_int8.json']" ...

Example::

    python -m custom_nets.deploy handoff bundles/fetal_head_us_segmentation dist/fetal_head_us_segmentation
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from monai.bundle import ConfigParser, verify_net_in_out

from custom_nets.deploy import onnx_network
from custom_nets.transforms import antialiased_resize
from custom_nets.deploy.quantize import INT8_MODEL

__all__ = ["HandoffError", "INT8_CONFIG", "PORTABLE_MODULES", "RESEARCH_PACKAGE", "TS_CONFIG", "merged_ts_config", "export_handoff"]

#: The research package that the hand-off configs must not need.
RESEARCH_PACKAGE = "custom_nets"
#: The TorchScript-only override that sits next to ``configs/inference.json`` in every bundle.
TS_CONFIG = "inference_ts.json"
#: The hand-off's override that runs the INT8 ONNX model instead of ``model.ts``.
INT8_CONFIG = "inference_int8.json"
_INT8_OVERRIDE = {
    "int8_path": f"$@bundle_root + '/{INT8_MODEL}'",
    "network_def": {"_target_": "scripts.onnx_network.OnnxNetwork", "onnx_path": "@int8_path"},
}
#: Research modules that need only torch and MONAI: the hand-off carries each as ``scripts/<name>.py`` and its
#: configs name it there (``custom_nets.transforms.antialiased_resize.X`` becomes ``scripts.antialiased_resize.X``).
PORTABLE_MODULES = {module.__name__: module for module in (antialiased_resize, onnx_network)}
#: Files copied into the hand-off bundle when present (training configs are left out: they need custom_nets).
COPIED = ("configs/metadata.json", "configs/logging.conf", "docs", "LICENSE")
#: The keys of ``network_data_format`` that a TorchScript export fixes.
SHAPE_KEYS = ("type", "num_channels", "spatial_shape", "dtype")


logger = logging.getLogger(__name__)


class HandoffError(ValueError):
    """A bundle that cannot be handed off: the message names the file and what is wrong."""


def _script_name(module_name: str) -> str:
    return "scripts." + module_name.rsplit(".", 1)[-1]


def _portable(config: object) -> object:
    """``config`` with every :data:`PORTABLE_MODULES` name replaced by its hand-off ``scripts.`` name."""
    if isinstance(config, dict):
        return {k: _portable(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_portable(v) for v in config]
    if isinstance(config, str):
        for name in PORTABLE_MODULES:
            config = config.replace(name + ".", _script_name(name) + ".")
    return config


def _research_refs(config: object, prefix: str = "") -> list[str]:
    """The config ids whose values mention :data:`RESEARCH_PACKAGE` (``imports``, ``a#b#c``)."""
    if isinstance(config, dict):
        return [ref for k, v in config.items() for ref in _research_refs(v, f"{prefix}#{k}" if prefix else str(k))]
    if isinstance(config, list):
        return [ref for i, v in enumerate(config) for ref in _research_refs(v, f"{prefix}#{i}")]
    return [prefix] if isinstance(config, str) and RESEARCH_PACKAGE in config else []


def merged_ts_config(bundle_dir: str | os.PathLike, extra_configs: tuple[str, ...] = ()) -> dict:
    """
    ``configs/inference.json``, then ``extra_configs`` (e.g. a data-layout override the model was trained
    and exported with, relative to the bundle), then ``configs/inference_ts.json``, merged by MONAI's
    rules, with :data:`PORTABLE_MODULES` named as the hand-off's ``scripts/`` copies, and checked to need no
    ``custom_nets``.

    Raises:
        HandoffError: a config file is missing, or the merged config still refers to ``custom_nets``.
    """
    configs = Path(bundle_dir) / "configs"
    files = [configs / "inference.json", *(Path(bundle_dir) / c for c in extra_configs), configs / TS_CONFIG]
    for f in files:
        if not f.is_file():
            raise HandoffError(f"{f}: not found; a hand-off needs the bundle's inference.json and its {TS_CONFIG}")
    merged = _portable(ConfigParser.load_config_files([str(f) for f in files]))
    refs = _research_refs(merged)
    if refs:
        raise HandoffError(
            f"{files[-1]}: the merged inference config still needs {RESEARCH_PACKAGE} at {', '.join(refs)}; "
            f"override these keys in {TS_CONFIG}"
        )
    return merged


def _embedded(ts_path: Path, names: tuple[str, ...]) -> dict[str, str]:
    extra = dict.fromkeys(names, "")
    torch.jit.load(str(ts_path), map_location="cpu", _extra_files=extra)
    return extra


def _check_exported_with(ts_path: Path, meta_path: Path) -> None:
    """``model.ts`` was exported with the input/output shapes that ``meta_path`` states now."""
    metadata = json.loads(meta_path.read_text())
    embedded_text = _embedded(ts_path, ("metadata.json",))["metadata.json"]
    if not embedded_text:
        raise HandoffError(f"{ts_path}: no metadata.json embedded; export it with `python -m monai.bundle ckpt_export`")
    embedded = json.loads(embedded_text).get("network_data_format", {})
    for io in ("inputs", "outputs"):
        for name, spec in metadata.get("network_data_format", {}).get(io, {}).items():
            for key in SHAPE_KEYS:
                have, want = embedded.get(io, {}).get(name, {}).get(key), spec.get(key)
                if have != want:
                    raise HandoffError(
                        f"{meta_path}: network_data_format#{io}#{name}#{key} is {want!r} but {ts_path.name} was "
                        f"exported with {have!r}; re-run ckpt_export or fix metadata.json"
                    )


def _check_forward(ts_path: Path, meta_path: Path, config_path: Path, bundle_root: Path, source: Path) -> None:
    """A forward of the input that ``meta_path`` describes gives the output channels and dtype it states
    (errors name ``source``, the bundle's own metadata file, not the staged copy)."""
    try:
        verify_net_in_out(
            net_id="network_def", meta_file=str(meta_path), config_file=str(config_path), device="cpu",
            bundle_root=str(bundle_root),
        )  # fmt: skip
    except Exception as e:  # a shape error from inside the network is a RuntimeError; say which file disagrees
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HandoffError(f"{source}: the input/output it describes do not fit {ts_path.name}: {first_line}") from e


def _int8_model(bundle: Path, int8: bool | None) -> Path | None:
    """The bundle's INT8 model when the hand-off should carry it: made from the current ``model.pt``.
    ``int8=None`` carries it when it is there and current (logged when not); ``True`` requires it."""
    path, ckpt = bundle / INT8_MODEL, bundle / "models" / "model.pt"
    if int8 is False:
        return None
    if not path.is_file():
        problem = f"{path}: not found; make it with `python -m custom_nets.deploy quantize {bundle} --calibration_dir IMAGES`"
    elif not ckpt.is_file():
        problem = f"{ckpt}: not found; the INT8 model is only handed off beside the model.pt it was made from"
    else:
        from custom_nets.engines.fast_path import int8_made_from

        problem = None if int8_made_from(path, ckpt) else f"{path}: not made from {ckpt} (retrained since?); re-run `custom_nets.deploy quantize`"
    if problem and int8:
        raise HandoffError(problem)
    if problem:
        if path.is_file():
            logger.warning(f"hand-off without the INT8 model: {problem}")
        return None
    return path


def _check_int8(int8_path: Path, meta_path: Path, source: Path) -> None:
    """The INT8 model's output has the channels that ``meta_path`` states (errors name ``source``)."""
    net = onnx_network.OnnxNetwork(int8_path, threads=1)
    shape = [d if isinstance(d, int) else 1 for d in net.input_shape]
    channels = net(torch.zeros(shape)).shape[1]
    outputs = json.loads(meta_path.read_text()).get("network_data_format", {}).get("outputs", {})
    want = next(iter(outputs.values()), {}).get("num_channels")
    if want is not None and channels != want:
        raise HandoffError(f"{source}: the INT8 model gives {channels} output channels, metadata.json states {want}")


def export_handoff(
    bundle_dir: str | os.PathLike, output_dir: str | os.PathLike, extra_configs: tuple[str, ...] = (),
    int8: bool | None = None,
) -> Path:
    """
    Write a bundle that runs with MONAI alone: ``models/model.ts``, ``configs/metadata.json``,
    ``configs/inference.json`` (the merged TorchScript-only config, also embedded in ``model.ts``),
    ``logging.conf``, ``docs/`` and ``LICENSE``; the INT8 model with ``configs/inference_int8.json`` when the
    bundle has one made from its ``model.pt``; and ``scripts/`` with the :data:`PORTABLE_MODULES` the configs use
    (``onnx_network.py`` for INT8, ``antialiased_resize.py`` for the fetal bundle's pre-processing). The folder is built next to ``output_dir`` and moved
    into place at the end, so a failed hand-off leaves an earlier one untouched.

    Args:
        bundle_dir: the research bundle, with ``models/model.ts`` from ``ckpt_export``.
        output_dir: the hand-off bundle folder (replaced when it exists).
        extra_configs: config overrides (relative to ``bundle_dir``) merged between ``inference.json`` and
            ``inference_ts.json``: the ones given to ``ckpt_export`` besides ``inference.json``.
        int8: carry ``models/model_int8.onnx``: ``None`` when it is there and made from ``models/model.pt``,
            ``True`` always (an error when it cannot), ``False`` never.

    Returns:
        ``output_dir`` as a ``Path``.

    Raises:
        HandoffError: ``model.ts`` missing, the configs need ``custom_nets``, ``metadata.json`` does
            not describe the exported network, or ``int8=True`` and no current INT8 model.
    """
    bundle, out = Path(bundle_dir).resolve(), Path(output_dir).resolve()
    ts_path = bundle / "models" / "model.ts"
    if not ts_path.is_file():
        raise HandoffError(
            f"{ts_path}: not found; export it first: python -m monai.bundle ckpt_export --net_id network_def "
            "--filepath models/model.ts --ckpt_file models/model.pt --meta_file configs/metadata.json "
            "--config_file configs/inference.json"
        )
    meta_path = bundle / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise HandoffError(f"{meta_path}: not found")
    merged = merged_ts_config(bundle, tuple(extra_configs))
    _check_exported_with(ts_path, meta_path)
    int8_path = _int8_model(bundle, int8)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "configs").mkdir()
        (staging / "models").mkdir()
        for name in COPIED:
            src = bundle / name
            if src.is_dir():
                shutil.copytree(src, staging / name)
            elif src.is_file():
                shutil.copy2(src, staging / name)
        config_text = json.dumps(merged, indent=4)
        (staging / "configs" / "inference.json").write_text(config_text + "\n")
        # the hand-off model.ts carries the config that works without custom_nets (MONAI Deploy reads it)
        model = torch.jit.load(str(ts_path), map_location="cpu")
        extra = {"metadata.json": meta_path.read_text(), "inference.json": config_text}
        torch.jit.save(model, str(staging / "models" / "model.ts"), _extra_files=extra)
        _check_forward(
            staging / "models" / "model.ts", staging / "configs" / "metadata.json",
            staging / "configs" / "inference.json", staging, meta_path,
        )  # fmt: skip
        if int8_path is not None:
            shutil.copy2(int8_path, staging / INT8_MODEL)
            (staging / "configs" / INT8_CONFIG).write_text(json.dumps(_INT8_OVERRIDE, indent=4) + "\n")
        configs_text = "".join(p.read_text() for p in (staging / "configs").glob("*.json"))
        for name, module in PORTABLE_MODULES.items():
            if _script_name(name) + "." in configs_text:
                (staging / "scripts").mkdir(exist_ok=True)
                (staging / "scripts" / "__init__.py").write_text("")
                shutil.copy2(module.__file__, staging / "scripts" / (name.rsplit(".", 1)[-1] + ".py"))
        if int8_path is not None:
            _check_int8(staging / INT8_MODEL, meta_path, int8_path)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
