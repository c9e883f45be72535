"""
Run a bundle's network on every image of a folder, one case at a time: a broken file is reported and
skipped, the others are processed, and the run ends with the list of failures and a non-zero exit.

MONAI's ``SupervisedEvaluator`` stops at the first unreadable file; a clinical batch job must not.
A problem with the whole run (an output folder that cannot be written) stops it before the first case.
How each kind of bad input is handled is listed in ``docs/bad_inputs.md``. The network part stays
MONAI's: ``preprocessing`` and ``postprocessing`` are MONAI transforms and ``inferer`` a MONAI
inferer, so the same config keys serve MONAI Label and TorchScript inference.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer

from custom_nets.atomic_write import write_csv_atomic
from custom_nets.data.formats import IMAGE_SUFFIXES
from custom_nets.engines.resume import CaseJournal, case_complete, input_id, journal_row
from custom_nets.engines.output_guards import TableSpaceReserve, output_folder_lock
from custom_nets.engines.scaleout import Shard, barrier, merge_shard_tables, merge_side_tables, parse_shard
from custom_nets.errors import InputError, disk_full_error, exception_chain
from custom_nets.flags import as_flag
from custom_nets.tracking.progress import LoopProgress

__all__ = ["list_images", "check_output_dir", "one_line_error", "FolderInference"]

logger = logging.getLogger(__name__)

# MONAI's wrapper of transform errors: "applying transform <monai.transforms.io.dictionary.LoadImaged object at 0x..>"
_MONAI_TRANSFORM = re.compile(r"applying transform <[\w.]*?\.(\w+) object")


def list_images(
    input_dir: str | os.PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES, exclude: Sequence[str] = ()
) -> list[str]:
    """
    The image files in ``input_dir`` (not recursive), sorted; hidden files, other suffixes and names
    matching a glob pattern of ``exclude`` (e.g. ``"*_Annotation.png"``) are skipped. Skipped files
    other than excluded ones (``notes.txt``, ``.DS_Store``) are logged in one line, so that an image
    with an unexpected suffix does not vanish unnoticed. A file with an image suffix is always a case,
    even when it turns out to be broken: it then fails on its own.

    Raises:
        InputError: ``input_dir`` is not a folder or holds no file with one of ``suffixes``.
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise InputError(f"{folder}: input folder not found")
    wanted = tuple(s.lower() for s in suffixes)
    files, skipped = [], []
    for p in sorted(folder.iterdir()):
        if any(fnmatch.fnmatch(p.name, pattern) for pattern in exclude):
            continue
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(wanted):
            files.append(str(p))
        else:
            skipped.append(p.name + ("/" if p.is_dir() else ""))
    if skipped:
        logger.info("%s: skipped %d entry(ies) that are not images: %s", folder, len(skipped), ", ".join(skipped))
    if not files:
        raise InputError(f"{folder}: no image file ({', '.join(suffixes)}) in the folder")
    return files


def check_output_dir(output_dir: str | os.PathLike, input_dir: str | os.PathLike | None = None) -> Path:
    """
    Make sure ``output_dir`` exists (created with its parents when missing) and that a file can be
    created in it, by creating and removing an empty temporary file; return it. With ``input_dir``,
    an output folder that is the input folder or lies inside it is refused first, before anything is
    created: the next run would read this run's masks as inputs (``a_mask.png`` -> ``a_mask_mask.png``).

    A batch calls this before its first case, so a read-only, full or mistyped output location stops
    the run at once with one line instead of failing every case after the work is done.

    Raises:
        InputError: one line naming the folder and why it cannot be written or used.

    Example::

        check_output_dir("/data/out")  # PosixPath('/data/out')
        check_output_dir("/data/in/masks", input_dir="/data/in")  # InputError: /data/in/masks: output folder is inside ...
    """
    folder = Path(output_dir)
    if input_dir is not None:
        # resolved: a symbolic link or "in/../in" must not hide that the two are one folder
        inputs, resolved = Path(input_dir).resolve(), folder.resolve()
        if resolved == inputs or inputs in resolved.parents:
            where = "is the input folder" if resolved == inputs else f"is inside the input folder {input_dir}"
            raise InputError(f"{folder}: output folder {where}: a later run would read its masks as inputs; choose another folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise InputError(f"{folder}: output folder cannot be created: a file of that name is in the way") from None
    except OSError as e:
        raise InputError(f"{folder}: output folder is not writable ({e.strerror or type(e).__name__})") from None
    return folder


def one_line_error(error: BaseException) -> str:
    """
    One line saying what went wrong: the message of an :class:`~custom_nets.errors.InputError` in the
    chain as it is (it names the file and the problem); otherwise the innermost cause (``Type: first
    line``), prefixed with the MONAI transform that raised it when there is one (MONAI wraps errors as
    ``applying transform <...>``).

    Example::

        one_line_error(e)  # "LoadImaged: OSError: image file is truncated (8 bytes not processed)"
    """
    chain = exception_chain(error)
    input_error = next((e for e in chain if isinstance(e, InputError)), None)
    if input_error is not None:  # our own messages are one line that names the file: kept as they are
        message = " ".join(str(input_error).split())
        return message if len(message) <= 300 else message[:297] + "..."
    root = chain[-1]
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    kind = type(root).__name__ if type(root).__module__ == "builtins" else f"{type(root).__module__}.{type(root).__name__}"
    message = f"{kind}: {lines[0] if lines else 'no message'}"
    for e in chain:
        match = _MONAI_TRANSFORM.search(str(e))
        if match:
            message = f"{match.group(1)}: {message}"
            break
    return message if len(message) <= 300 else message[:297] + "..."


def _stage_name(output: Callable) -> str:
    """A case output's name in the time profile: its class (``MaskWriter``) or function name."""
    return getattr(output, "__name__", None) or type(output).__name__


def _naming(path: str, reason: str) -> str:
    """``reason`` as a line that names the input by its full path (unless it already starts with it)."""
    return reason if reason.startswith(path) else f"{path}: {reason}"


class FolderInference:
    """
    Infer each input in turn with MONAI transforms and a MONAI inferer, isolating failures per case.

    For every input: ``preprocessing({image_key: path})`` -> ``inferer(image[None], network)`` ->
    ``postprocessing`` -> each of ``case_outputs`` (e.g. a mask writer, an overlay writer, a
    measurement) called with the case dict, returning CSV columns. Any exception in these steps marks
    that case as failed with a one-line reason; the next case goes on. At the end a CSV with one row
    per input (``status`` ``ok`` or the reason) is written atomically to ``results_csv``, the failures
    are logged, and, when there were failures and ``exit_code_on_failure`` is set, the process exits
    with that code (so a pipeline notices) without a traceback.

    Before the first case, ``output_dir`` is checked (:func:`check_output_dir`): an output folder that
    cannot be written, or that is ``input_dir`` or inside it, stops the run with one :class:`InputError`
    line. ``input_check`` (e.g. :func:`custom_nets.data.image2d.check_image_2d`) runs on each input path before the transforms,
    so a broken or unsuitable file fails with a message that names the problem. An input that is
    constant after pre-processing (a blank frame, a volume entirely outside the intensity window)
    holds nothing to segment: with ``empty_mask_for_constant_input`` its label map is set to 0
    (background) after post-processing, a warning is logged, and the results row says so in ``note``.

    Args:
        inputs: image paths (or dicts with ``image_key``), e.g. from :func:`list_images`.
        network: the model; put in eval mode and run without gradients.
        preprocessing: MONAI (dictionary) transform producing ``image_key`` as a channel-first tensor.
        postprocessing: MONAI (dictionary) transform of the case dict with ``pred_key`` (e.g.
            ``Activationsd``, ``Invertd`` back to the original size, ``AsDiscreted``).
        device: device of the network; inputs are moved there.
        inferer: a MONAI inferer (default ``SimpleInferer``).
        case_outputs: callables ``case -> {column: value} | None`` run after post-processing.
        results_csv: where the per-case table goes (``None``: not written).
        amp: run the network under CUDA autocast (only on a CUDA device).
        image_key: key of the image in the case dict.
        pred_key: key of the prediction.
        exit_code_on_failure: exit code when a case failed (``None``: just return the report).
        output_dir: folder the outputs go to, checked before the first case (``None``: the folder of
            ``results_csv`` when given).
        input_dir: the folder the inputs were listed from; ``output_dir`` may not be it or lie inside it.
        input_check: callable ``path -> None`` that raises an :class:`InputError` for an unusable input.
        empty_mask_for_constant_input: write an empty mask for a constant input instead of the network's
            answer (label 0 must be background, as in every bundle of this project).
        prefetch: read and pre-process up to this many inputs ahead in one thread, and run post-processing
            and the case outputs (measurements, writers) in another, while the network runs; 0 runs each
            case start to end.
        postprocess_behind: with ``prefetch``, post-process in the output thread, so the next case's network
            overlaps it (2D images: the ellipse fit of one frame runs beside the network on the next). False
            post-processes right after the network in the calling thread, holding one large volume's
            arrays at a time.
        shard: ``"i/n"``: run only the inputs ``i, i + n, ...`` and write this shard's table and journal
            (:mod:`custom_nets.engines.scaleout`; merged by ``python -m custom_nets merge_results``).
            Under ``torchrun`` the shard is the process's rank and rank 0 merges after a barrier.
        skip_existing: skip the inputs whose journal row is ``ok`` and whose files are complete
            (:func:`custom_nets.engines.resume.case_complete`); their rows are kept in the table. Off,
            the journal starts afresh.

    Every finished case is appended to a journal next to the table (``<table>.journal.jsonl``) at once,
    so a killed run can be continued with ``skip_existing``.

    Returns from :meth:`run` the rows of the results table. At the end of a run the time per image of
    each stage (``check``, ``preprocess``, ``network``, ``postprocess``, each case output by class name)
    and the throughput in images/s are logged and kept in :attr:`profile`.

    Example (the ``run`` section of an ``inference.json``)::

        "runner": {"_target_": "custom_nets.engines.folder_inference.FolderInference",
                   "inputs": "$custom_nets.engines.folder_inference.list_images(@input_dir)",
                   "network": "@network", "preprocessing": "@preprocessing",
                   "postprocessing": "@postprocessing", "inferer": "@inferer", "device": "@device",
                   "case_outputs": ["@mask_writer"], "results_csv": "$@output_dir + '/results.csv'",
                   "output_dir": "@output_dir", "input_check": "$custom_nets.data.image2d.check_image_2d"},
        "run": ["$@runner.run()"]
    """

    def __init__(
        self,
        inputs: Sequence[str | os.PathLike | Mapping[str, Any]],
        network: torch.nn.Module,
        preprocessing: Callable,
        postprocessing: Callable | None = None,
        device: str | torch.device = "cpu",
        inferer: Inferer | None = None,
        case_outputs: Sequence[Callable[[dict[str, Any]], Mapping[str, Any] | None]] = (),
        results_csv: str | os.PathLike | None = None,
        amp: bool = False,
        image_key: str = "image",
        pred_key: str = "pred",
        exit_code_on_failure: int | None = 1,
        name: str = "FolderInference",
        output_dir: str | os.PathLike | None = None,
        input_dir: str | os.PathLike | None = None,
        input_check: Callable[[str], Any] | None = None,
        empty_mask_for_constant_input: bool = True,
        prefetch: int = 2,
        postprocess_behind: bool = True,
        shard: str | None = None,
        skip_existing: bool | str = False,
    ) -> None:
        self.inputs = [dict(i) if isinstance(i, Mapping) else {image_key: os.fspath(i)} for i in inputs]
        self.network = network
        self.preprocessing = preprocessing
        self.postprocessing = postprocessing
        self.device = torch.device(device)
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.case_outputs = list(case_outputs)
        self.results_csv = results_csv
        self.amp = amp and self.device.type == "cuda"
        self.image_key = image_key
        self.pred_key = pred_key
        self.exit_code_on_failure = exit_code_on_failure
        self.logger = logging.getLogger(name)
        if output_dir is None and results_csv is not None:
            output_dir = Path(results_csv).parent
        self.output_dir = output_dir
        self.input_dir = input_dir
        self.input_check = input_check
        self.empty_mask_for_constant_input = empty_mask_for_constant_input
        self.prefetch = int(prefetch)
        self.postprocess_behind = bool(postprocess_behind)
        self.shard = shard
        self.skip_existing = as_flag(skip_existing, "skip_existing")
        self.stage_seconds: dict[str, float] = {}
        self.profile: dict[str, float] = {}
        self._timing_lock = threading.Lock()

    def _timed(self, stage: str, fn: Callable, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._timing_lock:
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - start

    def _load(self, item: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Check and pre-process one input (runs ahead of the network in the prefetch thread)."""
        if self.input_check is not None:
            self._timed("check", self.input_check, str(item[self.image_key]))
        case = self._timed("preprocess", self.preprocessing, dict(item))
        low, high = torch.aminmax(torch.as_tensor(case[self.image_key]))
        return case, self.empty_mask_for_constant_input and bool(low == high)

    def _forward(self, image: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cuda") if self.amp else nullcontext()
        # a plain tensor through the network: MetaTensor bookkeeping on every layer costs more than the
        # network itself on small inputs; the prediction gets the image's metadata back for Invertd
        with torch.no_grad(), autocast:
            return self.inferer(image.as_subclass(torch.Tensor)[None].to(self.device), self.network)[0].float().cpu()

    def _predict(self, case: dict[str, Any]) -> dict[str, Any]:
        """The network on one pre-processed case (the only stage in the calling thread when prefetching)."""
        image = case[self.image_key]
        pred = self._timed("network", self._forward, torch.as_tensor(image))
        meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
        case[self.pred_key] = MetaTensor(pred, meta=meta) if meta else pred
        return case

    def _postprocess(self, case: dict[str, Any]) -> dict[str, Any]:
        return case if self.postprocessing is None else self._timed("postprocess", self.postprocessing, case)

    def _finish(self, item: dict[str, Any], case: dict[str, Any], constant: bool, postprocessed: bool = False) -> dict[str, Any]:
        """Post-processing (unless done) and the case outputs (measurements, writers) in order (in the output thread)."""
        if not postprocessed:
            case = self._postprocess(case)
        columns: dict[str, Any] = {}
        if constant:
            case[self.pred_key] = case[self.pred_key].clone().zero_()
            columns["note"] = "constant image: empty mask"
            self.logger.warning(f"{item[self.image_key]}: constant image after pre-processing, nothing to segment: empty mask")
        written: list[Path] = []
        for output in self.case_outputs:
            try:
                result = self._timed(_stage_name(output), output, case) or {}
            except Exception as e:
                for path in written:  # a failed case gets no mask: nothing of it stays on disk
                    path.unlink(missing_ok=True)
                full = disk_full_error(e)
                if full is not None:
                    raise InputError(
                        f"{_stage_name(output)} could not write into {getattr(output, 'output_dir', self.output_dir)}: "
                        f"{full.strerror or 'no space left on device'}; free space and continue with --skip_existing true"
                    ) from e
                raise
            columns.update(result)
            names = [str(result[c]) for c in getattr(output, "file_columns", ()) if c in result]
            written += [Path(output.output_dir, n) for n in names if os.path.basename(n) == n]  # not "skipped: ..."
        # the written mask's shape, kept in the journal: a resumed run checks the file against it
        return {"columns": columns, "shape": [int(n) for n in torch.as_tensor(case[self.pred_key]).shape]}

    def _infer_one(self, item: dict[str, Any]) -> dict[str, Any]:
        """One case, start to end, in the calling thread."""
        case, constant = self._load(item)
        return self._finish(item, self._predict(case), constant)

    def _cases(self, inputs: Sequence[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any], Future]]:
        """
        ``(position, item, future of the result columns and mask shape)`` of ``inputs`` in order. With ``prefetch``, the next inputs
        are read and pre-processed in one thread, and the predictions post-processed, measured and written in
        another, while the network runs in the calling thread;
        at most ``prefetch`` cases wait on either side, which bounds the memory held.
        """
        if self.prefetch <= 0:
            for index, item in enumerate(inputs, start=1):
                future: Future = Future()
                try:
                    future.set_result(self._infer_one(item))
                except Exception as e:
                    future.set_exception(e)
                yield index, item, future
            return
        with ThreadPoolExecutor(1, "prefetch") as loader, ThreadPoolExecutor(1, "outputs") as writer:
            loads: deque[Future] = deque(loader.submit(self._load, i) for i in inputs[: self.prefetch])
            written: deque[tuple[int, dict[str, Any], Future]] = deque()
            for index, item in enumerate(inputs, start=1):
                load = loads.popleft()
                if index + self.prefetch <= len(inputs):
                    loads.append(loader.submit(self._load, inputs[index + self.prefetch - 1]))
                try:
                    case, constant = load.result()
                    case = self._predict(case)
                    if not self.postprocess_behind:
                        case = self._postprocess(case)
                    future = writer.submit(self._finish, item, case, constant, not self.postprocess_behind)
                except Exception as e:
                    future = Future()
                    future.set_exception(e)
                written.append((index, item, future))
                while written and (written[0][2].done() or len(written) > self.prefetch):
                    yield written.popleft()
            yield from written

    def _log_profile(self, elapsed: float, count: int) -> None:
        """Per-stage time per image and the throughput, at the end of a run."""
        if count == 0:
            return
        self.profile = {
            **{f"{stage}_ms": 1000.0 * seconds / count for stage, seconds in self.stage_seconds.items()},
            "wall_ms": 1000.0 * elapsed / count,
            "images_per_second": count / elapsed if elapsed > 0 else float("inf"),
        }
        stages = ", ".join(f"{stage} {1000.0 * seconds / count:.1f}" for stage, seconds in self.stage_seconds.items())
        overlap = " (stages overlap: prefetch and output threads)" if self.prefetch > 0 else ""
        self.logger.info(f"time per image in ms: {stages}{overlap}")
        self.logger.info(f"throughput: {self.profile['images_per_second']:.2f} images/s ({self.profile['wall_ms']:.1f} ms per image, wall)")

    #: progress of :meth:`run`: a tqdm bar (``True``), a line every 10 % of the inputs (``False``), or a bar
    #: only when standard error is a terminal (``None``); see :class:`custom_nets.tracking.LoopProgress`
    progress: bool | None = None

    def _resumed(self, indexed: Sequence[tuple[int, dict[str, Any]]], journal: CaseJournal) -> dict[int, dict[str, Any]]:
        """The journal records of the inputs that need no new run (``skip_existing``), by input index."""
        earlier = journal.by_input()
        kept: dict[int, dict[str, Any]] = {}
        for index, item in indexed:
            record = earlier.get(input_id(str(item.get(self.image_key))))
            if record is None:
                continue
            reason = case_complete(record, self.output_dir if self.output_dir is not None else ".")
            if reason is None:
                kept[index] = {**record, "index": index, "total": len(self.inputs)}
            else:
                self.logger.info(f"{item.get(self.image_key)}: runs again ({reason})")
        return kept

    def _run_cases(
        self,
        todo: Sequence[tuple[int, dict[str, Any]]],
        records: dict[int, dict[str, Any]],
        failures: list[tuple[str, str]],
        journal: CaseJournal | None,
        progress: LoopProgress,
    ) -> None:
        """Run ``todo`` case by case into ``records`` (by input index) and ``failures``, journalling each case."""
        journal_ok = True
        for (position, item, future), (index, _) in zip(self._cases([item for _, item in todo]), todo):
            path = str(item.get(self.image_key))
            shape = None
            try:
                result = future.result()
            except Exception as e:  # one broken case must not stop the batch
                reason = one_line_error(e)
                failures.append((path, reason))
                row = {"image": os.path.basename(path), "status": f"failed: {reason}"}
                self.logger.error(f"[{position}/{len(todo)}] {_naming(path, reason)}")
            else:
                row, shape = {"image": os.path.basename(path), "status": "ok", **result["columns"]}, result["shape"]
                self.logger.info(f"[{position}/{len(todo)}] {os.path.basename(path)}: ok")
            records[index] = {"index": index, "total": len(self.inputs), "input": input_id(path), "row": journal_row(row), "shape": shape}
            if journal is not None and journal_ok:
                try:
                    journal.append(records[index])
                except OSError as e:  # the disk filled up: the rows stay in memory for the table at the end
                    if disk_full_error(e) is None:
                        raise
                    journal_ok = False
                    self.logger.error(f"{journal.path}: {e.strerror}; the journal is written again at the end of the run")
            progress.update()

    def run(self) -> list[dict[str, Any]]:
        """
        Infer every input (of this shard); write the results table; exit with ``exit_code_on_failure``
        when a case failed. Returns the rows of the table this process wrote (the merged one on rank 0
        of ``torchrun``).
        """
        shard = parse_shard(self.shard)
        if self.output_dir is not None:
            check_output_dir(self.output_dir, self.input_dir)
        if self.results_csv is None:
            return self._run(shard)
        # one run per table (and shard): a second run into this folder would mix rows and overwrite masks
        with output_folder_lock(shard.file_path(self.results_csv).with_suffix(".lock"), f"inference {shard.label}"):
            return self._run(shard)

    def _run(self, shard: Shard) -> list[dict[str, Any]]:
        self.network.eval()
        self.stage_seconds = {}
        indexed = shard.take(self.inputs)
        table = shard.file_path(self.results_csv) if self.results_csv is not None else None
        journal = CaseJournal(shard.journal_path(self.results_csv)) if self.results_csv is not None else None
        # room for the table and journal at the end, set aside before the first case may fill the disk and
        # given back (also on an error) before the end-of-run writes below
        with TableSpaceReserve(table, len(indexed)) if table is not None else contextlib.nullcontext():
            kept = self._resumed(indexed, journal) if self.skip_existing and journal is not None else {}
            if journal is not None and not self.skip_existing:
                journal.rewrite([])  # a fresh run: rows of an earlier run in this folder are not this run's
            todo = [(index, item) for index, item in indexed if index not in kept]
            if shard.sharded:
                self.logger.info(f"{shard.label}: {len(indexed)} of {len(self.inputs)} input(s)")
            if self.skip_existing:
                if todo:
                    self.logger.info(f"skip_existing: {len(kept)} case(s) already complete, {len(todo)} to run")
                else:
                    self.logger.info(f"skip_existing: all {len(kept)} case(s) already complete: nothing to do")
            records: dict[int, dict[str, Any]] = dict(kept)
            failures: list[tuple[str, str]] = []
            start = time.perf_counter()
            # a tqdm bar (rate, ETA) on a terminal; in a log, a progress line every 10 % of the inputs
            progress = LoopProgress(len(todo), "inference", unit="image", bar=self.progress, logger=self.logger)
            try:
                self._run_cases(todo, records, failures, journal, progress)
            finally:
                progress.close()
        elapsed = time.perf_counter() - start
        ordered = [records[index] for index in sorted(records)]
        rows = [r["row"] for r in ordered]
        if table is not None and journal is not None:
            try:
                journal.rewrite(ordered)  # exactly the table's rows: stale lines of re-run cases go
                write_csv_atomic(table, rows)
            except OSError as e:
                if disk_full_error(e) is None:
                    raise
                raise InputError(f"{table}: cannot write the results table: {e.strerror}; free space and rerun with --skip_existing true") from None
            self.logger.info(f"results table: {table}")
        done = len(todo) - len(failures)
        self.logger.info(f"{done} of {len(todo)} image(s) processed in {elapsed:.1f} s")
        self._log_profile(elapsed, len(todo))
        if shard.distributed and self.results_csv is not None:
            barrier(shard)  # every rank's table and journal are complete
            if shard.index == 0:
                rows = merge_shard_tables(self.results_csv, shard.count)
                merge_side_tables(self.results_csv, shard.count)  # e.g. nodules.csv of the lung CT bundle
                self.logger.info(f"results table (all {shard.count} ranks): {self.results_csv}")
            barrier(shard)  # no rank exits before the merge: torchrun would stop rank 0
        elif shard.sharded:
            self.logger.info(f"when every shard has finished: python -m custom_nets merge_results {self.output_dir}")
        all_failed = [r for r in rows if not str(r.get("status", "")).startswith("ok")] if shard.distributed and shard.index == 0 else []
        if failures:
            self.logger.error(f"{len(failures)} image(s) failed:")
            for path, reason in failures:
                self.logger.error(f"  {_naming(path, reason)}")
        if (failures or all_failed) and self.exit_code_on_failure is not None:
            raise SystemExit(self.exit_code_on_failure)
        return rows
