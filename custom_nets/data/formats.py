"""
File formats by suffix: the one place that says which suffixes the project reads as what.

The basic tables name one format each; every table a reader or a listing uses is built from them, so a
suffix added to a format reaches every caller that accepts that format. Suffixes are lower case, with
their dot; callers compare them with the lower-cased file name (``name.lower().endswith(...)``, or
``path.suffix.lower() in ...`` where a one-dot suffix is enough).

Who uses which (each caller keeps its own accepted set; they differ on purpose):

- :data:`IMAGE_SUFFIXES`: 2D folder inference's default listing (:func:`custom_nets.engines.folder_inference.list_images`);
- :data:`PICTURE_SUFFIXES`, :data:`NIFTI_SUFFIXES`, :data:`DICOM_SUFFIXES`: the 2D image check and reader
  (:mod:`custom_nets.data.image2d`);
- :data:`DICOM_SUFFIXES`: also the single-image DICOM inputs that DICOM SEG output refers to (:mod:`custom_nets.engines.dicom_seg`);
- :data:`FRAME_SUFFIXES`, :data:`VIDEO_SUFFIXES`, :data:`DICOM_SUFFIXES`: stream sources (:mod:`custom_nets.engines.stream`,
  :mod:`custom_nets.data.synthetic_cine`);
- :data:`VOLUME_SUFFIXES`, :data:`METAIMAGE_DATA_SUFFIXES`, :data:`DICOM_SERIES_FILE_SUFFIXES` (with ``.ima``):
  3D volumes and DICOM series folders (:mod:`custom_nets.data.volume_io`);
- :data:`GEOMETRY_SUFFIXES`: files whose header carries the pixel size (:mod:`custom_nets.metrics.head_circumference`).

What is *written* for each input suffix is the writers' choice: :data:`custom_nets.engines.case_writers.OUTPUT_SUFFIX`.
"""

from __future__ import annotations

__all__ = [
    "FRAME_SUFFIXES",
    "PICTURE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "NRRD_SUFFIXES",
    "METAIMAGE_SUFFIXES",
    "METAIMAGE_DATA_SUFFIXES",
    "DICOM_SUFFIXES",
    "DICOM_SERIES_FILE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "IMAGE_SUFFIXES",
    "VOLUME_SUFFIXES",
    "GEOMETRY_SUFFIXES",
]

# --- basic tables: one format each ----------------------------------------------------------------

#: PNG and JPEG: the pictures a cine loop's frames come as (stream mode reads a folder of these).
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Pictures read with PIL: PNG, JPEG, BMP, TIFF.
PICTURE_SUFFIXES = (*FRAME_SUFFIXES, ".bmp", ".tif", ".tiff")
#: NIfTI-1/2, plain or gzipped.
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: NRRD: attached (``.nrrd``) or detached header (``.nhdr``).
NRRD_SUFFIXES = (".nrrd", ".nhdr")
#: MetaImage headers: detached (``.mhd``, data in a separate file) or attached (``.mha``).
METAIMAGE_SUFFIXES = (".mhd", ".mha")
#: The data files that detached MetaImage headers point to.
METAIMAGE_DATA_SUFFIXES = (".raw", ".zraw")
#: A DICOM file given on its own (a 2D image, a multi-frame cine loop).
DICOM_SUFFIXES = (".dcm", ".dicom")
#: Video containers (read with PyAV).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")

# --- derived tables: what each caller accepts ---------------------------------------------------

#: Slices in a DICOM series folder: also Siemens' ``.ima``. A file with one of these suffixes that pydicom
#: cannot parse is a corrupt slice, not a stray file. Only for series: a lone ``.ima`` is not a 2D input.
DICOM_SERIES_FILE_SUFFIXES = (*DICOM_SUFFIXES, ".ima")

#: File suffixes read as 2D images by default: pictures, NIfTI and DICOM files.
IMAGE_SUFFIXES = (*PICTURE_SUFFIXES, *NIFTI_SUFFIXES, *DICOM_SUFFIXES)

#: File suffixes read as one volume each, by format (a DICOM series is a folder). NIfTI lists ``.nii.gz``
#: first, the order messages name them in.
VOLUME_SUFFIXES: dict[str, tuple[str, ...]] = {
    "nifti": NIFTI_SUFFIXES[::-1],
    "nrrd": NRRD_SUFFIXES,
    "metaimage": METAIMAGE_SUFFIXES,
}

#: Image formats whose files carry the pixel size (MONAI readers put it into the affine). Of NRRD only
#: ``.nrrd``, as the head-circumference metric has always had it.
GEOMETRY_SUFFIXES = (*NIFTI_SUFFIXES, *DICOM_SUFFIXES, NRRD_SUFFIXES[0], *METAIMAGE_SUFFIXES)
