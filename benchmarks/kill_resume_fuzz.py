"""
Kill-and-resume fuzz of a bundle's training: the real ``python -m monai.bundle run training`` CLI is
killed with SIGKILL at random moments (while importing, caching, training, validating, writing
``model.pt`` or ``last_checkpoint.pt``) and restarted with ``--resume true`` until it finishes. After
every kill the files on disk are checked; at the end the run itself.

Checked after each kill:
- ``models/model.pt`` and ``models/last_checkpoint.pt`` are absent or whole (they load with
  ``weights_only=True``): a kill never leaves a half-written checkpoint in place of a good one;
- at most one epoch is lost: the checkpoint holds every epoch completed before the epoch that was
  running at the kill (read from the training log).

Checked at the end:
- the trainer completed ``max_epochs`` epochs;
- one MLflow run, FINISHED (a kill before the first checkpoint leaves no second run), with exactly
  one ``val_mean_dice`` point per epoch and one ``train_loss`` and ``lr_group_0`` point per iteration
  (iterations trained again after a kill are not logged twice);
- no temporary file is left beside the checkpoints.

Synthetic HC18 images at 64x64 (nothing to download), 20 kills (each restart pays the CLI start-up,
about 15 s on an idle 2-core machine), about 15 minutes on 2 CPU cores::

    python benchmarks/kill_resume_fuzz.py --kills 20

Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "bundles" / "fetal_head_us_segmentation"
_EPOCH = re.compile(r"Epoch: (\d+)/(\d+), Iter:")
_ITERATION = re.compile(r"Epoch: \d+/\d+, Iter: \d+/(\d+)")
_JITTER = 3.0  # s after the chosen iteration: validation and checkpoint writes follow an epoch's last one


def _command(args: argparse.Namespace, dataset: Path, root: Path) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(args.bundle / "configs" / "train.json"), "--bundle_root", str(root),
        "--dataset_dir", str(dataset), "--num_workers", "0", "--image_size", str(args.image_size),
        "--train#dataloader#batch_size", "2", "--train#trainer#max_epochs", str(args.epochs),
        "--tracking", "mlflow", "--resume", "true",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    # the bundle's own sqlite store under the bundle root, not a server the caller may have set
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.setdefault("OMP_NUM_THREADS", "1")  # speed is not measured; one thread keeps a shared machine usable
    return env


def _load(path: Path) -> dict | None:
    """The checkpoint at ``path``, None when absent; raises when it exists but does not load."""
    from custom_nets.checkpoints import load_checkpoint

    return load_checkpoint(path) if path.exists() else None


def _epochs_done(checkpoint: dict | None) -> int:
    if checkpoint is None:
        return 0
    trainer = checkpoint["trainer"]
    return trainer["iteration"] // trainer["epoch_length"]


def _running_epoch(log: str) -> int | None:
    """The last epoch the training log shows in progress, None before the first iteration."""
    epochs = _EPOCH.findall(log)
    return int(epochs[-1][0]) if epochs else None


def _iterations_logged(log: str) -> tuple[int, int | None]:
    """(iteration lines in the training log, iterations per epoch or None before the first)."""
    iterations = _ITERATION.findall(log)
    return len(iterations), (int(iterations[-1]) if iterations else None)


def _wait_and_kill(process: subprocess.Popen, log_file: Path, rng: random.Random, startup: float | None) -> float | None:
    """
    SIGKILL ``process`` at a random moment: one kill in five during start-up (imports, data caching,
    MLflow set-up, checkpoint loading), the others after a random number of training iterations (up to
    two epochs) plus up to ``_JITTER`` s, which lands some kills in validation and checkpoint writing.
    ``startup`` is the start-up time seen so far (None: not yet known, no start-up kill). Returns the
    seconds until the first training iteration, None when the kill came before it.
    """
    started, first_iteration = time.monotonic(), None
    deadline, target = None, None
    if startup is not None and rng.random() < 0.2:
        deadline = started + rng.uniform(0.0, startup)
    while process.poll() is None:
        if deadline is not None and time.monotonic() >= deadline:
            break
        logged, epoch_length = _iterations_logged(log_file.read_text())
        if epoch_length is not None and first_iteration is None:
            first_iteration = time.monotonic() - started
            target = target or rng.randint(1, 2 * epoch_length)
        if deadline is None and target is not None and logged >= target:
            deadline = time.monotonic() + rng.uniform(0.0, _JITTER)
        time.sleep(0.02)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return first_iteration


def kill_once(
    command: list[str], root: Path, log_file: Path, rng: random.Random, startup: float | None
) -> tuple[bool, str, float | None]:
    """Start training and SIGKILL it at a random moment: (finished before the kill, failed checks, start-up s)."""
    before = _epochs_done(_load(root / "models" / "last_checkpoint.pt"))
    with open(log_file, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env())
        startup = _wait_and_kill(process, log_file, rng, startup)
    log = log_file.read_text()
    if process.returncode == 0:
        return True, "", startup
    if process.returncode != -signal.SIGKILL:
        return False, f"training failed (exit {process.returncode}): {log.strip().splitlines()[-1:]}", startup
    problems = []
    try:
        _load(root / "models" / "model.pt")
        after = _epochs_done(_load(root / "models" / "last_checkpoint.pt"))
    except Exception as error:  # a checkpoint that does not load is the failure this fuzz looks for
        return False, f"a checkpoint does not load after the kill: {error}", startup
    running = _running_epoch(log)
    if running is not None and after < running - 1:
        problems.append(f"epoch {running} was running but the checkpoint holds {after} epochs")
    if after < before:
        problems.append(f"the checkpoint went back from {before} to {after} epochs")
    return False, "; ".join(problems), startup


def final_checks(root: Path, epochs: int) -> list[str]:
    import mlflow

    problems = []
    checkpoint = _load(root / "models" / "last_checkpoint.pt")
    if _epochs_done(checkpoint) != epochs:
        problems.append(f"{_epochs_done(checkpoint)} of {epochs} epochs in the last checkpoint")
    if not (root / "models" / "model.pt").is_file():
        problems.append("no models/model.pt")
    leftovers = [p.name for p in (root / "models").iterdir() if p.name.startswith(".")]
    if leftovers:
        problems.append(f"temporary files left in models/: {leftovers}")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if [r.info.status for r in runs] != ["FINISHED"]:
        problems.append(f"MLflow runs: {[(r.info.run_name, r.info.status) for r in runs]} (expected one, FINISHED)")
    iterations = checkpoint["trainer"]["iteration"] if checkpoint else 0
    for run in runs:
        for key, last in (("val_mean_dice", epochs), ("train_loss", iterations), ("lr_group_0", iterations)):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            if steps != list(range(1, last + 1)):
                doubled = sorted(step for step, count in Counter(steps).items() if count > 1)
                problems.append(
                    f"{key} of run {run.info.run_name}: {len(steps)} points, steps {steps[:1]}..{steps[-1:]}, "
                    f"doubled {doubled[:10]} (expected each of 1..{last} once)"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=16, help="enough to outlast the kills (about half an epoch each)")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--num_images", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", type=Path, help="kept for inspection (default: a temporary folder)")
    args = parser.parse_args(argv)

    from custom_nets.data.synthetic_hc18 import generate

    rng = random.Random(args.seed)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kill_resume_fuzz_"))
    dataset = Path(generate(str(work / "hc18"), num_images=args.num_images, height=64, width=64, seed=args.seed))
    root = work / "bundle"
    command = _command(args, dataset, root)
    print(f"kill/resume fuzz: {args.kills} kills, {args.epochs} epochs, work dir {work}", flush=True)
    print("kill  start-up_s  epochs_before  epochs_after  result    (start-up_s: until the first iteration)")
    failures, kills, finished_early, startup = 0, 0, False, None
    while kills < args.kills:
        before = _epochs_done(_load(root / "models" / "last_checkpoint.pt"))
        done, problem, seen = kill_once(command, root, work / f"kill_{kills + 1:02d}.log", rng, startup)
        if done:
            finished_early = True
            break
        kills += 1
        startup = max(startup or 0.0, seen or 0.0) or None
        after = _epochs_done(_load(root / "models" / "last_checkpoint.pt"))
        failures += bool(problem)
        shown = f"{seen:10.1f}" if seen is not None else f"{'(in it)':>10}"
        print(f"{kills:4d}  {shown}  {before:13d}  {after:12d}  {problem or 'ok'}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env=_env())
    problems = [] if result.returncode == 0 else [f"final run exited {result.returncode}: {result.stderr.strip()[-500:]}"]
    problems += final_checks(root, args.epochs)
    for problem in problems:
        print(f"FAIL: {problem}")
    ok_kills = kills - failures
    print(f"resumed after {ok_kills}/{kills} kills without a problem; final run: {'ok' if not problems else 'FAILED'}"
          + (" (training finished before all kills were made: raise --epochs)" if finished_early else ""))
    return 1 if failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
