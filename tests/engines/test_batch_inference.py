"""
Batch inference beyond one folder and one process, on real HC18 images: datalist inputs and their bad
entries, the shard split and its merge, and resuming a killed run (``--skip_existing``).
The CLI and ``torchrun`` runs of the bundle are in ``test_batch_inference_cli.py``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Activationsd, AsDiscreted, Compose, EnsureChannelFirstd, Invertd, LoadImaged, Resized, ScaleIntensityd
from PIL import Image

from custom_nets.data.inference_inputs import inference_inputs, read_datalist
from custom_nets.engines.case_writers import MaskWriter
from custom_nets.engines.folder_inference import FolderInference, list_images
from custom_nets.engines.scaleout import Shard, merge_results, parse_shard
from custom_nets.errors import InputError

NAMES = ["001_HC", "011_HC", "017_HC", "017_2HC", "022_HC"]


class _BrightIsForeground(torch.nn.Module):
    """A stand-in network: logits that call pixels brighter than 0.5 foreground."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20


class _KilledAfter:
    """A case output that ends the process (as a kill would) when the ``n``-th case reaches it."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, case):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt  # not an Exception: the batch stops, as under SIGINT
        return {}


@pytest.fixture
def hc18(shared_data, tmp_path) -> Path:
    """A few real HC18 ultrasound images (no annotations)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in NAMES:
        shutil.copy(shared_data / "hc18_subset" / "training_set" / f"{name}.png", folder)
    return folder


def _runner(inputs, out: Path, extra_outputs=(), **kwargs) -> FolderInference:
    preprocessing = Compose(
        [LoadImaged("image"), EnsureChannelFirstd("image"), ScaleIntensityd("image"), Resized("image", spatial_size=(32, 32))]
    )
    postprocessing = Compose(
        [
            Activationsd("pred", softmax=True),
            Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted("pred", argmax=True),
        ]
    )
    return FolderInference(
        inputs=inputs,
        network=_BrightIsForeground(),
        preprocessing=preprocessing,
        postprocessing=postprocessing,
        case_outputs=[MaskWriter(out), *extra_outputs],
        results_csv=out / "results.csv",
        prefetch=0,
        **kwargs,
    )


# ----- datalists ---------------------------------------------------------------------------------------


def test_json_datalist_entries_dicts_and_strings_relative_to_its_folder(hc18):
    datalist = hc18 / "lists" / "datalist.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({"testing": [{"image": "../001_HC.png"}, str(hc18 / "011_HC.png")], "training": []}))
    inputs = inference_inputs(datalist, lambda: pytest.fail("the folder must not be listed"))
    assert inputs == [str(hc18 / "001_HC.png"), str(hc18 / "011_HC.png")]
    assert [p for _, p in read_datalist(datalist, key="training")] == []


def test_csv_datalist_with_another_image_column(hc18):
    table = hc18 / "cases.csv"
    table.write_text("id,scan\n1,001_HC.png\n2,017_2HC.png\n")
    assert inference_inputs(table, list, image_column="scan") == [str(hc18 / "001_HC.png"), str(hc18 / "017_2HC.png")]


def test_without_a_datalist_the_folder_is_listed(hc18):
    assert inference_inputs(None, lambda: list_images(hc18)) == list_images(hc18)


@pytest.mark.parametrize(
    "content, options, phrase",
    [
        ('{"test": []}', {}, "no list 'testing' (keys: test); set --datalist_key"),
        ("path\n001_HC.png\n", {}, "no column 'image' (columns: path); set --datalist_image_column"),
        ("[1, 2", {}, "not valid JSON"),
    ],
    ids=["missing-key", "missing-column", "broken-json"],
)
def test_a_datalist_unusable_as_a_whole_is_one_line(hc18, content, options, phrase):
    path = hc18 / ("list.csv" if content.startswith("path") else "list.json")
    path.write_text(content)
    with pytest.raises(InputError) as info:
        inference_inputs(path, list, **options)
    assert str(info.value).startswith(f"{path}: ") and phrase in str(info.value) and "\n" not in str(info.value)


def test_missing_and_duplicate_entries_are_listed_before_any_work(hc18, caplog):
    datalist = hc18 / "datalist.json"
    entries = ["001_HC.png", "gone.png", {"image": "./001_HC.png"}, {"label": "x.png"}, "011_HC.png"]
    datalist.write_text(json.dumps({"testing": entries}))
    with caplog.at_level(logging.ERROR), pytest.raises(InputError, match="3 invalid") as info:
        inference_inputs(datalist, list)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert lines == [
        f"{datalist}: testing[1]: {hc18 / 'gone.png'}: file not found",
        f"{datalist}: testing[2]: {hc18 / '001_HC.png'}: duplicate of testing[0]; each case once",
        f"{datalist}: testing[3]: no 'image' path in the entry",
    ]
    assert "--skip_invalid true" in str(info.value)


def test_skip_invalid_goes_on_with_the_valid_entries(hc18, tmp_path):
    table = hc18 / "cases.csv"
    table.write_text("image\n001_HC.png\nmissing.png\n001_HC.png\n011_HC.png\n")
    inputs = inference_inputs(table, list, skip_invalid="true")
    assert inputs == [str(hc18 / "001_HC.png"), str(hc18 / "011_HC.png")]
    rows = _runner(inputs, tmp_path / "out").run()
    assert [r["image"] for r in rows] == ["001_HC.png", "011_HC.png"] and all(r["status"] == "ok" for r in rows)


# ----- shards -------------------------------------------------------------------------------------------


def test_shards_split_round_robin_each_input_once():
    items = list("abcdefg")
    parts = [Shard(i, 3).take(items) for i in range(3)]
    assert [[i for i, _ in p] for p in parts] == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(x for p in parts for _, x in p) == items


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/2"])
def test_a_bad_shard_is_one_line(text):
    with pytest.raises(InputError, match="expected i/n"):
        parse_shard(text)


def test_merged_shards_equal_one_process_exactly(hc18, tmp_path):
    inputs = list_images(hc18)
    _runner(inputs, tmp_path / "single").run()
    out = tmp_path / "sharded"
    for i in range(3):  # 5 inputs over 3 shards: 2, 2 and 1 cases
        _runner(inputs, out, shard=f"{i}/3").run()
    assert not (out / "results.csv").exists()
    assert merge_results(out) == [out / "results.csv"]
    assert (out / "results.csv").read_bytes() == (tmp_path / "single" / "results.csv").read_bytes()
    for name in NAMES:
        assert np.array_equal(np.asarray(Image.open(out / f"{name}_mask.png")), np.asarray(Image.open(tmp_path / "single" / f"{name}_mask.png")))


def test_merge_refuses_an_unfinished_shard(hc18, tmp_path):
    out = tmp_path / "out"
    _runner(list_images(hc18), out, shard="0/2").run()
    with pytest.raises(InputError, match=r"shard\(s\) 1 of 2 have not finished"):
        merge_results(out)


# ----- resuming -----------------------------------------------------------------------------------------


def test_a_killed_run_continues_and_keeps_the_earlier_rows(hc18, tmp_path, caplog):
    inputs = list_images(hc18)
    _runner(inputs, tmp_path / "single").run()
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _runner(inputs, out, extra_outputs=[_KilledAfter(3)]).run()
    assert not (out / "results.csv").exists() and len((out / "results.journal.jsonl").read_text().splitlines()) == 2
    assert str(hc18) not in (out / "results.journal.jsonl").read_text()  # input paths only as hashes: they may name patients
    with caplog.at_level(logging.INFO):
        rows = _runner(inputs, out, skip_existing="true").run()
    assert "skip_existing: 2 case(s) already complete, 3 to run" in caplog.text
    assert len(rows) == 5 and (out / "results.csv").read_bytes() == (tmp_path / "single" / "results.csv").read_bytes()


def test_a_finished_run_does_nothing_the_second_time(hc18, tmp_path, caplog):
    out = tmp_path / "out"
    _runner(list_images(hc18), out).run()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_mask.png")}
    table = (out / "results.csv").read_bytes()
    with caplog.at_level(logging.INFO):
        _runner(list_images(hc18), out, skip_existing=True).run()
    assert "skip_existing: all 5 case(s) already complete: nothing to do" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_mask.png")} == before
    assert (out / "results.csv").read_bytes() == table


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.unlink(), "missing or empty"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
        (lambda p: Image.fromarray(np.zeros((10, 10), np.uint8)).save(p), "has shape"),
    ],
    ids=["deleted", "truncated", "other-shape"],
)
def test_an_incomplete_mask_is_written_again(hc18, tmp_path, caplog, damage, reason):
    out = tmp_path / "out"
    _runner(list_images(hc18), out).run()
    table = (out / "results.csv").read_bytes()
    damage(out / "011_HC_mask.png")
    with caplog.at_level(logging.INFO):
        _runner(list_images(hc18), out, skip_existing=True).run()
    assert "011_HC.png: runs again (mask 011_HC_mask.png" in caplog.text and reason in caplog.text
    assert "4 case(s) already complete, 1 to run" in caplog.text
    assert (out / "results.csv").read_bytes() == table
    assert np.asarray(Image.open(out / "011_HC_mask.png")).shape == (540, 800)


def test_without_skip_existing_everything_runs_again(hc18, tmp_path, caplog):
    out = tmp_path / "out"
    _runner(list_images(hc18), out).run()
    with caplog.at_level(logging.INFO):
        rows = _runner(list_images(hc18), out).run()
    assert "5 of 5 image(s) processed" in caplog.text and len(rows) == 5
