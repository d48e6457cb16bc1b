"""Pieces every dataset recipe shares: layout errors, volume I/O, label look-up tables, splits, datalists.

A recipe finds the cases of a dataset in its published layout (``{"case", "image", "label"}``
with absolute source paths), splits them, and calls :func:`materialise`, which converts volumes
to NIfTI only where the source is not NIfTI, writes re-mapped labels only where a look-up table
is given, and returns datalist entries with paths relative to ``--out``. Nothing is ever
written under ``--src``; every file is written to a temporary name first and renamed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared_nets.data import DataError
from shared_nets.io import atomic_path, atomic_write_json

__all__ = [
    "DatasetLayoutError",
    "NIFTI_SUFFIXES",
    "is_nifti",
    "strip_suffix",
    "case_number",
    "check_folders",
    "find_folder",
    "read_volume",
    "save_nifti",
    "apply_lut",
    "lut_from_mapping",
    "materialise",
    "relative_to",
    "hold_out",
    "seeded_pick",
    "validation_split",
    "write_json_atomic",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class DatasetLayoutError(DataError):
    """``--src`` does not look like the dataset: the message names the folder/file and the expected layout."""


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``; hidden files such as ``._x.nii.gz`` are not)."""
    name = Path(path).name
    return name.endswith(NIFTI_SUFFIXES) and not name.startswith(".")


def strip_suffix(name: str, suffixes: Sequence[str] = (*NIFTI_SUFFIXES, ".mhd", ".nrrd", ".h5")) -> str:
    """``name`` without the first matching suffix (``img0001.nii.gz`` -> ``img0001``)."""
    for s in suffixes:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def case_number(name: str) -> int | None:
    """The integer formed by the digits of a file or folder name (``label0035.nii.gz`` -> 35), or None."""
    digits = "".join(ch for ch in strip_suffix(Path(name).name) if ch.isdigit())
    return int(digits) if digits else None


def check_folders(src: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Path]:
    """Resolve ``--src`` / ``--out`` and refuse an output folder inside the source dataset.

    Args:
        src: the dataset as downloaded (must exist).
        out: where the datalist and any converted or re-mapped volumes go (created).

    Returns:
        ``(src, out)`` as absolute paths.

    Raises:
        ValueError: ``src`` missing or not a folder, or ``out`` equal to / inside ``src``.
    """
    if src is None or str(src) == "":
        raise ValueError("src must be given: the folder holding the dataset as downloaded (--src DIR).")
    if out is None or str(out) == "":
        raise ValueError("out must be given: the folder for datalist.json and converted files (--out DIR).")
    s, o = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if not s.is_dir():
        raise ValueError(f"src '{src}' is not an existing folder; expected the dataset folder as downloaded.")
    if o == s or s in o.parents:
        raise ValueError(
            f"out '{out}' is inside src '{src}'; prepare never writes into the source dataset, "
            "choose a folder outside it."
        )
    o.mkdir(parents=True, exist_ok=True)
    return s, o


def find_folder(src: Path, candidates: Iterable[str], accept: Callable[[Path], bool]) -> Path | None:
    """The first ``src / candidate`` folder that ``accept`` likes (``""`` means ``src`` itself)."""
    for c in candidates:
        p = src / c if c else src
        if p.is_dir() and accept(p):
            return p
    return None


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, Any]:
    """Read a volume as stored: NIfTI through nibabel (header kept), anything else through ITK via MONAI.

    Args:
        path: ``.nii``/``.nii.gz``, or an ITK format (``.mhd``, ``.nrrd``, ...).

    Returns:
        ``(array [H, W, D] in the file's dtype, 4x4 RAS affine, nibabel header or None)``.

    Raises:
        DataError: the file cannot be read.
    """
    path = os.fspath(path)
    try:
        if is_nifti(path):
            import nibabel as nib

            img = nib.load(path)
            return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64), img.header
        from monai.transforms import LoadImage

        # ITKReader turns ITK's LPS geometry into a RAS affine, as NIfTI expects
        data = LoadImage(reader="ITKReader", image_only=True, dtype=None)(path)
        return np.asarray(data.numpy()), np.asarray(data.affine, dtype=np.float64), None
    except DataError:
        raise
    except Exception as e:  # readers raise many types on corrupt or missing files
        raise DataError(f"cannot read volume '{path}' ({type(e).__name__}: {e}).") from None


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    header: Any = None,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write ``array`` as NIfTI at ``path`` through a temporary name in the same folder, then rename.

    Args:
        array: voxel data ``[H, W, D]``.
        affine: 4x4 RAS affine.
        path: destination (``.nii.gz``); parent folders are created.
        header: a nibabel header to copy (e.g. the source's), or None.
        dtype: on-disk dtype; default ``array.dtype``.

    Returns:
        ``path``.
    """
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
    img = nib.Nifti1Image(arr, affine, header=header.copy() if header is not None else None)
    img.set_data_dtype(arr.dtype)
    if arr.dtype.kind in "iub":
        img.header.set_slope_inter(1.0, 0.0)  # integer labels/images: store the values themselves
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


def lut_from_mapping(mapping: Mapping[int, int], num_source: int) -> np.ndarray:
    """A look-up table ``new = lut[old]`` over source ids ``0..num_source-1``; ids not in ``mapping`` -> 0."""
    lut = np.zeros(num_source, dtype=np.uint8)
    for old, new in mapping.items():
        lut[int(old)] = int(new)
    return lut


def apply_lut(array: np.ndarray, lut: np.ndarray, path: str | os.PathLike = "label") -> np.ndarray:
    """Map label ids through ``lut`` (``new = lut[old]``); every value must be an id the table knows.

    Args:
        array: label voxels (integer-valued, any dtype).
        lut: ``[num_source]`` uint8 table.
        path: the file the labels came from (named in errors).

    Returns:
        uint8 array of the same shape.

    Raises:
        DataError: non-integer values, or values outside ``0..len(lut)-1``.
    """
    arr = np.asarray(array)
    if arr.dtype.kind == "f":
        rounded = np.rint(arr)
        if not np.allclose(rounded, arr):
            raise DataError(f"label file '{path}' holds non-integer values; expected integer label ids.")
        arr = rounded
    values = np.unique(arr).astype(np.int64)
    bad = values[(values < 0) | (values >= len(lut))]
    if bad.size:
        raise DataError(
            f"label file '{path}' holds ids {bad.tolist()[:8]} outside the dataset's label ids 0..{len(lut) - 1}; "
            "is this the right dataset?"
        )
    return np.asarray(lut, dtype=np.uint8)[arr.astype(np.int64)]


def relative_to(path: str | os.PathLike, out: Path) -> str:
    """``path`` relative to ``out`` (POSIX separators), or absolute where no relative path exists (other drive)."""
    try:
        return Path(os.path.relpath(os.fspath(path), os.fspath(out))).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()


def materialise(
    items: Sequence[Mapping[str, Any]],
    out: Path,
    *,
    label_lut: np.ndarray | None = None,
    image_dir: str = "imagesTr",
    label_dir: str = "labelsTr",
    progress: bool = True,
    desc: str = "prepare",
) -> list[dict[str, Any]]:
    """Turn found cases into datalist entries, converting or re-mapping files into ``out`` only where needed.

    Images that are NIfTI are referenced where they are; other formats (``.mhd``, ``.nrrd``) are
    read with ITK and written as ``out/<image_dir>/<name>.nii.gz``. Labels are written as uint8
    ``out/<label_dir>/<name>.nii.gz`` when ``label_lut`` is given (the recipe's id mapping) or the
    source is not NIfTI; otherwise referenced where they are. ``<name>`` is the item's
    ``"out_name"`` (default its ``"case"``).

    Args:
        items: ``{"case", "image", "label", ...}`` with absolute source paths; other keys are kept.
        out: the output folder.
        label_lut: ``new = lut[old]`` applied to every label, or None.
        image_dir: sub-folder of ``out`` for converted images.
        label_dir: sub-folder of ``out`` for written labels.
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        Entries ``{"image": rel, "label": rel, "case": ..., ...}`` (paths relative to ``out``).
    """
    entries = []
    for item in tqdm(list(items), desc=desc, disable=not progress, unit="case"):
        name = item.get("out_name", item["case"])
        entry = {k: v for k, v in item.items() if k not in ("out_name",)}
        image = Path(item["image"])
        if not is_nifti(image):
            arr, affine, _ = read_volume(image)
            image = save_nifti(arr, affine, out / image_dir / f"{name}.nii.gz")
        entry["image"] = relative_to(image, out)
        if item.get("label") is not None:
            label = Path(item["label"])
            if label_lut is not None or not is_nifti(label):
                arr, affine, header = read_volume(label)
                lut = label_lut if label_lut is not None else np.arange(256, dtype=np.uint8)
                label = save_nifti(
                    apply_lut(arr, lut, label), affine, out / label_dir / f"{name}.nii.gz", header, np.uint8
                )
            entry["label"] = relative_to(label, out)
        entries.append(entry)
    return entries


def seeded_pick(ids: Sequence[str], k: int, seed: int) -> list[str]:
    """``k`` ids drawn without replacement by a seeded permutation of the sorted ids (order-independent input)."""
    ordered = sorted(ids)
    if not 0 <= k <= len(ordered):
        raise ValueError(f"cannot pick {k} of {len(ordered)} cases.")
    perm = np.random.default_rng(seed).permutation(len(ordered))
    return sorted(ordered[i] for i in perm[len(ordered) - k :])


def hold_out(
    items: Sequence[Mapping[str, Any]], num: int, seed: int, key: str = "case"
) -> tuple[list[dict], list[dict]]:
    """Split ``items`` into ``(kept, held)`` with ``num`` seeded picks held out (by ``item[key]``)."""
    picked = set(seeded_pick([str(i[key]) for i in items], num, seed))
    kept = [dict(i) for i in items if str(i[key]) not in picked]
    held = [dict(i) for i in items if str(i[key]) in picked]
    return kept, held


def validation_split(
    training: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]], num_val: int, seed: int
) -> tuple[list[dict], list[dict], str]:
    """Validation for papers that publish only training/test lists.

    Args:
        training: the paper's training cases.
        test: the paper's test cases.
        num_val: 0 = validate on the test cases, as the papers do (they report on the test set
            and keep no separate validation set; MA-SAM's code draws its validation cases from the
            test list); ``n > 0`` = hold ``n`` seeded training cases out instead.
        seed: hold-out seed.

    Returns:
        ``(training, validation, note)``, ``note`` saying which was done.
    """
    if isinstance(num_val, bool) or not isinstance(num_val, int) or not 0 <= num_val < len(training):
        raise ValueError(
            f"num_val must be an integer in [0, {len(training) - 1}] (training cases held out for validation), "
            f"got {num_val!r}."
        )
    if num_val == 0:
        note = "validation = the test cases (the paper keeps no separate validation set)"
        return [dict(i) for i in training], [dict(i) for i in test], note
    kept, held = hold_out(training, num_val, seed)
    return kept, held, f"validation = {num_val} training cases held out with seed {seed}"


def write_json_atomic(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON through a temporary file in the same folder, then rename."""
    atomic_write_json(obj, path)
    return path
