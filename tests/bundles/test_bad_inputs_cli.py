"""
Bad inputs through the real ``python -m monai.bundle run inference`` of each bundle: one batch folder per
bundle holds several broken or unusual inputs beside good ones, so one CLI run checks many cases. Each bad
case must fail alone with a line naming its file and its problem, the good ones must get their outputs,
the run must exit 1, and nothing partial may be left in the output folder. Random-weight checkpoints:
these check the handling, not the segmentation. Library-level cases are in ``test_bad_inputs.py``.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from custom_nets.data import synthetic_brats
from custom_nets import AdaptiveCENet
from custom_nets.data.synthetic_dicom import write_dicom_series
from image_files import write_dicom_2d, write_nifti_2d, write_png
from test_bad_inputs import read_only_dir  # noqa: F401  (a fixture, used by name)

pytestmark = pytest.mark.slow

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
RNG = np.random.default_rng(7)
PICTURE = (RNG.random((48, 64)) * 255).astype(np.uint8)
CT = (RNG.random((24, 24, 6)) * 1400 - 1000).astype(np.float32)
CT_AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _infer(bundle: str, inputs: Path, outputs: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(BUNDLES / bundle / "configs" / "inference.json"),
               "--input_dir", str(inputs), "--output_dir", str(outputs), "--ckpt_path", str(model), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=inputs.parent)


def _random_model(path: Path, in_channels: int, out_channels: int) -> Path:
    torch.manual_seed(0)
    torch.save(AdaptiveCENet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels).state_dict(), path)
    return path


def _status(csv_path: Path) -> dict[str, dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return {row["image"]: row for row in csv.DictReader(f)}


def _check_batch(result, outputs: Path, results_csv: str, expected: dict[str, str], outputs_of_good: dict[str, str]) -> None:
    """Exit 1; each bad case failed with its phrase and a log line naming it; good ones ok with their file; nothing else written."""
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    rows = _status(outputs / results_csv)
    assert set(rows) == set(expected) | set(outputs_of_good)
    for name, phrase in expected.items():
        assert rows[name]["status"].startswith("failed: ") and phrase in rows[name]["status"], rows[name]
        assert any(name in line and phrase in line for line in result.stdout.splitlines()), f"no log line names {name}"
        assert f"{len(expected)} image(s) failed:" in result.stdout
    for name, output in outputs_of_good.items():
        assert rows[name]["status"] == "ok", rows[name]
        assert (outputs / output).is_file()
    written = {p.name for p in outputs.iterdir()}
    assert not [n for n in written if n.startswith(".")], f"temporary files left: {written}"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("Patiënt batches")


# ----- fetal head (2D) -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hc18_model(root) -> Path:
    return _random_model(root / "hc18_model.pt", in_channels=1, out_channels=2)


def test_fetal_head_batch_with_bad_images(root, hc18_model):
    inputs, outputs = root / "hc18 in", root / "hc18 out"
    inputs.mkdir()
    write_png(inputs / "001_HC.png", PICTURE)
    write_png(inputs / "Patiënt scan 01.png", 255 - PICTURE)
    write_png(inputs / "blank.png", np.full((48, 64), 90, np.uint8))
    data = (inputs / "001_HC.png").read_bytes()
    (inputs / "truncated.png").write_bytes(data[: len(data) // 2])
    (inputs / "not_an_image.png").write_text("text saved with an image suffix")
    nib.save(nib.Nifti1Image(CT, CT_AFFINE), inputs / "ct_volume.nii.gz")
    Image.fromarray(PICTURE).convert("P").save(inputs / "palette.png")
    nan = PICTURE.astype(np.float32)
    nan[1, 1] = np.nan
    write_nifti_2d(inputs / "nan.nii.gz", nan)
    (inputs / "notes.txt").write_text("x")
    (inputs / ".DS_Store").write_bytes(b"\0")

    result = _infer("fetal_head_us_segmentation", inputs, outputs, hc18_model, "--image_size", "64")

    _check_batch(
        result, outputs, "head_circumference.csv",
        expected={
            "truncated.png": "cannot read the image (OSError: Truncated File Read",
            "not_an_image.png": "cannot read the image (UnidentifiedImageError",
            "ct_volume.nii.gz": "is a 3D volume of shape 24x24x6; this bundle segments 2D images",
            "palette.png": "palette (indexed-colour) image",
            "nan.nii.gz": "1 pixel(s) are NaN or infinite",
        },
        outputs_of_good={"001_HC.png": "001_HC_mask.png", "Patiënt scan 01.png": "Patiënt scan 01_mask.png", "blank.png": "blank_mask.png"},
    )  # fmt: skip
    assert _status(outputs / "head_circumference.csv")["blank.png"]["note"] == "constant image: empty mask"
    assert not np.asarray(Image.open(outputs / "blank_mask.png")).any()
    assert "skipped 2 entry(ies) that are not images: .DS_Store, notes.txt" in result.stdout
    assert Image.open(outputs / "Patiënt scan 01_mask.png").size == (64, 48)


def test_fetal_head_batch_with_ultrasound_dicom_exports_and_odd_images(root, hc18_model):
    """
    Colour and palette DICOM exports are read like the PNG of their picture; a palette DICOM without its table
    (GDCM aborts the process on it), degenerate sizes and values beyond float32 fail alone; pixdim 0 gets no HC.
    """
    inputs, outputs = root / "us in", root / "us out"
    inputs.mkdir()
    colour = np.repeat((RNG.random((48, 32, 3)) * 255).astype(np.uint8), 2, axis=1)  # pixel pairs share a colour (422)
    write_png(inputs / "colour.png", colour)
    exports = {"rgb.dcm": ("RGB", 0), "rgb planar.dcm": ("RGB", 1), "ybr_full.dcm": ("YBR_FULL", 0), "ybr_full_422.dcm": ("YBR_FULL_422", 0)}
    for name, (photometric, planar) in exports.items():
        write_dicom_2d(inputs / name, colour, pixel_spacing=(0.2, 0.3), photometric=photometric, planar_configuration=planar)
    for name, photometric in {"palette.dcm": "PALETTE COLOR", "monochrome1.dcm": "MONOCHROME1"}.items():
        write_dicom_2d(inputs / name, PICTURE, pixel_spacing=(0.2, 0.3), photometric=photometric)
    write_dicom_2d(inputs / "palette_no_table.dcm", PICTURE, pixel_spacing=(0.2, 0.3), photometric="PALETTE COLOR", colour_table=False)
    write_png(inputs / "dot.png", PICTURE[:1, :1])
    write_png(inputs / "strip.png", np.zeros((1, 4000)))
    head = np.zeros((48, 64), np.float32)
    head[10:30, 20:40] = 255
    slope = nib.Nifti1Image(head, np.diag([0.2, 0.2, 1.0, 1.0]))
    slope.header.set_slope_inter(1e38, 0.0)  # 255 x 1e38: finite in float64, infinite in float32
    nib.save(slope, inputs / "slope.nii.gz")
    zero = nib.Nifti1Image(PICTURE.astype(np.float32), None)
    zero.header.set_zooms((0.0, 0.0))  # stored as 0, read by nibabel as 1 mm
    nib.save(zero, inputs / "zero_pixdim.nii.gz")

    result = _infer("fetal_head_us_segmentation", inputs, outputs, hc18_model, "--image_size", "64")

    masks = {name: name.replace(".dcm", "_mask.dcm") for name in [*exports, "palette.dcm", "monochrome1.dcm"]}
    _check_batch(
        result, outputs, "head_circumference.csv",
        expected={
            "palette_no_table.dcm": "PALETTE COLOR DICOM without its colour table",
            "dot.png": "image of 1x1 pixels is too small (at least 16 pixels a side)",
            "strip.png": "image of 1x4000 pixels is too small",
            "slope.nii.gz": "pixel values from 0 to 2.55e+40 overflow the 32-bit floats",
        },
        outputs_of_good={**masks, "colour.png": "colour_mask.png", "zero_pixdim.nii.gz": "zero_pixdim_mask.nii.gz"},
    )  # fmt: skip
    assert "Traceback" not in result.stdout + result.stderr and "terminate called" not in result.stderr
    for name, mask in masks.items():
        ds = pydicom.dcmread(outputs / mask)
        assert (ds.Rows, ds.Columns) == (48, 64) and [float(v) for v in ds.PixelSpacing] == pytest.approx([0.2, 0.3]), name
    expected = np.asarray(Image.open(outputs / "colour_mask.png")) // 255  # what the PNG of the same picture gives
    for name in ("rgb.dcm", "rgb planar.dcm"):
        assert np.array_equal(pydicom.dcmread(outputs / masks[name]).pixel_array, expected), name
    rows = _status(outputs / "head_circumference.csv")
    assert rows["zero_pixdim.nii.gz"]["hc_mm"] == "" and rows["zero_pixdim.nii.gz"]["pixel_size_mm"] == ""
    assert rows["zero_pixdim.nii.gz"]["hc_note"].startswith("invalid pixel size 0 x 0 mm in the NIfTI header (pixdim)")
    assert float(rows["rgb.dcm"]["pixel_size_mm"]) == pytest.approx(np.sqrt(0.2 * 0.3))


def test_fetal_head_jpeg_with_exif_orientation_is_segmented_as_displayed(root, hc18_model):
    """A JPEG stored sideways (EXIF orientation 6) gets the mask of its displayed picture, in the displayed orientation."""
    inputs, outputs = root / "hc18 in exif", root / "hc18 out exif"
    inputs.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF Orientation: shown turned 90 degrees clockwise
    Image.fromarray(PICTURE).save(inputs / "phone.jpg", exif=exif, quality=95)
    write_png(inputs / "displayed.png", np.rot90(np.asarray(Image.open(inputs / "phone.jpg")), -1))  # what a viewer shows

    result = _infer("fetal_head_us_segmentation", inputs, outputs, hc18_model, "--image_size", "64")

    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    mask, expected = (np.asarray(Image.open(outputs / name)) for name in ("phone_mask.png", "displayed_mask.png"))
    assert mask.shape == (64, 48)  # displayed: 48 wide, 64 high; stored it is 64 wide, 48 high
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("where", ["parent-is-a-file", "read-only"])
def test_unwritable_output_folder_fails_before_any_case(root, hc18_model, where, request):
    inputs = root / f"hc18 in {where}"
    inputs.mkdir()
    write_png(inputs / "001_HC.png", PICTURE)
    if where == "read-only":
        outputs = request.getfixturevalue("read_only_dir")
        phrase = "output folder is not writable"
    else:
        (root / "blocker.txt").write_text("a file where a folder should be")
        outputs, phrase = root / "blocker.txt" / "out", "output folder is not writable (Not a directory)"
    result = _infer("fetal_head_us_segmentation", inputs, outputs, hc18_model, "--image_size", "64")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"ERROR: {outputs}: {phrase}")
    assert "Traceback" not in result.stderr and "[1/1]" not in result.stdout  # no case was processed


@pytest.mark.parametrize(
    "bundle, channels, inside",
    [("fetal_head_us_segmentation", 1, ""), ("lung_nodule_ct_segmentation", 1, "masks"), ("brain_tumor_mri_segmentation", 4, "masks")],
    ids=["fetal-head-same-folder", "lung-ct-inside", "brain-mri-inside"],
)
def test_output_folder_in_the_input_folder_fails_before_any_case(root, bundle, channels, inside):
    """A second run into its own input folder would read the first run's masks as inputs (``*_mask_mask.png``)."""
    inputs = root / f"in place {bundle}"
    if bundle == "brain_tumor_mri_segmentation":
        synthetic_brats.generate(str(inputs), num_cases=1, shape=(16, 16, 8), seed=5)
    elif bundle == "fetal_head_us_segmentation":
        inputs.mkdir()
        write_png(inputs / "001_HC.png", PICTURE)
    else:
        inputs.mkdir()
        nib.save(nib.Nifti1Image(CT, CT_AFFINE), inputs / "ct.nii.gz")
    before = sorted(p.name for p in inputs.rglob("*"))
    outputs = inputs / inside if inside else inputs
    model = _random_model(root / f"{bundle}.pt", in_channels=channels, out_channels=3 if channels == 4 else 2)
    result = _infer(bundle, inputs, outputs, model, "--image_size", "64" if "fetal" in bundle else "[32,32]")
    assert result.returncode == 1
    where = "is the input folder" if not inside else f"is inside the input folder {inputs}"
    assert result.stderr.strip().splitlines()[-1].startswith(f"ERROR: {outputs}: output folder {where}"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "[1/1]" not in result.stdout  # no case was processed
    assert sorted(p.name for p in inputs.rglob("*")) == before  # nothing written, no folder created


# ----- lung CT (3D volumes, DICOM) -----------------------------------------------------------------------


def _dicom(folder: Path, depth: int = 6, uid: str | None = None) -> Path:
    write_dicom_series(CT[..., :depth].astype(np.int16), folder, spacing=(0.8, 0.8, 2.5), series_uid=uid)
    return folder


def test_lung_ct_batch_with_bad_volumes(root):
    model = _random_model(root / "ct_model.pt", in_channels=1, out_channels=2)
    inputs, outputs = root / "ct in", root / "ct out"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(CT, CT_AFFINE), inputs / "scän 01.nii.gz")
    _dicom(inputs / "série 02")
    nib.save(nib.Nifti1Image(np.full_like(CT, -1000.0), CT_AFFINE), inputs / "air.nii.gz")
    data = (inputs / "scän 01.nii.gz").read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    nib.save(nib.Nifti1Image(CT[..., 0], CT_AFFINE), inputs / "one_slice.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([CT, CT], -1), CT_AFFINE), inputs / "two_channels.nii.gz")
    inf = CT.copy()
    inf[3, 3, 3] = np.inf
    nib.save(nib.Nifti1Image(inf, CT_AFFINE), inputs / "inf.nii.gz")
    _dicom(inputs / "two_series", uid="1.2.826.0.1.3680043.8.498.11")
    for i, path in enumerate(_dicom(root / "other", depth=3, uid="1.2.826.0.1.3680043.8.498.12").iterdir()):
        shutil.move(path, inputs / "two_series" / f"other_{i}.dcm")
    short = _dicom(inputs / "short_slice") / "slice_0002.dcm"
    short.write_bytes(short.read_bytes()[:-300])
    write_png(inputs / "screenshot.png", PICTURE)
    (inputs / "notes.txt").write_text("x")

    result = _infer("lung_nodule_ct_segmentation", inputs, outputs, model, "--image_size", "[32,32]")

    _check_batch(
        result, outputs, "results.csv",
        expected={
            "truncated.nii.gz": "cannot read truncated.nii.gz: EOFError",
            "one_slice.nii.gz": "one_slice.nii.gz is a 2D image (24x24); this bundle segments 3D volumes",
            "two_channels.nii.gz": "two_channels.nii.gz holds 2 volumes or channels",
            "inf.nii.gz": "inf.nii.gz: 1 voxel(s) are NaN or infinite",
            "two_series": "2 DICOM image series in one folder (6, 3 slices)",
            "short_slice": "truncated DICOM slice(s) slice_0002.dcm",
        },
        outputs_of_good={"scän 01.nii.gz": "scän 01_seg.nii.gz", "série 02": "série 02_seg.nii.gz", "air.nii.gz": "air_seg.nii.gz"},
    )  # fmt: skip
    assert nib.load(outputs / "série 02_seg.nii.gz").shape == CT.shape
    assert not np.asarray(nib.load(outputs / "air_seg.nii.gz").dataobj).any()
    assert "skipped 2 entry(ies) that are not volumes: notes.txt, screenshot.png" in result.stdout
    assert (outputs / "nodules.csv").is_file()


# ----- brain MRI (BraTS case folders) --------------------------------------------------------------------


def test_brain_mri_batch_with_bad_cases(root):
    model = _random_model(root / "brats_model.pt", in_channels=4, out_channels=3)
    inputs, outputs = Path(synthetic_brats.generate(str(root / "brats in"), num_cases=5, shape=(16, 16, 8), seed=5)), root / "brats out"
    (inputs / "name_mapping.csv").unlink()
    case = lambda n: inputs / f"BraTS20_Training_00{n}"  # noqa: E731
    (case(2) / "BraTS20_Training_002_t2.nii.gz").unlink()  # missing sequence
    flair = nib.load(case(3) / "BraTS20_Training_003_flair.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(flair.dataobj)[..., 0], flair.affine), case(3) / "BraTS20_Training_003_flair.nii.gz")  # 2D sequence
    t1ce = nib.load(case(4) / "BraTS20_Training_004_t1ce.nii.gz")
    moved = t1ce.affine.copy()
    moved[0, 3] += 3.0
    nib.save(nib.Nifti1Image(np.asarray(t1ce.dataobj), moved), case(4) / "BraTS20_Training_004_t1ce.nii.gz")  # not co-registered
    t2 = nib.load(case(5) / "BraTS20_Training_005_t2.nii.gz")
    data = np.asarray(t2.dataobj).astype(np.float32)
    data[4, 4, 4] = np.nan
    nib.save(nib.Nifti1Image(data, t2.affine), case(5) / "BraTS20_Training_005_t2.nii.gz")
    renamed = inputs / "Patiënt 01"  # a case folder whose name has a space and a non-ASCII letter
    case(1).rename(renamed)
    for path in renamed.iterdir():
        path.rename(renamed / path.name.replace("BraTS20_Training_001", "Patiënt 01"))
    (inputs / "notes.txt").write_text("x")

    result = _infer("brain_tumor_mri_segmentation", inputs, outputs, model, "--image_size", "[32,32]")

    _check_batch(
        result, outputs, "results.csv",
        expected={
            "BraTS20_Training_002": "missing MRI sequence(s) t2",
            "BraTS20_Training_003": "BraTS20_Training_003_flair.nii.gz is a 2D image (16x16)",
            "BraTS20_Training_004": "BraTS20_Training_004_t1ce.nii.gz is not on the voxel grid of BraTS20_Training_004_t1.nii.gz",
            "BraTS20_Training_005": "BraTS20_Training_005_t2.nii.gz: 1 voxel(s) are NaN or infinite",
        },
        outputs_of_good={"Patiënt 01": "Patiënt 01_seg.nii.gz"},
    )  # fmt: skip
    assert nib.load(outputs / "Patiënt 01_seg.nii.gz").shape == (16, 16, 8)
    assert "skipped 1 entry(ies) that are not case folders: notes.txt" in result.stdout


@pytest.mark.parametrize("command", ["inference", "evaluating"])
def test_a_checkpoint_of_another_network_is_one_line(root, tmp_path, command):
    """A CE-Net checkpoint given to the default AdaptiveCENet bundle: one line naming both, no traceback."""
    from custom_nets import CENet

    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    torch.save(CENet(spatial_dims=2, in_channels=1, out_channels=2).state_dict(), model)
    inputs = root / f"hc18 in {command}"
    inputs.mkdir()
    write_png(inputs / "001_HC.png", PICTURE)
    configs = BUNDLES / "fetal_head_us_segmentation" / "configs"
    if command == "inference":
        result = _infer("fetal_head_us_segmentation", inputs, tmp_path / "out", model, "--image_size", "64")
    else:
        result = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
             f"['{configs / 'train.json'}','{configs / 'evaluate.json'}']", "--bundle_root", str(tmp_path),
             "--ckpt_dir", str(model.parent), "--image_size", "64", "--num_workers", "0"],
            capture_output=True, text=True,
        )  # fmt: skip
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"checkpoint {model} does not fit the configured network AdaptiveCENet: tensors" in error[0]
    assert "first " in error[0] and "another --network_def" in error[0]
