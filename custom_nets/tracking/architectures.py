"""
Train a bundle once per network architecture through the real ``python -m monai.bundle run training``
CLI, with the same data split, epoch budget and seed, one MLflow run each, then compare the runs.

    python -m custom_nets.tracking.architectures --bundle bundles/fetal_head_us_segmentation \\
        --dataset_dir ../shared/data/hc18_subset --epochs 20
"""

from __future__ import annotations

import inspect
import os
import pydoc
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from custom_nets.errors import InputError
from custom_nets.networks.registry import COMPARED_NETWORKS, NETWORKS
from custom_nets.tracking.compare import CompareError, compare, markdown_table, parse_run_ids
from custom_nets.tracking.params import TrackingUnreachableError, open_tracking_store

__all__ = ["NETWORKS", "ArchitecturesError", "architectures", "architectures_command", "network_def_for"]

# copied from the bundle's network_def when the network accepts them: the data decides them
SHARED_ARGS = ("spatial_dims", "in_channels", "out_channels", "pretrained_path")


class ArchitecturesError(InputError):
    """The comparison cannot start (unknown network, missing bundle config, unreachable tracking URI)."""


def _accepted_args(target: str) -> set[str] | None:
    component = pydoc.locate(target)
    if component is None:
        return None
    return set(inspect.signature(component).parameters)


def network_def_for(name: str, bundle_network_def: Mapping[str, Any]) -> dict[str, Any]:
    """
    The ``network_def`` for network ``name`` (a key of :data:`NETWORKS`), with ``spatial_dims``,
    ``in_channels``, ``out_channels`` and ``pretrained_path`` taken from the bundle's ``network_def``
    where the network accepts them (values may be ``@`` references; the bundle resolves them).

    Example::

        network_def_for("UNet", {"_target_": "custom_nets.AdaptiveCENet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2})
        # {'_target_': 'monai.networks.nets.UNet', 'channels': [...], ..., 'spatial_dims': 2, 'in_channels': 1, 'out_channels': 2}
    """
    if name not in NETWORKS:
        raise ArchitecturesError(f"unknown network '{name}'; choose from {', '.join(NETWORKS)}")
    definition = dict(NETWORKS[name])
    accepted = _accepted_args(definition["_target_"])
    for key in SHARED_ARGS:
        if key in bundle_network_def and (accepted is None or key in accepted):
            definition[key] = bundle_network_def[key]
    return definition


def _epochs_key(config: Mapping[str, Any]) -> str:
    """The config id that sets the epoch budget: what ``train#trainer#max_epochs`` refers to, if it refers."""
    value = config.get("train", {}).get("trainer", {}).get("max_epochs")
    if isinstance(value, str) and value.startswith("@") and "#" not in value and value[1:] in config:
        return value[1:]
    return "train#trainer#max_epochs"


def _cli_value(value: Any) -> str:
    """A value as ``monai.bundle``'s fire parser reads it back (strings as they are, the rest as literals)."""
    return value if isinstance(value, str) else repr(value)


def _run_ids(client: Any, experiment: str) -> set[str]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    return {r.info.run_id for r in client.search_runs([exp.experiment_id], max_results=5000)}


def architectures(
    bundle: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    networks: Any = ",".join(COMPARED_NETWORKS),
    epochs: int = 10,
    seed: int = 0,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    output_dir: str | os.PathLike | None = None,
    metric: str = "val_mean_dice",
    config_file: str = "configs/train.json",
    python: str = sys.executable,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """
    Train ``bundle`` once per network with the same split (the bundle's datalist for ``dataset_dir``),
    epoch budget and seed, each a separate MLflow run in ``experiment``, then compare the runs
    (see :func:`custom_nets.tracking.compare.compare`). A network whose training fails is reported
    and the others go on.

    Each run goes through ``python -m monai.bundle run training --config_file <bundle>/<config_file>
    <per-network network_def file> --bundle_root <bundle> --dataset_dir ... --tracking mlflow ...``, with
    ``ckpt_dir``/``output_dir`` moved under ``<output_dir>/<network>`` so the bundle's own
    ``models/model.pt`` is never overwritten.

    Args:
        bundle: the bundle folder.
        dataset_dir: passed to the bundle as ``--dataset_dir``.
        networks: names from :data:`NETWORKS`, ``"A,B"`` or a list.
        epochs: the epoch budget of every run (set where ``train#trainer#max_epochs`` points).
        seed: passed as ``--seed`` when the bundle config has a ``seed`` key.
        tracking_uri: MLflow tracking URI; default ``sqlite:///<output_dir>/mlruns.db``.
        experiment: MLflow experiment; default the bundle folder's name.
        output_dir: checkpoints, per-network configs, the tracking database, the comparison table and
            plot; default ``<bundle>/eval/architectures``.
        metric: the key validation metric to compare.
        config_file: the training config inside the bundle.
        python: the interpreter running the bundle.
        overrides: more ``--key value`` bundle overrides for every run (e.g. ``train#dataloader#batch_size=4``).

    Returns:
        the comparison rows, best first.

    Raises:
        ArchitecturesError: unknown network, missing config, unreachable tracking URI, or no run succeeded.

    Example::

        architectures("bundles/fetal_head_us_segmentation", "../shared/data/hc18_subset",
                      networks="AdaptiveCENet,UNet", epochs=2)
    """
    from monai.bundle import ConfigParser

    bundle = Path(bundle).resolve()
    config_path = bundle / config_file
    if not config_path.is_file():
        raise ArchitecturesError(f"{config_path}: bundle training config not found")
    config = ConfigParser.load_config_file(str(config_path))
    if "network_def" not in config:
        raise ArchitecturesError(f"{config_path}: no 'network_def' to replace")
    names = parse_run_ids(networks)
    unknown = [n for n in names if n not in NETWORKS]
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        raise ArchitecturesError(f"unknown network(s) {given}; choose from {', '.join(NETWORKS)}")

    out = Path(output_dir).resolve() if output_dir is not None else bundle / "eval" / "architectures"
    out.mkdir(parents=True, exist_ok=True)
    try:
        tracking_uri, experiment, client = open_tracking_store(out, bundle, tracking_uri, experiment)
    except TrackingUnreachableError as e:
        raise ArchitecturesError(str(e)) from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = [
        "--bundle_root", str(bundle), "--dataset_dir", str(Path(dataset_dir).resolve()),
        f"--{_epochs_key(config)}", str(int(epochs)),
        "--tracking", "mlflow", "--tracking_uri", tracking_uri, "--experiment_name", experiment,
    ]  # fmt: skip
    if "seed" in config:
        common += ["--seed", str(int(seed))]
    else:
        print(f"note: {config_path} has no 'seed' key; runs use the bundle's own determinism", file=sys.stderr)
    for key, value in overrides.items():
        common += [f"--{key}", _cli_value(value)]

    entry = "training" if "training" in config else "run"  # the Model Zoo's two spellings
    run_ids, failures = [], []
    for name in names:
        run_dir = out / name
        run_dir.mkdir(parents=True, exist_ok=True)
        net_config = run_dir / "network_def.json"
        ConfigParser.export_config_file({"network_def": network_def_for(name, config["network_def"])}, str(net_config))
        cmd = [python, "-m", "monai.bundle", "run", entry,
               "--config_file", repr([str(config_path), str(net_config)])] + common  # fmt: skip
        if "ckpt_dir" in config:
            cmd += ["--ckpt_dir", str(run_dir / "models")]
        if "output_dir" in config:
            # an expression, not a plain path: MONAI 1.6.1 builds the executed-config path by appending
            # " + '/config_<time>.json'" to output_dir, which a plain path turns into a missing file
            cmd += ["--output_dir", "$" + repr(str(run_dir))]
        if "run_name" not in config:
            cmd += ["--run_name", f"{name}-seed{seed}-{stamp}"]
        print(f"=== {name}: {' '.join(cmd)}", flush=True)
        before = _run_ids(client, experiment)
        start = time.perf_counter()
        code = subprocess.run(cmd, check=False).returncode
        new = _run_ids(client, experiment) - before
        print(f"=== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0 or not new:
            failures.append(f"{name} (exit {code}{'' if new else ', no MLflow run'})")
            continue
        for new_id in sorted(new):  # marks the run even when the bundle lacks MLflowRunParams
            client.set_tag(new_id, "architecture", name)
        run_ids.extend(sorted(new))

    if not run_ids:
        raise ArchitecturesError(f"no network trained successfully: {', '.join(failures)}")
    try:
        rows = compare(tracking_uri, experiment, runs=run_ids, metric=metric, output_dir=out)
    except CompareError as e:
        raise ArchitecturesError(str(e)) from None
    print(f"\n{len(rows)} network(s), {epochs} epoch(s) each, seed {seed}; {tracking_uri}, experiment {experiment}")
    print(markdown_table(rows))
    print(f"\nwritten: {out}/compare_{experiment}.csv and the {metric} curves PNG beside it")
    if failures:
        raise ArchitecturesError(f"training failed for: {', '.join(failures)} (the others are compared above)")
    return rows


def architectures_command(bundle: str, dataset_dir: str, **kwargs: Any) -> None:
    """
    Command-line form of :func:`architectures` for ``fire``; an :class:`ArchitecturesError` prints
    ``error: ...`` on stderr and exits with status 1 (no traceback).
    """
    try:
        architectures(bundle, dataset_dir, **kwargs)
    except ArchitecturesError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def main() -> None:
    import fire

    fire.Fire(architectures_command)


if __name__ == "__main__":
    main()
