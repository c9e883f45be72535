"""
BraTS brain-tumour MRI: dataset layouts, label conventions and brain-masked intensity scaling.

Layouts (file names are ``str.format`` patterns relative to the dataset folder, with ``{case}`` the
case folder name and ``{sequence}`` one entry of ``sequences``):

- BraTS 2020 (default): ``{case}/{case}_{sequence}.nii.gz``, sequences ``t1, t1ce, t2, flair``,
  labels ``{case}/{case}_seg.nii.gz`` with 0 background, 1 necrotic/non-enhancing core, 2 edema,
  4 enhancing tumour.
- BraTS 2013/2015 as in our sample: ``{case}/{sequence}_subtrMeanDivStd.nii.gz``, sequences
  ``Flair, T1c``, labels ``{case}/OTMultiClass.nii.gz`` (0-4: 1 necrosis, 2 edema, 3 non-enhancing,
  4 enhancing) and a brain mask ``{case}/brainmask.nii.gz``.

MONAI Label serves one file per study: :func:`stack_case_sequences` (``python -m custom_nets brats_studies``)
writes a case's sequences as one 4D NIfTI, which the bundle's inference and training read like the case folder.

Labels become the three overlapping BraTS regions as channels, in the order of :data:`REGIONS`:
tumour core (TC), whole tumour (WT), enhancing tumour (ET); :data:`BRATS_CONVENTIONS` says which
labels make up each region.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from custom_nets.atomic_write import atomic_path
from custom_nets.data.splits import load_or_create_datalist
from custom_nets.data.volume_io import GRID_AFFINE_TOLERANCE, check_same_grid, read_volume
from custom_nets.errors import InputError

__all__ = [
    "REGIONS",
    "BRATS_CONVENTIONS",
    "BRATS2020_LAYOUT",
    "BRATS2013_LAYOUT",
    "BraTSCaseError",
    "brats_case",
    "brats_case_dirs",
    "brats_cases",
    "check_label_values",
    "check_case_volumes",
    "datalist",
    "BRATS_LAYOUTS",
    "stack_case_sequences",
    "brats_studies_command",
    "region_masks",
    "regions_to_labels",
    "BraTSCaseFilesd",
    "ConvertBraTSLabelsToRegionsd",
    "RegionsToBraTSLabelsd",
    "RobustBrainNormalized",
]

logger = logging.getLogger(__name__)

#: Output channels, in order: tumour core, whole tumour, enhancing tumour.
REGIONS = ("TC", "WT", "ET")

#: For each label convention: the labels each region is made of, and every label value allowed.
BRATS_CONVENTIONS: dict[str, dict[str, Any]] = {
    "brats2020": {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,), "labels": (0, 1, 2, 4)},
    "brats2013": {"TC": (1, 3, 4), "WT": (1, 2, 3, 4), "ET": (4,), "labels": (0, 1, 2, 3, 4)},
}

#: File-name patterns of the BraTS 2020 release.
BRATS2020_LAYOUT = {
    "sequences": ("t1", "t1ce", "t2", "flair"),
    "image_pattern": "{case}/{case}_{sequence}.nii.gz",
    "label_pattern": "{case}/{case}_seg.nii.gz",
    "brain_mask_pattern": None,
}

#: File-name patterns of the BraTS 2013/2015 sample in ``shared/data/brats2015``.
BRATS2013_LAYOUT = {
    "sequences": ("Flair", "T1c"),
    "image_pattern": "{case}/{sequence}_subtrMeanDivStd.nii.gz",
    "label_pattern": "{case}/OTMultiClass.nii.gz",
    "brain_mask_pattern": "{case}/brainmask.nii.gz",
}


#: The layouts by name, as ``python -m custom_nets brats_studies --layout`` takes them.
BRATS_LAYOUTS = {"brats2020": BRATS2020_LAYOUT, "brats2013": BRATS2013_LAYOUT}


class BraTSCaseError(InputError):
    """A BraTS case that cannot be used; the message is one line that starts with the case name."""


def _convention(convention: str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(convention, Mapping):
        missing = [k for k in (*REGIONS, "labels") if k not in convention]
        if missing:
            raise InputError(f"a label convention needs the keys {list(REGIONS) + ['labels']}, missing {missing}")
        return convention
    if convention not in BRATS_CONVENTIONS:
        raise InputError(f"unknown BraTS label convention {convention!r}; choose one of {sorted(BRATS_CONVENTIONS)}")
    return BRATS_CONVENTIONS[convention]


def brats_case(
    case_dir: str | os.PathLike,
    sequences: Sequence[str] = BRATS2020_LAYOUT["sequences"],
    image_pattern: str = BRATS2020_LAYOUT["image_pattern"],
    label_pattern: str | None = BRATS2020_LAYOUT["label_pattern"],
    brain_mask_pattern: str | None = None,
    check_files: bool = True,
) -> dict[str, Any]:
    """
    The datalist entry of one case folder: ``{"case", "image": [one path per sequence], "label",
    "brain_mask"}`` (``label``/``brain_mask`` only when their pattern is given).

    Args:
        case_dir: the case folder; its name is ``{case}`` in the patterns.
        sequences: MRI sequences, in channel order.
        image_pattern: path pattern of a sequence file (or of a DICOM series folder), relative to the case folder's parent.
        label_pattern: path pattern of the label file, or ``None`` (inference).
        brain_mask_pattern: path pattern of a brain mask, or ``None`` (the brain is where any sequence is non-zero).
        check_files: raise when a file is missing.

    Raises:
        BraTSCaseError: a missing sequence, label or brain-mask file (when ``check_files``).
    """
    case_dir = Path(case_dir)
    case, root = case_dir.name, case_dir.parent
    if not sequences:
        raise ValueError("sequences must name at least one MRI sequence")
    item: dict[str, Any] = {
        "case": case,
        "image": [os.fspath(root / image_pattern.format(case=case, sequence=s)) for s in sequences],
    }
    if label_pattern:
        item["label"] = os.fspath(root / label_pattern.format(case=case))
    if brain_mask_pattern:
        item["brain_mask"] = os.fspath(root / brain_mask_pattern.format(case=case))
    if check_files:
        # a sequence is a file (NIfTI...) or a DICOM series folder
        missing = [s for s, p in zip(sequences, item["image"]) if not (os.path.isfile(p) or os.path.isdir(p))]
        if missing:
            expected = Path(image_pattern.format(case=case, sequence=missing[0])).name
            raise BraTSCaseError(
                f"{case}: missing MRI sequence(s) {', '.join(missing)} (expected e.g. {expected} in {case_dir})"
            )
        for key in ("label", "brain_mask"):
            if key in item and not os.path.isfile(item[key]):
                raise BraTSCaseError(f"{case}: missing {key.replace('_', ' ')} file {Path(item[key]).name} in {case_dir}")
    return item


def brats_case_dirs(dataset_dir: str | os.PathLike) -> list[str]:
    """
    The case folders in ``dataset_dir``, sorted (files such as ``name_mapping.csv`` and hidden entries are
    not cases; the skipped names are logged in one line).

    Raises:
        BraTSCaseError: ``dataset_dir`` is not a folder or holds no sub-folder.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise BraTSCaseError(f"{dataset_dir}: BraTS dataset folder not found")
    entries = sorted(dataset_dir.iterdir())
    case_dirs = [os.fspath(p) for p in entries if p.is_dir() and not p.name.startswith(".")]
    skipped = [p.name for p in entries if not p.is_dir() or p.name.startswith(".")]
    if skipped:
        logger.info("%s: skipped %d entry(ies) that are not case folders: %s", dataset_dir, len(skipped), ", ".join(skipped))
    if not case_dirs:
        raise BraTSCaseError(f"{dataset_dir}: no case folders (one folder of sequence files per case expected)")
    return case_dirs


def brats_cases(
    dataset_dir: str | os.PathLike,
    sequences: Sequence[str] = BRATS2020_LAYOUT["sequences"],
    image_pattern: str = BRATS2020_LAYOUT["image_pattern"],
    label_pattern: str | None = BRATS2020_LAYOUT["label_pattern"],
    brain_mask_pattern: str | None = None,
    check_files: bool = True,
) -> list[dict[str, Any]]:
    """
    The datalist entries of every case folder in ``dataset_dir`` (sorted; files such as
    ``name_mapping.csv`` and hidden entries are ignored). Arguments as in :func:`brats_case`.

    Raises:
        BraTSCaseError: ``dataset_dir`` is not a folder or has no case folder; a case with a missing file.
    """
    return [
        brats_case(d, sequences, image_pattern, label_pattern, brain_mask_pattern, check_files)
        for d in brats_case_dirs(dataset_dir)
    ]


def check_label_values(label_path: str | os.PathLike, convention: str | Mapping[str, Any], case: str | None = None) -> list[int]:
    """
    Read a label volume and check that every value is a whole number allowed by ``convention``
    (:data:`BRATS_CONVENTIONS`); return the values found.

    Raises:
        BraTSCaseError: one line naming the case, the label file and the values that do not belong there.

    Example::

        check_label_values("BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz", "brats2020")  # [0, 1, 2, 4]
    """
    conv = _convention(convention)
    label_path = Path(label_path)
    case = case or label_path.parent.name
    values = torch.unique(read_volume(label_path, case=case))
    fractional = values[values != values.round()]
    if fractional.numel():
        raise BraTSCaseError(
            f"{case}: {label_path.name} has non-integer label values (e.g. {float(fractional[0]):g}); "
            "was it resampled with linear interpolation? labels need nearest-neighbour"
        )
    found = [int(v) for v in values.tolist()]
    unknown = sorted(set(found) - set(conv["labels"]))
    if unknown:
        name = convention if isinstance(convention, str) else "the given convention"
        raise BraTSCaseError(
            f"{case}: {label_path.name} has label values {unknown} outside {name} (allowed {list(conv['labels'])}); "
            "is --label_convention right?"
        )
    return found


def check_case_volumes(
    item: Mapping[str, Any],
    label_convention: str | Mapping[str, Any] | None = None,
    tolerance: float = GRID_AFFINE_TOLERANCE,
) -> None:
    """
    Check one datalist entry of :func:`brats_case` before training: every sequence, the label and the
    brain mask readable as one 3D volume each and on one voxel grid (shape and affine, from headers:
    :func:`custom_nets.data.volume_io.check_same_grid`); with ``label_convention``, also the label's values
    (:func:`check_label_values`, which reads the label). A label without any tumour is allowed.

    Raises:
        VolumeInputError, BraTSCaseError: one line naming the case and the file.
    """
    case = str(item["case"])
    paths = [*item["image"], *(item[k] for k in ("label", "brain_mask") if item.get(k))]
    check_same_grid(paths, case, tolerance)
    if label_convention is not None and item.get("label"):
        check_label_values(item["label"], label_convention, case)


def datalist(
    dataset_dir: str | os.PathLike,
    datalist_file: str | os.PathLike,
    sequences: Sequence[str] = BRATS2020_LAYOUT["sequences"],
    image_pattern: str = BRATS2020_LAYOUT["image_pattern"],
    label_pattern: str = BRATS2020_LAYOUT["label_pattern"],
    brain_mask_pattern: str | None = None,
    subject_regex: str | None = None,
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    seed: int = 0,
    label_convention: str | Mapping[str, Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """
    The training/validation/test datalist of a labelled BraTS dataset, split by subject (seeded,
    ``fractions``), written once to ``datalist_file`` and reused (see
    :func:`custom_nets.data.splits.load_or_create_datalist`). Before the datalist is written, every case
    is checked with :func:`check_case_volumes`, so a broken case stops the run with one line before
    training starts rather than in the middle of an epoch.

    Args:
        dataset_dir: folder of case folders.
        datalist_file: JSON file of the split.
        sequences, image_pattern, label_pattern, brain_mask_pattern: see :func:`brats_case`.
        subject_regex: regular expression whose first group (or whole match) is the subject id in a
            case name, for datasets with several cases per subject (BraTS 2013: ``"^(.*pat\\d+)"``);
            ``None``: every case is its own subject.
        fractions: training, validation, test fractions.
        seed: split seed.
        label_convention: when given (``"brats2020"``, ``"brats2013"``), every label is read once and
            values outside the convention are refused, naming the file; ``None`` checks headers only.

    Example::

        splits = datalist("MICCAI_BraTS2020_TrainingData", "datalist.json", label_convention="brats2020")
        splits["training"][0]  # {"case": "BraTS20_Training_001", "image": [...4 paths], "label": ...}
    """
    pattern = re.compile(subject_regex) if subject_regex else None

    def subject_of(item: dict[str, Any]) -> str:
        if pattern is None:
            return item["case"]
        match = pattern.search(item["case"])
        if match is None:
            raise BraTSCaseError(f"{item['case']}: subject_regex {subject_regex!r} does not match the case name")
        return match.group(1) if match.groups() else match.group(0)

    return load_or_create_datalist(
        datalist_file,
        dataset_dir,
        make_items=lambda: _checked(brats_cases(dataset_dir, sequences, image_pattern, label_pattern, brain_mask_pattern), label_convention),
        subject_of=subject_of,
        path_keys=("image", "label", "brain_mask"),
        fractions=fractions,
        seed=seed,
        settings={
            "sequences": list(sequences),
            "image_pattern": image_pattern,
            "label_pattern": label_pattern,
            "brain_mask_pattern": brain_mask_pattern,
            "subject_regex": subject_regex,
        },
    )


def _checked(items: list[dict[str, Any]], label_convention: str | Mapping[str, Any] | None) -> list[dict[str, Any]]:
    for item in items:
        check_case_volumes(item, label_convention)
    return items


def stack_case_sequences(
    case_dir: str | os.PathLike,
    output_file: str | os.PathLike,
    sequences: Sequence[str] = BRATS2020_LAYOUT["sequences"],
    image_pattern: str = BRATS2020_LAYOUT["image_pattern"],
    brain_mask_pattern: str | None = None,
) -> Path:
    """
    Write the sequences of one case folder as one NIfTI of shape ``(I, J, K, len(sequences))``, channels in
    the order of ``sequences`` (the bundle's channel order), with the first sequence's affine and
    qform/sform: a MONAI Label study, which must be one file. With a brain mask, voxels outside it are set
    to 0, so that the bundle (which takes the non-zero voxels as the brain when no mask comes with the
    study) scales intensities over the same brain as with the case folder.

    Args:
        case_dir: the case folder.
        output_file: the ``.nii.gz`` to write (written through a temporary file: complete or absent).
        sequences, image_pattern, brain_mask_pattern: see :func:`brats_case`.

    Raises:
        BraTSCaseError, VolumeInputError: a missing sequence, or sequences not on one voxel grid (one line).

    Example::

        stack_case_sequences("BraTS20_Training_001", "studies/BraTS20_Training_001.nii.gz")  # t1, t1ce, t2, flair
    """
    item = brats_case(case_dir, sequences, image_pattern, None, brain_mask_pattern)
    check_same_grid([*item["image"], *([item["brain_mask"]] if "brain_mask" in item else [])], item["case"])
    first = nib.load(item["image"][0])
    data = np.stack([np.asanyarray(nib.load(p).dataobj) for p in item["image"]], axis=-1)
    if data.dtype == np.float64:  # scaled integers come out as float64; the bundle reads float32 anyway: half the file
        data = data.astype(np.float32)
    if "brain_mask" in item:
        data[np.asanyarray(nib.load(item["brain_mask"]).dataobj) <= 0] = 0
    image = nib.Nifti1Image(data, first.affine, first.header)
    image.header.set_data_dtype(data.dtype)  # the stacked dtype, not the first file's (nibabel would cast to it)
    output_file = Path(output_file)
    with atomic_path(output_file) as tmp:
        nib.save(image, os.fspath(tmp))
    return output_file


def brats_studies_command(dataset_dir: str, output_dir: str, layout: str = "brats2020", labels: bool = False) -> None:
    """
    Write every case folder of DATASET_DIR as one 4D NIfTI study ``OUTPUT_DIR/<case>.nii.gz``
    (:func:`stack_case_sequences`), for the brain bundle in MONAI Label; with ``--labels true`` also each
    case's label map as ``OUTPUT_DIR/labels/final/<case>.nii.gz``, so MONAI Label counts the case as
    labelled (training data for its *Train*).

    Usage: ``python -m custom_nets brats_studies DATASET_DIR OUTPUT_DIR [--layout brats2020|brats2013] [--labels true]``
    """
    import shutil

    from custom_nets.errors import install_excepthook
    from custom_nets.flags import as_flag

    install_excepthook()
    if layout not in BRATS_LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose one of {sorted(BRATS_LAYOUTS)}")
    lay, labels = BRATS_LAYOUTS[layout], as_flag(labels, "labels")  # a typo fails before any file is written
    for case_dir in brats_case_dirs(dataset_dir):
        case = Path(case_dir).name
        study = stack_case_sequences(case_dir, Path(output_dir) / f"{case}.nii.gz", lay["sequences"], lay["image_pattern"], lay["brain_mask_pattern"])
        print(f"{study} ({', '.join(lay['sequences'])})")
        if labels:
            label = brats_case(case_dir, lay["sequences"], lay["image_pattern"], lay["label_pattern"], lay["brain_mask_pattern"])["label"]
            final = Path(output_dir) / "labels" / "final" / study.name
            final.parent.mkdir(parents=True, exist_ok=True)
            print(shutil.copyfile(label, final))


def region_masks(label: torch.Tensor, convention: str | Mapping[str, Any] = "brats2020") -> torch.Tensor:
    """
    ``(1, *spatial)`` label map -> ``(3, *spatial)`` float masks of TC, WT, ET under ``convention``.

    Raises:
        ValueError: label values the convention does not know (e.g. 3 under ``brats2020``).
    """
    conv = _convention(convention)
    lab = torch.as_tensor(label).round().to(torch.int64)
    values = torch.unique(lab).tolist()
    unknown = sorted(set(values) - set(conv["labels"]))
    if unknown:
        name = convention if isinstance(convention, str) else "the given convention"
        raise ValueError(f"label values {unknown} are not part of {name} (labels {list(conv['labels'])})")
    lab = lab[0] if lab.ndim > 1 and lab.shape[0] == 1 else lab
    out = torch.stack([torch.isin(lab, torch.tensor(conv[r])) for r in REGIONS]).to(torch.float32)
    return out


def regions_to_labels(regions: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """
    ``(3, *spatial)`` TC/WT/ET probabilities or masks -> ``(1, *spatial)`` uint8 label map in the
    BraTS 2020 convention (the format of BraTS submissions): 4 enhancing tumour, 1 the rest of the
    tumour core, 2 the rest of the whole tumour. Regions are nested (ET inside TC inside WT), as BraTS defines.
    """
    tc, wt, et = (regions[i] > threshold for i in range(3))
    labels = torch.zeros(regions.shape[1:], dtype=torch.uint8, device=regions.device)
    labels[wt] = 2
    labels[tc] = 1
    labels[et] = 4
    return labels[None]


class BraTSCaseFilesd(MapTransform):
    """
    Dictionary transform for inference on case folders: replaces a case folder path under ``keys`` by
    the list of its sequence files (:func:`brats_case`), adds ``case`` and, with a brain-mask pattern,
    ``brain_mask``. A value that is already a list of files, or one file (the sequences stacked in a 4D
    NIfTI by :func:`stack_case_sequences`, as MONAI Label sends a study), is left as it is.

    Args:
        keys: keys holding a case folder.
        sequences, image_pattern, brain_mask_pattern: see :func:`brats_case`.
        case_key: key the case name is written to.

    Raises:
        BraTSCaseError: a missing sequence or brain-mask file, naming the case.
        VolumeInputError: a brain mask that is not on the first sequence's voxel grid.

    Example::

        BraTSCaseFilesd(keys="image", sequences=["flair", "t1ce"])({"image": "cases/BraTS20_Validation_001"})
    """

    def __init__(
        self,
        keys: KeysCollection,
        sequences: Sequence[str] = BRATS2020_LAYOUT["sequences"],
        image_pattern: str = BRATS2020_LAYOUT["image_pattern"],
        brain_mask_pattern: str | None = None,
        case_key: str = "case",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.sequences, self.image_pattern, self.brain_mask_pattern = list(sequences), image_pattern, brain_mask_pattern
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (list, tuple)) or os.path.isfile(d[key]):
                continue
            item = brats_case(d[key], self.sequences, self.image_pattern, None, self.brain_mask_pattern)
            d[key] = item["image"]
            d.setdefault(self.case_key, item["case"])
            if "brain_mask" in item:
                check_same_grid([item["image"][0], item["brain_mask"]], item["case"])  # the sequences: when read
                d["brain_mask"] = item["brain_mask"]
        return d


class ConvertBraTSLabelsToRegionsd(MapTransform):
    """
    Dictionary transform: a one-channel BraTS label map -> three channels TC, WT, ET (float 0/1).

    Args:
        keys: label keys.
        convention: ``"brats2020"`` (TC = 1|4, WT = 1|2|4, ET = 4), ``"brats2013"`` (TC = 1|3|4,
            WT = 1|2|3|4, ET = 4) or a mapping with the keys ``TC``, ``WT``, ``ET`` and ``labels``.
        case_key: key of the case name, used in error messages.
        allow_missing_keys: skip absent keys.

    Raises:
        ValueError: a label value the convention does not know, naming the case (wrong convention?).

    Example::

        ConvertBraTSLabelsToRegionsd(keys="label", convention="brats2013")
    """

    def __init__(
        self,
        keys: KeysCollection,
        convention: str | Mapping[str, Any] = "brats2020",
        case_key: str = "case",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        _convention(convention)
        self.convention = convention
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            try:
                regions = region_masks(label, self.convention)
            except ValueError as e:
                meta = label.meta if isinstance(label, MetaTensor) else {}
                case = d.get(self.case_key) or meta.get("case")
                source = Path(str(meta["source_path"])).name + ": " if meta.get("source_path") else ""
                raise BraTSCaseError(f"{case or key}: {source}{e}; is the label convention right?") from None
            d[key] = convert_to_dst_type(regions, label, dtype=torch.float32)[0]
        return d


class RegionsToBraTSLabelsd(MapTransform):
    """
    Dictionary transform: TC/WT/ET channels -> one BraTS 2020 label map (see :func:`regions_to_labels`).

    Args:
        keys: keys of the region probabilities or masks.
        threshold: probability above which a voxel belongs to a region.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, threshold: float = 0.5, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            labels = regions_to_labels(torch.as_tensor(value), self.threshold)
            d[key] = convert_to_dst_type(labels, value, dtype=torch.uint8)[0]
        return d


class RobustBrainNormalized(MapTransform):
    """
    Per-sequence robust intensity scaling inside the brain: each channel is mapped linearly so that its
    ``lower`` and ``upper`` percentiles over brain voxels become 0 and 1, clipped to [0, 1]; voxels
    outside the brain are set to 0. In place on float32 data.

    The brain is ``mask_key`` > 0 when the dictionary holds such a mask (e.g. BraTS 2013's
    ``brainmask``), else the voxels where any channel is non-zero (BraTS skull-stripped volumes have
    exactly 0 outside the brain).

    Args:
        keys: image keys ``(C, *spatial)``.
        mask_key: key of an optional brain mask ``(1, *spatial)``.
        lower: lower percentile (0-100).
        upper: upper percentile (0-100).
        allow_missing_keys: skip absent keys.

    Example::

        RobustBrainNormalized(keys="image", mask_key="brain_mask", lower=0.5, upper=99.5)
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = None,
        lower: float = 0.5,
        upper: float = 99.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        self.mask_key, self.lower, self.upper = mask_key, lower, upper

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if self.mask_key is not None and self.mask_key in d:
                brain = torch.as_tensor(d[self.mask_key])[0] > 0
            else:
                brain = (torch.as_tensor(image) != 0).any(dim=0)
            if image.dtype != torch.float32:
                image = image.float()
            if tuple(brain.shape) != tuple(image.shape[1:]):
                case = image.meta.get("case", key) if isinstance(image, MetaTensor) else key
                raise BraTSCaseError(f"{case}: brain mask shape {tuple(brain.shape)} differs from the image's {tuple(image.shape[1:])}")
            brain_np = brain.cpu().numpy()
            outside = ~brain
            for c in range(image.shape[0]):
                channel = image[c]
                values = channel.detach().cpu().numpy()[brain_np]
                if values.size == 0:
                    channel.zero_()
                    continue
                lo, hi = np.percentile(values, [self.lower, self.upper])
                scale = 1.0 / (hi - lo) if hi > lo else 0.0
                channel.sub_(float(lo)).mul_(float(scale)).clamp_(0.0, 1.0)
                channel[outside] = 0.0
            d[key] = image
        return d
