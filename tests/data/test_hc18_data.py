"""HC18 layout: pixel-size CSV, annotation filling, subject-disjoint split, datalist, synthetic generator, bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from custom_nets.data import hc18
from custom_nets.data.hc18 import (
    IMAGE_FOLDER,
    PIXEL_SIZE_CSV,
    HC18DataError,
    fill_annotation,
    read_pixel_sizes,
    subject_of,
)
from custom_nets.data.synthetic_hc18 import generate, generate_once, synthetic_case
from custom_nets.errors import InputError


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    return Path(generate(str(tmp_path_factory.mktemp("hc18") / "synthetic"), num_images=9, height=72, width=96, seed=1))


@pytest.fixture
def dataset_copy(synthetic_dir, tmp_path) -> Path:
    """A writable copy of the synthetic dataset, for tests that break it."""
    return Path(shutil.copytree(synthetic_dir, tmp_path / "dataset"))


@pytest.mark.parametrize(
    "name, subject", [("001_HC.png", "001"), ("017_2HC.png", "017"), ("125_3HC.png", "125"), ("/x/training_set/804_HC.png", "804")]
)
def test_subject_of(name, subject):
    assert subject_of(name) == subject


@pytest.mark.parametrize("name", ["001_HC_Annotation.png", "scan.png", "HC.png"])
def test_subject_of_rejects_other_names(name):
    with pytest.raises(HC18DataError, match="not an HC18 image name"):
        subject_of(name)


def test_read_pixel_sizes_real_csv(shared_data):
    table = read_pixel_sizes(shared_data / "hc18_subset" / PIXEL_SIZE_CSV)
    assert len(table) == 300
    assert table["001_HC.png"].pixel_size_mm == pytest.approx(0.08965852)
    assert table["001_HC.png"].hc_mm == pytest.approx(56.81)
    assert table["017_2HC.png"].hc_mm > 0


def test_read_pixel_sizes_test_set_layout(tmp_path):
    csv_path = tmp_path / "test_set_pixel_size.csv"
    csv_path.write_text("filename,pixel size(mm)\n000_HC.png,0.1171\n001_HC.png,0.0962\n")
    table = read_pixel_sizes(csv_path)
    assert table["001_HC.png"].pixel_size_mm == pytest.approx(0.0962)
    assert table["001_HC.png"].hc_mm is None


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "pixel-size CSV not found"),
        ("", "empty"),
        ("name,size\n001_HC.png,0.1\n", "no 'filename' column"),
        ("filename,pixel size(mm),head circumference (mm)\n001_HC.png,abc,50\n", "line 2"),
        ("filename,pixel size(mm),head circumference (mm)\n001_HC.png,-0.1,50\n", "not positive"),
    ],
)
def test_read_pixel_sizes_bad_csv_names_file(tmp_path, content, message):
    csv_path = tmp_path / "sizes.csv"
    if content is not None:
        csv_path.write_text(content)
    with pytest.raises(HC18DataError, match=message) as info:
        read_pixel_sizes(csv_path)
    assert str(csv_path) in str(info.value) and "\n" not in str(info.value)


def test_fill_annotation_keeps_filled_mask(shared_data):
    annotation = np.asarray(Image.open(shared_data / "hc18_subset" / IMAGE_FOLDER / "001_HC_Annotation.png"))
    mask, kind = fill_annotation(annotation)  # an RGB 0/255 filled ellipse
    assert kind == "filled"
    np.testing.assert_array_equal(mask, annotation[..., 0] > 0)


def test_fill_annotation_fills_closed_outline():
    _, filled, outline, _ = synthetic_case(np.random.default_rng(0), 90, 120)
    mask, kind = fill_annotation(outline.astype(np.uint8) * 255)
    assert kind == "outline"
    assert _iou(mask, filled) > 0.99


def test_fill_annotation_fits_outline_cut_by_border():
    _, filled, outline, ellipse = synthetic_case(np.random.default_rng(0), 90, 120)
    shift = int(ellipse.center_1)  # move the head half out of the image: its outline no longer closes
    cut_outline, cut_filled = np.roll(outline, -shift, axis=1), np.roll(filled, -shift, axis=1)
    cut_outline[:, -shift:], cut_filled[:, -shift:] = False, False
    mask, kind = fill_annotation(cut_outline)
    assert kind == "outline-fitted"
    assert _iou(mask, cut_filled) > 0.95


def test_fill_annotation_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        fill_annotation(np.zeros((8, 8), np.uint8))


def test_write_datalist_keeps_subjects_together(synthetic_dir, tmp_path):
    datalist = hc18.datalist(synthetic_dir, tmp_path / "datalist.json", seed=0)
    parts = {name: {item["subject"] for item in datalist[name]} for name in ("training", "validation", "test")}
    assert all(parts.values())
    assert not (parts["training"] & parts["validation"] or parts["training"] & parts["test"] or parts["validation"] & parts["test"])
    items = [item for name in ("training", "validation", "test") for item in datalist[name]]
    assert len(items) == 9 and {"image", "label", "pixel_size_mm", "hc_ref_mm", "subject"} <= set(items[0])
    second_scans = [item for item in items if "_2HC" in item["image"]]
    assert second_scans and all(subject_of(Path(i["image"]).name) == i["subject"] for i in second_scans)
    label = np.asarray(Image.open(items[0]["label"]))
    assert label.ndim == 2 and set(np.unique(label)) == {0, 1}


def test_write_datalist_is_written_once_and_reused(synthetic_dir, tmp_path):
    path = tmp_path / "datalist.json"
    first = hc18.datalist(synthetic_dir, path, seed=0)
    stamp = path.stat().st_mtime_ns
    assert hc18.datalist(synthetic_dir, path, seed=0) == first
    assert path.stat().st_mtime_ns == stamp


def test_write_datalist_refuses_a_datalist_of_another_dataset(synthetic_dir, dataset_copy, tmp_path):
    path = tmp_path / "datalist.json"
    hc18.datalist(synthetic_dir, path)
    csv_path = dataset_copy / PIXEL_SIZE_CSV
    csv_path.write_text(csv_path.read_text().replace("001_HC.png,0.", "001_HC.png,0.0"))  # another dataset
    with pytest.raises(InputError, match="pixel_size_csv_sha1") as info:
        hc18.datalist(dataset_copy, path)
    assert str(path) in str(info.value)


def test_write_datalist_follows_a_moved_dataset(synthetic_dir, dataset_copy, tmp_path):
    path = tmp_path / "datalist.json"
    first = hc18.datalist(synthetic_dir, path)
    moved = hc18.datalist(dataset_copy, path)
    assert [Path(i["image"]).name for i in moved["test"]] == [Path(i["image"]).name for i in first["test"]]
    assert all(Path(i["image"]).resolve().is_relative_to(dataset_copy.resolve()) for i in moved["training"])


def test_write_datalist_needs_three_subjects(dataset_copy, tmp_path):
    for path in (dataset_copy / IMAGE_FOLDER).iterdir():
        if not path.name.startswith(("001_", "002_")):
            path.unlink()
    with pytest.raises(HC18DataError, match="at least 3 subjects, found 2"):
        hc18.datalist(dataset_copy, tmp_path / "datalist.json")


def test_write_datalist_fills_outline_annotations(tmp_path):
    dataset = generate(str(tmp_path / "outlines"), num_images=4, height=72, width=96, annotation="outline")
    datalist = hc18.datalist(dataset, tmp_path / "datalist.json")
    assert {i["annotation"] for part in datalist.values() for i in part} == {"outline"}
    item = datalist["training"][0]
    label = np.asarray(Image.open(item["label"])) > 0
    outline = np.asarray(Image.open(Path(dataset) / IMAGE_FOLDER / Path(item["label"]).name)) > 0
    assert label.sum() > 3 * outline.sum()  # filled, not the thin outline


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _resize_annotation(path: Path) -> None:
    Image.fromarray(np.asarray(Image.open(path))[:-4]).save(path)


def _drop_csv_row(dataset: Path) -> None:
    csv_path = dataset / PIXEL_SIZE_CSV
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(line for line in lines if not line.startswith("002_HC.png")) + "\n")


@pytest.mark.parametrize(
    "breakage, culprit, message",
    [
        (lambda d: shutil.rmtree(d / IMAGE_FOLDER), IMAGE_FOLDER, "folder not found"),
        (lambda d: (d / PIXEL_SIZE_CSV).unlink(), PIXEL_SIZE_CSV, "pixel-size CSV not found"),
        (_drop_csv_row, PIXEL_SIZE_CSV, "no row for 002_HC.png"),
        (lambda d: _truncate(d / IMAGE_FOLDER / "002_HC.png"), "002_HC.png", "cannot read the image"),
        (lambda d: _truncate(d / IMAGE_FOLDER / "002_HC_Annotation.png"), "002_HC_Annotation.png", "cannot read the annotation"),
        (lambda d: _resize_annotation(d / IMAGE_FOLDER / "002_HC_Annotation.png"), "002_HC_Annotation.png", "differs from its image"),
        (lambda d: (d / IMAGE_FOLDER / "002_HC_Annotation.png").unlink(), "002_HC_Annotation.png", "not found"),
        (lambda d: [p.unlink() for p in (d / IMAGE_FOLDER).iterdir()], IMAGE_FOLDER, "no HC18 image"),
    ],
    ids=["no-training-set", "no-csv", "missing-csv-row", "truncated-image", "truncated-annotation", "size-mismatch", "no-annotation", "empty"],
)
def test_write_datalist_bad_dataset_one_line_error_naming_file(dataset_copy, tmp_path, breakage, culprit, message):
    breakage(dataset_copy)
    with pytest.raises(HC18DataError, match=message) as info:
        hc18.datalist(dataset_copy, tmp_path / "datalist.json")
    assert culprit in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, InputError)
    assert not (tmp_path / "datalist.json").exists()


def test_write_datalist_missing_dataset_dir(tmp_path):
    with pytest.raises(HC18DataError, match="dataset folder not found") as info:
        hc18.datalist(tmp_path / "nowhere", tmp_path / "datalist.json")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_synthetic_dataset_layout_and_reference_hc(synthetic_dir):
    table = read_pixel_sizes(synthetic_dir / PIXEL_SIZE_CSV)
    images = sorted(p.name for p in (synthetic_dir / IMAGE_FOLDER).glob("*HC.png"))
    assert sorted(table) == images and len(images) == 9
    assert any("_2HC" in name for name in images)
    image = Image.open(synthetic_dir / IMAGE_FOLDER / images[0])
    assert image.mode == "L" and image.size == (96, 72)
    assert all(0.07 <= row.pixel_size_mm <= 0.17 and row.hc_mm > 0 for row in table.values())


def test_synthetic_dataset_is_seeded(tmp_path):
    a = generate(str(tmp_path / "a"), num_images=3, height=40, width=48, seed=5)
    b = generate(str(tmp_path / "b"), num_images=3, height=40, width=48, seed=5)
    for name in ("001_HC.png", "001_HC_Annotation.png", PIXEL_SIZE_CSV):
        sub = "" if name == PIXEL_SIZE_CSV else IMAGE_FOLDER
        assert (Path(a) / sub / name).read_bytes() == (Path(b) / sub / name).read_bytes()


def test_generate_once_keeps_a_complete_dataset(synthetic_dir):
    stamp = (synthetic_dir / PIXEL_SIZE_CSV).stat().st_mtime_ns
    generate_once(str(synthetic_dir), num_images=3)
    assert (synthetic_dir / PIXEL_SIZE_CSV).stat().st_mtime_ns == stamp


def test_generate_once_writes_a_missing_dataset(tmp_path):
    folder = generate_once(str(tmp_path / "new"), num_images=3, height=40, width=48)
    assert len(read_pixel_sizes(Path(folder) / PIXEL_SIZE_CSV)) == 3


@pytest.mark.slow
def test_synthetic_generator_command_line(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "-m", "custom_nets.data.synthetic_hc18", "--output_dir", str(out), "--num_images", "3", "--height", "40", "--width", "48"],
        check=True,
        capture_output=True,
    )
    assert len(read_pixel_sizes(out / PIXEL_SIZE_CSV)) == 3
    assert len(list((out / IMAGE_FOLDER).glob("*_Annotation.png"))) == 3


def test_a_palette_training_image_is_refused_naming_it(tmp_path):
    """The same 2D checks as inference: palette indices are not intensities."""
    from PIL import Image

    from custom_nets.data.synthetic_hc18 import generate

    dataset = Path(generate(str(tmp_path / "hc18"), num_images=4, height=64, width=64, seed=0))
    image = sorted((dataset / IMAGE_FOLDER).glob("*_HC.png"))[0]
    Image.open(image).convert("P").save(image)
    with pytest.raises(InputError, match=rf"{image}: palette"):
        hc18.datalist(dataset, tmp_path / "datalist.json")
    assert not (tmp_path / "datalist.json").exists()


def test_handoff_csv_snippet_of_the_monailabel_doc_makes_a_training_dataset(shared_data, repo_root, tmp_path):
    """docs/monailabel_slicer.md 6b, run as written on 6 real HC18 images whose labels are stored as MONAI Label
    stores them (RGB, 0/1): hc18.datalist accepts its output, and the circumference it measures is HC18's."""
    import csv
    import re

    source, studies = shared_data / "hc18_subset", tmp_path / "data" / "hc18_to_label"
    (studies / "labels" / "final").mkdir(parents=True)
    reference = {row["filename"]: row for row in csv.DictReader(open(source / PIXEL_SIZE_CSV))}
    names = sorted(p.name for p in (source / IMAGE_FOLDER).glob("*HC.png"))[:6]
    with open(tmp_path / "data" / "pixel_sizes.csv", "w", newline="") as f:  # the site's export: no circumference
        csv.writer(f).writerows([["filename", "pixel size(mm)"], *([n, reference[n]["pixel size(mm)"]] for n in names)])
    for name in names:
        shutil.copy(source / IMAGE_FOLDER / name, studies / name)
        mask = np.asarray(Image.open(source / IMAGE_FOLDER / name.replace(".png", "_Annotation.png")).convert("L")) > 0
        Image.fromarray(np.repeat(mask[..., None], 3, axis=2).astype(np.uint8)).save(studies / "labels" / "final" / name)
    doc = (repo_root / "docs" / "monailabel_slicer.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc[doc.index("### 6b."):], re.S).group(1)
    exec(re.sub(r"(?m)^   ", "", snippet).replace('"/data/', f'"{tmp_path}/data/'), {})

    datalist = hc18.datalist(tmp_path / "data" / "hc18_round2", tmp_path / "datalist.json")
    items = [item for part in datalist.values() for item in part]
    assert sorted(Path(item["image"]).name for item in items) == names
    for item in items:
        assert item["hc_ref_mm"] == pytest.approx(float(reference[Path(item["image"]).name]["head circumference (mm)"]), abs=0.1)
