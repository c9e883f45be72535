"""Seeded subject-disjoint splits, written once as a datalist and reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from custom_nets.data.splits import load_or_create_datalist, require_training_cases, split_subjects
from custom_nets.errors import InputError


def _items(n_subjects: int, per_subject: int = 1):
    return [{"case": f"s{s:02d}_{k}", "image": f"/data/s{s:02d}_{k}.nii.gz"} for s in range(n_subjects) for k in range(per_subject)]


def _subject(item):
    return item["case"].split("_")[0]


@pytest.mark.parametrize("n, expected", [(3, [1, 1, 1]), (10, [7, 2, 1]), (20, [14, 4, 2])])
def test_split_sizes(n, expected):
    splits = split_subjects(_items(n), _subject, (0.7, 0.2, 0.1), seed=0)
    assert [len(splits[k]) for k in ("training", "validation", "test")] == expected


def test_split_keeps_subjects_disjoint():
    splits = split_subjects(_items(10, per_subject=3), _subject, seed=3)
    subjects = [{_subject(i) for i in splits[k]} for k in ("training", "validation", "test")]
    assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    assert sum(len(v) for v in splits.values()) == 30


def test_split_is_seeded():
    a = split_subjects(_items(12), _subject, seed=5)
    b = split_subjects(_items(12), _subject, seed=5)
    c = split_subjects(_items(12), _subject, seed=6)
    assert a == b and a != c


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_subjects(_items(4), _subject, fractions)


def _dataset(root: Path, n: int = 5):
    items = []
    for i in range(n):
        (root / f"c{i}").mkdir(parents=True)
        for name in ("t1.nii.gz", "seg.nii.gz"):
            (root / f"c{i}" / name).write_bytes(b"")
        items.append({"case": f"c{i}", "image": [str(root / f"c{i}" / "t1.nii.gz")], "label": str(root / f"c{i}" / "seg.nii.gz")})
    return items


def test_datalist_is_written_once_with_relative_paths(tmp_path):
    items = _dataset(tmp_path / "data")
    datalist = tmp_path / "datalist.json"
    first = load_or_create_datalist(datalist, tmp_path / "data", lambda: items, lambda d: d["case"], seed=0)
    stored = json.loads(datalist.read_text())
    assert stored["training"][0]["image"][0].startswith(stored["training"][0]["case"])  # relative to the dataset
    again = load_or_create_datalist(datalist, tmp_path / "data", lambda: pytest.fail("must not rebuild"), lambda d: d["case"], seed=0)
    assert again == first
    assert first["training"][0]["image"][0].startswith(str((tmp_path / "data").resolve()))


def test_moved_dataset_keeps_its_split(tmp_path):
    items = _dataset(tmp_path / "data")
    datalist = tmp_path / "datalist.json"
    first = load_or_create_datalist(datalist, tmp_path / "data", lambda: items, lambda d: d["case"])
    (tmp_path / "data").rename(tmp_path / "moved")
    moved = load_or_create_datalist(datalist, tmp_path / "moved", list, lambda d: d["case"])
    assert [[i["case"] for i in moved[k]] for k in moved] == [[i["case"] for i in first[k]] for k in first]


@pytest.mark.parametrize("change, message", [({"seed": 1}, "written for seed=0"), ({"fractions": (0.6, 0.2, 0.2)}, "written for fractions")])
def test_datalist_of_other_settings_is_refused(tmp_path, change, message):
    items = _dataset(tmp_path / "data")
    load_or_create_datalist(tmp_path / "datalist.json", tmp_path / "data", lambda: items, lambda d: d["case"])
    with pytest.raises(ValueError, match=message):
        load_or_create_datalist(tmp_path / "datalist.json", tmp_path / "data", list, lambda d: d["case"], **change)


def test_datalist_of_another_dataset_is_refused(tmp_path):
    items = _dataset(tmp_path / "data")
    load_or_create_datalist(tmp_path / "datalist.json", tmp_path / "data", lambda: items, lambda d: d["case"])
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="does not exist under"):
        load_or_create_datalist(tmp_path / "datalist.json", tmp_path / "other", list, lambda d: d["case"])


def test_corrupt_datalist_names_the_file(tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text("{not json")
    with pytest.raises(ValueError, match="datalist.json"):
        load_or_create_datalist(datalist, tmp_path, list, lambda d: d["case"])


def test_datalist_of_other_entry_settings_is_refused(tmp_path):
    items = _dataset(tmp_path / "data")
    load_or_create_datalist(tmp_path / "datalist.json", tmp_path / "data", lambda: items, lambda d: d["case"], settings={"sequences": ["t1"]})
    with pytest.raises(ValueError, match=r"written for sequences=\['t1'\]"):
        load_or_create_datalist(tmp_path / "datalist.json", tmp_path / "data", list, lambda d: d["case"], settings={"sequences": ["t1", "t2"]})


def test_datalist_of_an_older_format_is_refused_naming_the_file(tmp_path):
    """A datalist from an earlier version (no ``format``; e.g. HC18's ``hc_mm`` before it became ``hc_ref_mm``)."""
    items = _dataset(tmp_path / "data")
    datalist = tmp_path / "datalist.json"
    load_or_create_datalist(datalist, tmp_path / "data", lambda: items, lambda d: d["case"])
    content = json.loads(datalist.read_text())
    del content["format"]
    datalist.write_text(json.dumps(content))
    with pytest.raises(InputError, match=rf"{datalist}: written by another version of custom_nets \(datalist format None, this one reads 2\); delete it"):
        load_or_create_datalist(datalist, tmp_path / "data", list, lambda d: d["case"])


@pytest.mark.parametrize(
    "training, validation, message",
    [([], [], "no training cases"), ([{"image": "a"}] * 2, [], "no validation cases")],
    ids=["no-labels", "no-validation"],
)
def test_require_training_cases_refuses_empty_lists_in_one_line(training, validation, message):
    with pytest.raises(InputError, match=message) as error:
        require_training_cases(training, validation)
    assert "\n" not in str(error.value)


def test_require_training_cases_accepts_cases_and_a_bundle_without_validation_list():
    assert require_training_cases([{"image": "a"}], [{"image": "b"}])
    assert require_training_cases([{"image": "a"}], None)
