"""DICOM in and out for the bundles: series checks before loading, a series writer, DICOM SEG output.

* :func:`check_dicom_series` / :class:`CheckDicomSeriesd`: a datalist entry may name a DICOM series
  folder, which MONAI's ``LoadImaged`` reads with its ITK reader (GDCM sorts the slices by position).
  ITK reads a folder with a missing slice, slices of another orientation or size, or several series
  without complaint (it picks one series, or spaces the slices evenly); the check runs first and
  raises one :class:`~shared_nets.data.DataError` line naming the folder instead.
* :func:`write_dicom_series` / :func:`nifti_to_dicom`: one CT (or MR) file per slice from a volume
  and its affine, with Image Position/Orientation (Patient), Pixel Spacing, Slice Thickness and
  Rescale Slope/Intercept, one Series Instance UID (``python -m tools nifti_to_dicom``).
* :func:`write_dicom_seg` / :class:`SaveDicomSegd`: a label map written as a DICOM Segmentation
  (highdicom) that references the source series, one segment per class of the bundle's
  ``channel_def``, with coded anatomy (:func:`segment_codes`); :func:`read_dicom_seg` reads one back
  onto the series' grid.

pydicom and highdicom are imported inside the functions, so that importing this module (the bundles'
preprocessing does) costs nothing when no DICOM is involved.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from shared_nets.data import DataError, source_name
from shared_nets.io import atomic_path

__all__ = [
    "CheckDicomSeriesd",
    "SaveDicomSegd",
    "check_dicom_series",
    "nifti_to_dicom",
    "read_dicom_seg",
    "segment_codes",
    "series_grid",
    "write_dicom_seg",
    "write_dicom_series",
]

_SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}  # CT / MR Image Storage
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # the same flip both ways


# -- series check -------------------------------------------------------------------------------------
def _read_headers(folder: str) -> list:
    """pydicom datasets (no pixel data) of the DICOM files directly in ``folder``, with their paths.

    Hidden files, non-DICOM files and DICOMDIR indexes are ignored, as ITK's GDCM series reader does."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
            continue
        if getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None) == _MEDIA_DIRECTORY:
            continue
        ds.filename = path
        out.append(ds)
    return out


def _floats(ds, keyword: str, n: int, folder: str) -> np.ndarray:
    value = getattr(ds, keyword, None)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,):
        raise DataError(
            f"DICOM series folder '{folder}': file '{os.path.basename(ds.filename)}' has no valid "
            f"{keyword} ({value!r}); expected {n} numbers."
        )
    return arr


def check_dicom_series(folder: str | os.PathLike, rtol: float = 0.01, atol_mm: float = 0.01) -> list:
    """Check that ``folder`` holds one complete, consistent single-frame DICOM series; return its datasets.

    Checks: at least one DICOM file; one Series Instance UID (a second series in the folder is an error,
    not a silent choice); every slice single-frame with the same Image Orientation (Patient), Pixel
    Spacing, Rows and Columns; slice positions along the slice normal distinct and evenly spaced (a gap
    larger than ``rtol`` of the series' spacing is a missing slice) and in line (the in-plane offset of
    every slice the same).

    Args:
        folder: the series folder.
        rtol: relative tolerance on the spacing between neighbouring slices.
        atol_mm: absolute tolerance (mm) on positions and in-plane offsets.

    Returns:
        The datasets (headers only, ``ds.filename`` set), sorted by position along the slice normal.

    Raises:
        DataError: one line naming the folder and what is wrong.
    """
    folder = os.fspath(folder)
    where = f"DICOM series folder '{folder}'"
    if not os.path.isdir(folder):
        raise DataError(f"{where} does not exist or is not a folder.")
    datasets = _read_headers(folder)
    if not datasets:
        raise DataError(f"{where} holds no DICOM files.")
    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for ds in datasets})
    if len(series) > 1:
        raise DataError(
            f"{where} mixes {len(series)} series (Series Instance UIDs {', '.join(series[:3])}"
            f"{' ...' if len(series) > 3 else ''}); expected one series per folder."
        )
    first = datasets[0]
    for ds in datasets:
        name = os.path.basename(ds.filename)
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise DataError(f"{where}: file '{name}' is multi-frame; expected one slice per file.")
        for keyword in ("Rows", "Columns"):
            if getattr(ds, keyword, None) != getattr(first, keyword, None):
                raise DataError(
                    f"{where} has inconsistent slices: '{name}' has {keyword} "
                    f"{getattr(ds, keyword, None)}, '{os.path.basename(first.filename)}' "
                    f"{getattr(first, keyword, None)}."
                )
    iop0 = _floats(first, "ImageOrientationPatient", 6, folder)
    ps0 = _floats(first, "PixelSpacing", 2, folder)
    for ds in datasets[1:]:
        for keyword, ref, n, tol in (("ImageOrientationPatient", iop0, 6, 1e-4), ("PixelSpacing", ps0, 2, 1e-4)):
            value = _floats(ds, keyword, n, folder)
            if not np.allclose(value, ref, atol=tol, rtol=1e-4):
                raise DataError(
                    f"{where} has inconsistent slices: '{os.path.basename(ds.filename)}' has {keyword} "
                    f"{value.round(5).tolist()}, '{os.path.basename(first.filename)}' "
                    f"{ref.round(5).tolist()}."
                )
    normal = np.cross(iop0[:3], iop0[3:])
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3, folder) for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    datasets = [datasets[i] for i in order]
    along, positions = along[order], positions[order]
    inplane = positions - along[:, None] * normal[None]
    off = np.abs(inplane - inplane[0]).max(axis=1)
    if off.max() > atol_mm + rtol * float(ps0.min()):
        i = int(off.argmax())
        raise DataError(
            f"{where} has inconsistent slices: '{os.path.basename(datasets[i].filename)}' is shifted "
            f"in-plane by {off[i]:.3g} mm from the others (slices not stacked along the normal)."
        )
    if len(datasets) > 1:
        gaps = np.diff(along)
        if gaps.min() <= atol_mm:
            i = int(gaps.argmin())
            raise DataError(
                f"{where} has two slices at the same position {along[i]:.4g} mm "
                f"('{os.path.basename(datasets[i].filename)}', "
                f"'{os.path.basename(datasets[i + 1].filename)}'); "
                "expected one slice per position."
            )
        step = float(np.median(gaps))
        bad = np.abs(gaps - step) > atol_mm + rtol * step
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            missing = round(float(gaps[i] / step)) - 1
            what = f"about {missing} missing slice{'s' if missing != 1 else ''}" if missing >= 1 else "uneven spacing"
            raise DataError(
                f"{where} has a gap of {gaps[i]:.4g} mm between slice positions {along[i]:.4g} and "
                f"{along[i + 1]:.4g} where the series spacing is {step:.4g} mm ({what}); "
                "expected a complete series."
            )
    return datasets


_NOT_A_SERIES = (
    "output_dicom_seg needs a DICOM series folder as input; image '{}' is not one "
    "(set output_dicom_seg to false for NIfTI inputs)."
)


class CheckDicomSeriesd(MapTransform):
    """Run :func:`check_dicom_series` on every key whose value names a folder (put it before ``LoadImaged``);
    file names and in-memory images pass unchanged, unless ``require_series`` (the bundles pass their
    ``output_dicom_seg`` switch: a DICOM SEG can only reference a DICOM series), which rejects them.

    Args:
        keys: image keys of the datalist entry.
        require_series: raise :class:`~shared_nets.data.DataError` naming the image when it is not a folder.
        rtol: relative tolerance on the slice spacing.
        atol_mm: absolute tolerance (mm) on positions.
        allow_missing_keys: as in ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        require_series: bool = False,
        rtol: float = 0.01,
        atol_mm: float = 0.01,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.require_series = bool(require_series)
        self.rtol, self.atol_mm = float(rtol), float(atol_mm)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (str, os.PathLike)) and os.path.isdir(value):
                check_dicom_series(value, rtol=self.rtol, atol_mm=self.atol_mm)
            elif self.require_series:
                name = os.fspath(value) if isinstance(value, (str, os.PathLike)) else source_name(value)
                raise DataError(_NOT_A_SERIES.format(name))
        return d


# -- series writer ------------------------------------------------------------------------------------
def _stored_values(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored integer array, RescaleSlope, RescaleIntercept): int16 when the values are integers that fit,
    else uint16 with a slope/intercept that spans the value range."""
    vol = np.asarray(volume, dtype=np.float64)
    lo, hi = float(vol.min()), float(vol.max())
    integral = bool(np.all(vol == np.round(vol)))
    if integral and lo >= -32768 and hi <= 32767:
        return vol.astype(np.int16), 1.0, 0.0
    slope = 1.0 if integral and hi - lo <= 65535 else max((hi - lo) / 65535.0, np.finfo(np.float32).tiny)
    stored = np.clip(np.round((vol - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, float(slope), lo


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike,
    modality: str = "CT",
    patient_id: str = "ANON",
    patient_name: str = "Anonymous^",
    study_uid: str | None = None,
    series_description: str = "converted from NIfTI",
    series_number: int = 1,
) -> list[str]:
    """Write a 3D volume as a DICOM series, one file per slice, into a new folder ``out_dir``.

    Voxel ``(i, j, k)`` is column ``i``, row ``j`` of slice ``k``: Image Orientation (Patient) holds the
    directions of the first two axes, Image Position (Patient) the centre of each slice's first voxel,
    Pixel Spacing / Slice Thickness / Spacing Between Slices the axes' lengths; values are stored as
    16-bit integers with Rescale Slope/Intercept (type ``HU`` for CT). All slices share one Study,
    Series and Frame of Reference UID. The series is written to a temporary folder beside ``out_dir``
    and renamed, so an interrupted run leaves no partial series.

    Args:
        volume: ``(X, Y, Z)`` intensities (a trailing singleton axis is dropped).
        affine: 4x4 voxel-to-world matrix in RAS (NIfTI/MONAI convention); the third axis must be
            perpendicular to the first two (no shear).
        out_dir: the series folder to create (must not exist or be empty).
        modality: ``CT`` or ``MR`` (sets the SOP class).
        patient_id / patient_name / study_uid / series_description / series_number: identifiers
            (a new Study Instance UID when ``study_uid`` is None).

    Returns:
        The written file paths, in slice order.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if modality not in _SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASSES)}, got {modality!r}.")
    vol = np.asarray(volume)
    while vol.ndim > 3 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3 or min(vol.shape) == 0:
        raise ValueError(f"volume must be 3D and not empty, got shape {np.shape(volume)}.")
    aff = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    axes = aff[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length axis: {np.asarray(affine).tolist()}.")
    row_dir, col_dir, slice_dir = (axes / spacing).T
    normal = np.cross(row_dir, col_dir)
    if abs(row_dir @ col_dir) > 1e-4 or abs(abs(slice_dir @ normal) - 1) > 1e-4:
        raise ValueError(
            "affine is sheared (the slice axis is not perpendicular to the in-plane axes); "
            "a DICOM series cannot hold it: resample the volume first."
        )
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(
            f"output folder '{out_dir}' already exists and is not empty; a series folder must hold one series only."
        )
    stored, slope, intercept = _stored_values(vol)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.")
    paths = []
    try:
        for k in range(vol.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = _SOP_CLASSES[modality]
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
            ds.Modality = modality
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", ""
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
            ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = int(series_number), k + 1, 1
            ds.SeriesDescription = series_description
            ds.Manufacturer = "sam-adapter-bundles"
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.PositionReferenceIndicator = ""
            position = aff @ np.array([0.0, 0.0, k, 1.0])
            ds.ImagePositionPatient = [_ds(v) for v in position[:3]]
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
            ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # (between rows, between columns)
            ds.SliceThickness = ds.SpacingBetweenSlices = _ds(spacing[2])
            ds.SliceLocation = _ds(position[:3] @ normal)
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[0])
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
            ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
            if modality == "CT":
                ds.RescaleType = "HU"
                ds.KVP = ""
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = j, columns = i
            path = os.path.join(tmp, f"slice_{k:04d}.dcm")
            ds.save_as(path, enforce_file_format=True)
            paths.append(os.path.join(out_dir, os.path.basename(path)))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


def nifti_to_dicom(
    nifti: str | os.PathLike,
    out_dir: str | os.PathLike,
    modality: str = "CT",
    orientation: str | None = "LPS",
    **kwargs: Any,
) -> list[str]:
    """Write a NIfTI volume as a DICOM series folder (see :func:`write_dicom_series`).

    Args:
        nifti: the ``.nii``/``.nii.gz`` file.
        out_dir: the series folder to create.
        modality: ``CT`` or ``MR``.
        orientation: reorient the voxel axes first (``LPS``: columns towards the patient's left, rows
            towards posterior, slices ascending towards superior, the usual axial DICOM layout); None keeps
            the stored axes.
        kwargs: identifiers passed to :func:`write_dicom_series`.

    Returns:
        The written file paths.
    """
    import nibabel as nib

    path = os.fspath(nifti)
    if not os.path.isfile(path):
        raise DataError(f"NIfTI file '{path}' does not exist.")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types on corrupt files
        raise DataError(f"'{path}' is not a readable NIfTI file ({type(e).__name__}: {e}).") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"'{path}' has shape {data.shape}; expected a 3D volume.")
    if orientation:
        orn = nib.orientations
        transform = orn.ornt_transform(orn.io_orientation(affine), orn.axcodes2ornt(tuple(orientation)))
        affine = affine @ orn.inv_ornt_aff(transform, data.shape)
        data = orn.apply_orientation(data, transform)
    return write_dicom_series(data, affine, out_dir, modality=modality, **kwargs)


# -- DICOM SEG ----------------------------------------------------------------------------------------
# Coded anatomy for the bundles' class names. Codes are SNOMED CT concepts from DICOM PS3.16 CID 7150
# "Segmentation Property Categories" and CID 7151 "Segmentation Property Types", read from pydicom's copy
# of those tables (``pydicom.sr.codedict.codes.SCT``); laterality is a Segmented Property Type Modifier
# from CID 244 "Laterality". "portal vein and splenic vein" has no single concept: it is coded as the
# concept that covers both, Vein. A name not listed is coded Anatomical Structure / Tissue, its label kept.
_SEGMENT_TYPES: dict[str, tuple[str, str, str | None]] = {
    # name: (category keyword, type keyword, laterality keyword or None)
    "spleen": ("AnatomicalStructure", "Spleen", None),
    "right kidney": ("AnatomicalStructure", "Kidney", "Right"),
    "left kidney": ("AnatomicalStructure", "Kidney", "Left"),
    "kidney": ("AnatomicalStructure", "Kidney", None),
    "gallbladder": ("AnatomicalStructure", "Gallbladder", None),
    "esophagus": ("AnatomicalStructure", "Esophagus", None),
    "liver": ("AnatomicalStructure", "Liver", None),
    "stomach": ("AnatomicalStructure", "Stomach", None),
    "aorta": ("AnatomicalStructure", "Aorta", None),
    "inferior vena cava": ("AnatomicalStructure", "InferiorVenaCava", None),
    "portal vein and splenic vein": ("AnatomicalStructure", "Vein", None),
    "portal vein": ("AnatomicalStructure", "PortalVein", None),
    "splenic vein": ("AnatomicalStructure", "SplenicVein", None),
    "pancreas": ("AnatomicalStructure", "Pancreas", None),
    "right adrenal gland": ("AnatomicalStructure", "AdrenalGland", "Right"),
    "left adrenal gland": ("AnatomicalStructure", "AdrenalGland", "Left"),
    "adrenal gland": ("AnatomicalStructure", "AdrenalGland", None),
    "tumour": ("MorphologicallyAbnormalStructure", "Neoplasm", None),
    "tumor": ("MorphologicallyAbnormalStructure", "Neoplasm", None),
    "lesion": ("MorphologicallyAbnormalStructure", "Lesion", None),
}


def segment_codes(name: str) -> tuple[Any, Any, Any | None]:
    """``(category, type, laterality modifier or None)`` pydicom ``Code`` objects for a class name (see
    ``_SEGMENT_TYPES``; case and spacing are ignored; an unknown name gets Anatomical Structure / Tissue)."""
    from pydicom.sr.codedict import codes

    key = " ".join(str(name).lower().replace("_", " ").split())
    category, kind, side = _SEGMENT_TYPES.get(key, ("AnatomicalStructure", "Tissue", None))
    return getattr(codes.SCT, category), getattr(codes.SCT, kind), getattr(codes.SCT, side) if side else None


def _frames(label: np.ndarray, affine: np.ndarray, datasets: Sequence, where: str) -> np.ndarray:
    """The ``(frames, rows, columns)`` label of each source slice, gathered from a ``(X, Y, Z)`` label map with
    RAS ``affine`` that lies on the series' voxel grid (any axis order or flip); raises when it does not."""
    inv = np.linalg.inv(_RAS_TO_LPS @ np.asarray(affine, dtype=np.float64))
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    out = np.zeros((len(datasets), rows, cols), dtype=label.dtype)
    m, n = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    for f, ds in enumerate(datasets):
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        origin = inv @ np.r_[[float(v) for v in ds.ImagePositionPatient], 1.0]
        step_col = inv[:3, :3] @ (iop[:3] * dc)  # one column to the right
        step_row = inv[:3, :3] @ (iop[3:] * dr)  # one row down
        idx = origin[:3, None, None] + step_col[:, None, None] * n + step_row[:, None, None] * m
        rounded = np.round(idx)
        if np.abs(idx - rounded).max() > 1e-2 or any(
            rounded[a].min() < 0 or rounded[a].max() > label.shape[a] - 1 for a in range(3)
        ):
            raise DataError(
                f"{where}: the label map (shape {tuple(label.shape)}) does not lie on the grid of the "
                f"source series; expected a prediction in the input's voxel space."
            )
        r = rounded.astype(np.int64)
        out[f] = label[r[0], r[1], r[2]]
    return out


def write_dicom_seg(
    label: np.ndarray,
    affine: np.ndarray,
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    channel_def: Mapping[str | int, str],
    algorithm_name: str = "sam-adapter-bundles",
    algorithm_version: str = "0.1.0",
    series_description: str = "Segmentation",
    series_number: int = 300,
) -> str:
    """Write a label map as a DICOM Segmentation (binary, one segment per foreground class) that references
    the DICOM series it was predicted from.

    Args:
        label: ``(X, Y, Z)`` integer label map (a leading channel of 1 is dropped) on the source series'
            grid, as the bundles' post-processing gives it back (after ``Invertd``).
        affine: its 4x4 RAS voxel-to-world matrix.
        source: the source series folder (checked with :func:`check_dicom_series`).
        out_path: the ``.dcm`` file to write (atomically).
        channel_def: ``{label value: class name}``; ``0`` (background) gets no segment; every other entry is
            one segment (numbered in label-value order) labelled with its name and coded
            (:func:`segment_codes`).
        algorithm_name / algorithm_version: the Segment Algorithm Identification.
        series_description / series_number: of the new SEG series (same study as the source).

    Returns:
        ``out_path``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    src = os.fspath(source)
    where = f"DICOM SEG for '{src}'"
    datasets = check_dicom_series(src)
    arr = np.asarray(label)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise DataError(f"{where}: label map has shape {np.shape(label)}; expected (X, Y, Z).")
    classes = sorted((int(k), str(v)) for k, v in channel_def.items() if int(k) != 0)
    if not classes:
        raise ValueError(f"channel_def must name at least one class besides background, got {dict(channel_def)}.")
    values = np.unique(arr)
    unknown = sorted(set(values.tolist()) - {0} - {k for k, _ in classes})
    if unknown:
        raise DataError(f"{where}: label values {unknown[:10]} are not in channel_def {dict(channel_def)}.")
    segment_of = np.zeros(int(max(values.max(), classes[-1][0])) + 1, dtype=np.uint16)
    for number, (value, _) in enumerate(classes, start=1):
        segment_of[value] = number
    frames = segment_of[_frames(arr.astype(np.int64), affine, datasets, where)]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=str(algorithm_version), family=codes.DCM.ArtificialIntelligence
    )
    descriptions = []
    for number, (_, name) in enumerate(classes, start=1):
        category, kind, side = segment_codes(name)
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm,
        )
        if side is not None:  # Segmented Property Type Modifier Code Sequence (0062,0011), CID 244
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(side)
            ]
        descriptions.append(desc)
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="sam-adapter-bundles",
        manufacturer_model_name=algorithm_name[:64],
        software_versions=str(algorithm_version),
        device_serial_number="0",
        series_description=series_description,
        omit_empty_frames=True,
    )
    out_path = os.fspath(out_path)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp)
    return out_path


def series_grid(datasets: Sequence) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, RAS affine)`` of the volume ITK reads from a checked series (:func:`check_dicom_series` order):
    axis 0 along a row (columns), axis 1 down the columns (rows), axis 2 the slices by position."""
    first = datasets[0]
    iop = np.asarray([float(v) for v in first.ImageOrientationPatient])
    dr, dc = (float(v) for v in first.PixelSpacing)
    normal = np.cross(iop[:3], iop[3:])
    along = [float(np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal) for ds in datasets]
    step = float(np.median(np.diff(along))) if len(datasets) > 1 else float(getattr(first, "SliceThickness", 1) or 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = iop[:3] * dc, iop[3:] * dr, normal * step
    lps[:3, 3] = [float(v) for v in first.ImagePositionPatient]
    return (int(first.Columns), int(first.Rows), len(datasets)), _RAS_TO_LPS @ lps


def read_dicom_seg(
    seg_path: str | os.PathLike,
    source: str | os.PathLike,
    channel_def: Mapping[str | int, str] | None = None,
    ignore_spatial_locations: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM SEG as a label map on the grid of its source series as the bundles load it (:func:`series_grid`).

    Args:
        seg_path: the SEG file.
        source: the series folder it references.
        channel_def: ``{label value: class name}``: each segment gets the value whose name is its Segment
            Label; None: the segment numbers.
        ignore_spatial_locations: accept frames that do not state Spatial Locations Preserved (pydicom-seg,
            which MONAI Label's DICOMweb datastore uses, omits it; highdicom refuses such frames otherwise).

    Returns:
        ``(label (X, Y, Z) uint16, RAS affine)``.
    """
    import highdicom as hd

    where = f"DICOM SEG '{os.fspath(seg_path)}'"
    datasets = check_dicom_series(source)
    seg = hd.seg.segread(os.fspath(seg_path))
    series = {str(r.SeriesInstanceUID) for r in getattr(seg, "ReferencedSeriesSequence", [])}
    if str(datasets[0].SeriesInstanceUID) not in series:
        raise DataError(
            f"{where} does not reference the series in '{os.fspath(source)}' (references {sorted(series)})."
        )
    # segment numbers need not be 1..N (pydicom-seg numbers a segment by its label value)
    lut = np.arange(max([int(item.SegmentNumber) for item in seg.SegmentSequence], default=0) + 1, dtype=np.uint16)
    if channel_def is not None:
        value_of = {str(v): int(k) for k, v in channel_def.items()}
        for item in seg.SegmentSequence:
            if str(item.SegmentLabel) not in value_of:
                raise DataError(
                    f"{where}: segment label '{item.SegmentLabel}' is not in channel_def {dict(channel_def)}."
                )
            lut[int(item.SegmentNumber)] = value_of[str(item.SegmentLabel)]
    frames = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in datasets],
        combine_segments=True,
        relabel=False,
        ignore_spatial_locations=ignore_spatial_locations,
    )
    shape, affine = series_grid(datasets)
    return lut[np.asarray(frames, dtype=np.int64)].transpose(2, 1, 0).reshape(shape), affine


def _stem(source: str) -> str:
    name = os.path.basename(os.path.normpath(source))
    for ext in (".nii.gz", ".nii", ".dcm"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


class SaveDicomSegd(MapTransform):
    """Post-processing: write each prediction as ``<output_dir>/<series folder name>_<postfix>.dcm``, a DICOM
    SEG referencing the series it was predicted from (:func:`write_dicom_seg`). Put it after ``Invertd``
    (the label map must be back on the input's grid). The input must be a DICOM series folder: a NIfTI
    input raises one :class:`~shared_nets.data.DataError` line naming the image.

    Args:
        keys: the prediction key(s) (integer label maps with MONAI metadata).
        output_dir: folder of the SEG files.
        channel_def: ``{label value: class name}`` (the bundle's ``metadata.json`` output ``channel_def``).
        output_postfix: file name postfix.
        algorithm_name / algorithm_version: the SEG's algorithm identification.
        allow_missing_keys: as in ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        channel_def: Mapping[str | int, str],
        output_postfix: str = "seg",
        algorithm_name: str = "sam-adapter-bundles",
        algorithm_version: str = "0.1.0",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = os.fspath(output_dir)
        self.channel_def = {str(k): str(v) for k, v in dict(channel_def).items()}
        self.output_postfix = output_postfix
        self.algorithm_name, self.algorithm_version = algorithm_name, algorithm_version

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            source = source_name(pred)
            if not os.path.isdir(source):
                raise DataError(_NOT_A_SERIES.format(source))
            arr = pred.detach().cpu().numpy() if hasattr(pred, "detach") else np.asarray(pred)
            affine = pred.meta.get("affine") if hasattr(pred, "meta") else None
            if affine is None:
                raise DataError(f"prediction for '{source}' ({key}) has no affine; expected MONAI metadata.")
            affine = affine.cpu().numpy() if hasattr(affine, "cpu") else np.asarray(affine)
            out = os.path.join(self.output_dir, f"{_stem(source)}_{self.output_postfix}.dcm")
            write_dicom_seg(
                np.rint(arr).astype(np.int64),
                affine,
                source,
                out,
                self.channel_def,
                algorithm_name=self.algorithm_name,
                algorithm_version=self.algorithm_version,
            )
        return d
