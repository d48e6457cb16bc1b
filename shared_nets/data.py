"""Datalist loading and input checks shared by all bundles: fail early, name the file and what was expected."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from multiprocessing.pool import ThreadPool
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset as _MonaiCacheDataset
from monai.data import load_decathlon_datalist
from monai.transforms import Flip, MapTransform, RandomizableTransform
from monai.transforms import Invertd as _MonaiInvertd
from monai.transforms import LoadImaged as _MonaiLoadImaged

__all__ = [
    "DataError",
    "load_datalist",
    "check_volumes",
    "CheckLabelRanged",
    "CheckFinited",
    "CheckChannelsd",
    "CheckVolumeSized",
    "volume_size",
    "DEFAULT_MAX_VOXELS",
    "DEFAULT_MAX_BYTES",
    "source_name",
    "SkippingDataset",
    "CaseSeededDataset",
    "case_seed",
    "SKIPPED_KEY",
    "root_cause",
    "LoadImaged",
    "CacheDataset",
    "build_dataset",
    "lateral_pairs",
    "RandLateralFlipd",
    "Invertd",
    "checked_datalist",
    "demo_data_dir",
]


class DataError(ValueError):
    """Input data that a bundle cannot use; the message names the file or key."""


def load_datalist(
    path: str | os.PathLike,
    key: str = "training",
    base_dir: str | os.PathLike | None = None,
    keys: Sequence[str] = ("image",),
    check_files: bool = True,
) -> list[dict]:
    """Read a MONAI decathlon-style datalist and check that the files it names exist.

    Args:
        path: the datalist JSON.
        key: the list to read (``training``, ``validation``, ``test``).
        base_dir: folder the relative paths are relative to (default: the datalist's folder).
        keys: entry keys that must name existing files.
        check_files: raise when a named file does not exist (batch inference passes False and lets
            :class:`SkippingDataset` report and skip the entry instead).

    Raises:
        DataError: missing/unreadable datalist, missing list, missing key in an entry, missing file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(
            f"datalist '{path}' does not exist; expected a decathlon-style JSON (see `python -m tools demo_data`)."
        )
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"datalist '{path}' is not readable JSON ({e}).") from None
    if not isinstance(content, Mapping) or not isinstance(content.get(key), list) or not content[key]:
        raise DataError(f"datalist '{path}' has no non-empty '{key}' list.")
    base = os.fspath(base_dir) if base_dir is not None else os.path.dirname(os.path.abspath(path))
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=base)
    for i, item in enumerate(items):
        for k in keys:
            if k not in item:
                raise DataError(f"datalist '{path}' '{key}' entry {i} has no '{k}' (keys: {sorted(item)}).")
            files = item[k] if isinstance(item[k], (list, tuple)) else [item[k]]
            for fn in files:
                if check_files and not os.path.exists(fn):
                    raise DataError(f"datalist '{path}' '{key}' entry {i}: {k} file '{fn}' does not exist.")
    return items


def _nifti_header(fn: str):
    """(shape, affine) of a NIfTI file from its header, or None for other formats."""
    if not fn.endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    try:
        img = nib.load(fn)
        return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises many types on corrupt headers
        raise DataError(f"'{fn}' is not a readable NIfTI file ({type(e).__name__}: {e}).") from None


def check_volumes(
    items: Sequence[Mapping[str, Any]],
    image_key: str = "image",
    label_key: str | None = "label",
    min_depth: int | None = None,
    spatial_dims: int = 3,
    num_classes: int | None = None,
    channels: int = 1,
    affine_atol: float = 1e-3,
) -> list[Mapping[str, Any]]:
    """Check the NIfTI files of a datalist before any training starts.

    Checks (headers only) that images are ``spatial_dims``-D with ``channels`` channels (a trailing
    channel axis is allowed), not empty, with at least ``min_depth`` slices along the last spatial axis,
    and that labels lie on the image grid (same shape and affine); with ``num_classes`` (incl.
    background) it also reads each label and checks its values. Returns ``items`` so configs can wrap a
    datalist in it.
    """
    for item in items:
        fn = item[image_key]
        header = _nifti_header(fn) if isinstance(fn, str) else None
        if header is None:
            continue
        shape, affine = header
        spatial, extra = shape[:spatial_dims], shape[spatial_dims:]
        if len(spatial) < spatial_dims:
            raise DataError(f"image '{fn}' has shape {shape}; expected a {spatial_dims}D volume.")
        if int(np.prod(extra, dtype=np.int64)) != channels:
            raise DataError(
                f"image '{fn}' has shape {shape} ({int(np.prod(extra))} channels); expected a {spatial_dims}D "
                f"volume with {channels} channel{'s' if channels > 1 else ''}."
            )
        if min(spatial) == 0:
            raise DataError(f"image '{fn}' is empty (shape {shape}).")
        if min_depth is not None and spatial[-1] < min_depth:
            raise DataError(
                f"image '{fn}' has {spatial[-1]} slices along the last axis; expected at least {min_depth}."
            )
        if label_key and isinstance(item.get(label_key), str):
            lheader = _nifti_header(item[label_key])
            if lheader is None:
                continue
            lshape, laffine = lheader
            if tuple(lshape[:spatial_dims]) != tuple(spatial):
                raise DataError(
                    f"label '{item[label_key]}' has shape {lshape}; expected the image's {tuple(spatial)} ('{fn}')."
                )
            if not np.allclose(laffine, affine, atol=affine_atol):
                raise DataError(
                    f"label '{item[label_key]}' has another affine than its image '{fn}' (max difference "
                    f"{np.abs(laffine - affine).max():.4g}); expected both on the same grid "
                    "(resample the label to the image)."
                )
            if num_classes is not None:
                import nibabel as nib

                values = np.unique(np.asarray(nib.load(item[label_key]).dataobj))
                if values.min() < 0 or values.max() > num_classes - 1 or not np.all(values == np.round(values)):
                    raise DataError(
                        f"label '{item[label_key]}' has values {values.tolist()[:10]}; expected integers in "
                        f"[0, {num_classes - 1}] for {num_classes} classes (map labels with MapLabelValued first)."
                    )
    return list(items)


class LoadImaged(_MonaiLoadImaged):
    """MONAI's ``LoadImaged`` whose errors name the file: a truncated or corrupt volume raises
    :class:`DataError` ``'<file>' could not be read: <reason>`` instead of a reader error without a name."""

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except DataError:
            raise
        except Exception as e:  # readers raise OSError, EOFError, zlib errors, ValueError...
            names = [str(data[k]) for k in self.key_iterator(dict(data))]
            raise DataError(
                f"{', '.join(repr(n) for n in names)} could not be read as an image ({root_cause(e)})."
            ) from None


def source_name(x: Any) -> str:
    """The file a MetaTensor was loaded from, for error messages."""
    meta = getattr(x, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<in-memory data>"))


class CheckLabelRanged(MapTransform):
    """Raise :class:`DataError` when a label holds values outside ``0 .. num_classes - 1``.

    Args:
        keys: label keys.
        num_classes: number of classes including background.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (incl. background), got {num_classes}.")
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            arr = lab.detach() if isinstance(lab, torch.Tensor) else torch.as_tensor(np.asarray(lab))
            lo, hi = float(arr.min()), float(arr.max())
            if lo < 0 or hi > self.num_classes - 1 or not torch.equal(arr, arr.round()):
                raise DataError(
                    f"label '{source_name(lab)}' ({key}) has values in [{lo:g}, {hi:g}]; expected integers in "
                    f"[0, {self.num_classes - 1}] for {self.num_classes} classes "
                    "(map labels with MapLabelValued first)."
                )
        return d


class CheckFinited(MapTransform):
    """Raise :class:`DataError` when an image holds NaN/Inf values or is empty."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
            if arr.numel() == 0:
                raise DataError(f"image '{source_name(img)}' ({key}) is empty (shape {tuple(arr.shape)}).")
            if not torch.isfinite(arr).all():
                raise DataError(f"image '{source_name(img)}' ({key}) contains NaN or Inf values.")
        return d


class CheckChannelsd(MapTransform):
    """Raise :class:`DataError` naming the file when a loaded, channel-first image does not have the
    channels and spatial dimensions the bundle's network takes (inference's counterpart of
    :func:`check_volumes`; put it right after ``EnsureChannelFirstd``). Without it a 2-channel volume
    reached the network and failed there, with the shape of a sliding window and no file name.

    Args:
        keys: image keys.
        channels: expected number of channels.
        spatial_dims: expected number of spatial dimensions.
    """

    def __init__(
        self, keys: KeysCollection, channels: int = 1, spatial_dims: int = 3, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}.")
        self.channels, self.spatial_dims = channels, spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            shape = tuple(int(s) for s in np.shape(img))
            n = self.channels
            want = f"a {self.spatial_dims}D volume with {n} channel{'s' if n > 1 else ''}"
            if len(shape) != self.spatial_dims + 1:
                raise DataError(
                    f"image '{source_name(img)}' ({key}) has shape {shape} after EnsureChannelFirstd; expected {want}."
                )
            if shape[0] != n:
                raise DataError(
                    f"image '{source_name(img)}' ({key}) has {shape[0]} channels (shape {shape}, "
                    f"channel first); expected {want}."
                )
        return d


# -- size limits before loading -----------------------------------------------------------------------
DEFAULT_MAX_VOXELS = 512 * 512 * 2048
"""Default voxel limit of :class:`CheckVolumeSized` (a whole-body CT at 512 x 512 in-plane has ~1000-2000 slices)."""
DEFAULT_MAX_BYTES = 4 * 1024**3
"""Default limit of :class:`CheckVolumeSized` on a volume's uncompressed size: 4 GiB (float32 at the voxel limit
is 2 GiB)."""
_GZIP_SLACK = 1 << 16  # bytes a gzip stream may hold beyond what the NIfTI header implies
_CHUNK = 1 << 20


def _gzip_length(fn: str, stop_after: int) -> int:
    """Decompressed length of the gzip file ``fn``, counted in bounded chunks (never more than ~1 MiB in
    memory, whatever the compression ratio) and given up once it passes ``stop_after`` (returns a value
    above it). Multi-member files are followed; a corrupt stream raises ``zlib.error`` / ``EOFError``."""
    import zlib

    total = 0
    with open(fn, "rb") as f:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while True:
            data = f.read(_CHUNK)
            if not data:
                return total
            while data:
                out = inflater.decompress(data, _CHUNK)
                total += len(out)
                if total > stop_after:
                    return total
                if inflater.unconsumed_tail:
                    data = inflater.unconsumed_tail
                elif inflater.eof and inflater.unused_data:  # the next gzip member
                    data = inflater.unused_data
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    data = b""


def volume_size(path: str | os.PathLike) -> tuple[tuple[int, ...], int, int] | None:
    """``(shape, voxels, bytes)`` a volume file or DICOM folder will take once loaded, from headers only.

    NIfTI (``.nii``, ``.nii.gz``): the header's shape and data type (bytes include the header, as the
    uncompressed file). A DICOM folder: Rows x Columns x frames of its first DICOM file times the number
    of files in the folder (an upper bound; the series check rejects slices of other sizes). None for
    other formats and for files whose header cannot be read (the loader then reports them).
    """
    fn = os.fspath(path)
    if os.path.isdir(fn):
        import pydicom

        files = sorted(n for n in os.listdir(fn) if not n.startswith(".") and os.path.isfile(os.path.join(fn, n)))
        for name in files:
            try:
                ds = pydicom.dcmread(os.path.join(fn, name), stop_before_pixels=True)
                rows, cols = int(ds.Rows), int(ds.Columns)
            except Exception:  # not a DICOM image file (DICOMDIR, notes...): try the next one
                continue
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1) * int(getattr(ds, "SamplesPerPixel", 1) or 1)
            shape = (cols, rows, frames * len(files))
            voxels = int(np.prod(shape, dtype=np.int64))
            return shape, voxels, voxels * max(int(getattr(ds, "BitsAllocated", 16) or 16) // 8, 1)
        return None
    if not fn.endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    try:
        img = nib.load(fn)  # reads the header only, also through gzip
        shape = tuple(int(s) for s in img.header.get_data_shape())
        itemsize = int(np.dtype(img.header.get_data_dtype()).itemsize)
        offset = int(getattr(img.dataobj, "offset", 0))  # the image's header copy has vox_offset reset to 0
    except Exception:  # an unreadable header is LoadImaged's to report
        return None
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    return shape, voxels, offset + voxels * itemsize


class CheckVolumeSized(MapTransform):
    """Refuse a volume that is too large to load, from its header, before ``LoadImaged`` allocates it.

    Put it right before ``LoadImaged``. For each key naming a file or DICOM folder (in-memory data and
    other formats pass), :func:`volume_size` gives the voxel count and uncompressed size from the
    headers; either above its limit raises :class:`DataError` naming the file, its shape and the limit. A
    ``.nii.gz`` is also streamed through the decompressor in bounded chunks, counting bytes without
    keeping them, and refused when it holds more than its header implies (a gzip bomb behind a small
    header). A truncated or corrupt file is left to ``LoadImaged``, which names it.

    Args:
        keys: image (and label) keys.
        max_voxels: largest voxel count accepted (all channels).
        max_bytes: largest uncompressed size accepted, header included.
        check_stream: count a ``.nii.gz`` file's decompressed bytes (costs one decompression pass).
        allow_missing_keys: as in ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        check_stream: bool = True,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        for name, value in (("max_voxels", max_voxels), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.max_voxels, self.max_bytes, self.check_stream = int(max_voxels), int(max_bytes), bool(check_stream)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if not isinstance(value, (str, os.PathLike)) or not os.path.exists(value):
                continue  # in-memory data; a missing file is LoadImaged's to report
            fn = os.fspath(value)
            size = volume_size(fn)
            if size is None:
                continue
            shape, voxels, nbytes = size
            where = f"image '{fn}' ({key})"
            if voxels > self.max_voxels:
                raise DataError(
                    f"{where} is too large: its header gives shape {shape}, {voxels:,} voxels; "
                    f"the limit is {self.max_voxels:,} (max_voxels)."
                )
            if nbytes > self.max_bytes:
                raise DataError(
                    f"{where} is too large: its header gives shape {shape}, {nbytes:,} bytes "
                    f"uncompressed; the limit is {self.max_bytes:,} (max_bytes)."
                )
            if self.check_stream and fn.endswith(".gz"):
                try:
                    length = _gzip_length(fn, stop_after=nbytes + _GZIP_SLACK)
                except Exception:  # corrupt or truncated: LoadImaged reports it with the file name
                    continue
                if length > nbytes + _GZIP_SLACK:
                    raise DataError(
                        f"{where} decompresses to more than its header's {nbytes:,} bytes (shape "
                        f"{shape}; stopped counting at {length:,}); refused as a malformed or "
                        "hostile file."
                    )
        return d


SKIPPED_KEY = "skipped_input"


def root_cause(e: BaseException) -> str:
    """One line for an exception raised inside a transform chain: MONAI wraps the real error in
    ``RuntimeError("applying transform ...")``; report the innermost one."""
    while e.__cause__ is not None:
        e = e.__cause__
    msg = " ".join(str(e).split())
    return msg if isinstance(e, DataError) else f"{type(e).__name__}: {msg}"


def case_seed(item: Mapping[str, Any], seed: int, image_key: str = "image") -> int:
    """A random seed for one datalist entry: ``seed`` combined with the CRC-32 of its image file name.

    Random preprocessing (simulated prompts) seeded with it draws the same for a case whatever its
    position in the datalist or the rank that runs it, so a sharded run equals a single-process one.
    """
    import zlib

    image = item.get(image_key, "") if isinstance(item, Mapping) else ""
    image = image[0] if isinstance(image, (list, tuple)) and image else image
    name = os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else str(image)
    return (int(seed) + zlib.crc32(name.encode("utf-8"))) % (2**31 - 1)


def _seeded(transform, item: Mapping[str, Any], seed: int | None, image_key: str):
    if seed is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=case_seed(item, seed, image_key))
    return transform


class CaseSeededDataset(torch.utils.data.Dataset):
    """Dataset whose random transforms are re-seeded per case (:func:`case_seed`) before each item, for
    evaluations with simulated prompts that must not depend on the order or the rank of the cases.

    Args:
        data: datalist entries.
        transform: preprocessing (a MONAI ``Compose``).
        seed: base seed.
        image_key: entry key of the image file (names the case).
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], transform, seed: int = 0, image_key: str = "image") -> None:
        self.data, self.transform, self.seed, self.image_key = list(data), transform, int(seed), image_key

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from monai.transforms import apply_transform

        item = self.data[index]
        return apply_transform(_seeded(self.transform, item, self.seed, self.image_key), dict(item))


class SkippingDataset(torch.utils.data.Dataset):
    """Batch-inference dataset: an item whose loading or preprocessing fails is reported (logged with the
    file and the reason) and handed on as a marker ``{SKIPPED_KEY: ..., "reason": ...}`` instead of
    stopping the whole job; :class:`shared_nets.engine.SkipBadInputs` drops the marker, so the other
    volumes are still written. Use with ``batch_size=1``.

    Args:
        data: datalist entries.
        transform: preprocessing.
        image_key: entry key that names the input file (for the report).
        seed: re-seed the random transforms per case (:func:`case_seed`), so simulated prompts do not
            depend on the case's position in the datalist or on the rank running it; None: one stream.
    """

    def __init__(
        self, data: Sequence[Mapping[str, Any]], transform=None, image_key: str = "image", seed: int | None = None
    ) -> None:
        self.data = list(data)
        self.transform = transform
        self.image_key = image_key
        self.seed = seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from monai.transforms import apply_transform

        item = self.data[index]
        try:
            if self.transform is None:
                return dict(item)
            return apply_transform(_seeded(self.transform, item, self.seed, self.image_key), dict(item))
        except Exception as e:  # any failure of one volume must not end the batch
            name = item.get(self.image_key, f"entry {index}") if isinstance(item, Mapping) else f"entry {index}"
            reason = root_cause(e)
            logging.getLogger(__name__).error("skipping '%s': %s", name, reason)
            return {SKIPPED_KEY: str(name), "reason": reason}


class CacheDataset(_MonaiCacheDataset):
    """MONAI's ``CacheDataset`` whose cache filling waits for its worker threads when an item fails.

    MONAI fills the cache in a ``multiprocessing.pool.ThreadPool`` inside ``with``; when one item raises
    (a :class:`DataError`), leaving the block calls ``terminate()``, which drops the queued items but does
    not wait for the threads, and these are daemon threads. The error then reaches the top level and the
    interpreter shuts down while a worker is still transforming the next item inside torch; when that
    worker takes the GIL back, Python ends the thread with ``pthread_exit``, whose unwinding through
    torch's ``noexcept`` GIL guard calls ``std::terminate``: "terminate called without an active
    exception", exit code 134 instead of 1, in some of the runs. Here the pool is terminated *and joined*
    before the error propagates, so no thread outlives it. Same arguments as ``monai.data.CacheDataset``.
    """

    def _fill_cache(self, indices=None) -> list:
        if self.cache_num <= 0:
            return []
        if indices is None:
            indices = list(range(self.cache_num))
        pool = ThreadPool(self.num_workers)
        try:
            results = pool.imap(self._load_cache_item, indices)
            if self.progress:
                from monai.utils import optional_import

                tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
                if has_tqdm:
                    results = tqdm(results, total=len(indices), desc="Loading dataset")
            return list(results)
        finally:
            pool.terminate()  # drops the items not started yet (a no-op once all are done) ...
            pool.join()  # ... and waits for the ones in progress


_DATASET_TYPES = ("Dataset", "CacheDataset", "PersistentDataset")


def build_dataset(
    dataset_type: str,
    data: Sequence[Mapping[str, Any]],
    transform,
    cache_rate: float = 1.0,
    num_workers: int | None = 0,
    cache_dir: str | os.PathLike | None = None,
):
    """The training dataset a bundle's ``dataset_type`` switch names (issue: data loading never the bottleneck).

    Kept as a component with a ``data`` argument (``train#dataset#data``) because MONAI Label's bundle
    trainer puts its datastore's list there.

    Args:
        dataset_type: ``Dataset`` (no cache), ``CacheDataset`` (deterministic transforms cached in memory,
            ``cache_rate`` of the items) or ``PersistentDataset`` (cached on disk under ``cache_dir``).
        data: datalist entries.
        transform: the preprocessing ``Compose``.
        cache_rate / num_workers: ``CacheDataset`` settings.
        cache_dir: ``PersistentDataset`` folder.
    """
    import monai.data

    if dataset_type not in _DATASET_TYPES:
        raise ValueError(f"dataset_type must be one of {list(_DATASET_TYPES)}, got {dataset_type!r}.")
    if dataset_type == "CacheDataset":
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers)
    if dataset_type == "PersistentDataset":
        if cache_dir is None:
            raise ValueError("dataset_type 'PersistentDataset' needs a cache_dir (config key 'persistent_cache_dir').")
        return monai.data.PersistentDataset(data, transform, cache_dir=os.fspath(cache_dir))
    return monai.data.Dataset(data, transform)


def lateral_pairs(names: Sequence[str], first_id: int = 1) -> list[tuple[int, int]]:
    """Label-id pairs of classes whose names differ only by "left" / "right" (e.g. the kidneys).

    Args:
        names: class names in label-id order (background excluded).
        first_id: label id of ``names[0]``.

    Returns:
        ``[(id of "left X", id of "right X"), ...]``, each pair once.
    """
    import re

    norm = [" ".join(str(n).lower().split()) for n in names]
    index = {n: i for i, n in enumerate(norm)}
    pairs = []
    for i, n in enumerate(norm):
        if re.search(r"\bleft\b", n):
            j = index.get(re.sub(r"\bleft\b", "right", n))
            if j is not None:
                pairs.append((i + first_id, j + first_id))
    return pairs


class RandLateralFlipd(RandomizableTransform, MapTransform):
    """Random flip along the left-right axis that also swaps the ids of lateral classes in the label.

    A plain left-right flip of a body image turns a left kidney into an organ on the right, still
    labelled "left kidney"; flipping with ``swap`` exchanges such ids so that labels stay anatomical.

    Args:
        keys: images and labels to flip together.
        label_key: the label among ``keys`` whose ids are swapped.
        swap: ``(id_a, id_b)`` pairs to exchange when flipping (see :func:`lateral_pairs`).
        spatial_axis: the left-right axis (0 after ``Orientationd(axcodes="RAS")``).
        prob: probability of flipping.
        allow_missing_keys: as in ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        swap: Sequence[Sequence[int]] = (),
        spatial_axis: int = 0,
        prob: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.label_key = label_key
        self.swap = [(int(a), int(b)) for a, b in swap]
        if any(a == b for a, b in self.swap):
            raise ValueError(f"RandLateralFlipd: swap pairs must join two different ids, got {self.swap}.")
        self.flipper = Flip(spatial_axis=spatial_axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.flipper(d[key])
        if self.swap and self.label_key in d:
            lab = d[self.label_key]
            out = lab.clone() if isinstance(lab, torch.Tensor) else np.array(lab, copy=True)
            for a, b in self.swap:
                out[lab == a] = b
                out[lab == b] = a
            d[self.label_key] = out
        return d


_INTERPOLATE_CLASSES = ("Resize", "Zoom", "RandZoom")  # inverted with torch.nn.functional.interpolate


def _nearest_modes(info):
    """An applied-operations stack with every interpolation mode set to a nearest-neighbour one.

    ``grid_sample`` based entries (``Spacing``, ``Affine``, ...) get ``"nearest"``, which samples the voxel
    whose centre is closest. ``torch.nn.functional.interpolate`` based entries (``Resize``, ``Zoom``) get
    ``"nearest-exact"``: interpolate's ``"nearest"`` is the legacy ``floor(i * in / out)`` lookup, shifted by up
    to half a source voxel towards lower indices (PyTorch ``interpolate`` docs), so a label map inverted with
    it lands off the original grid whenever the sizes are not integer multiples of each other.
    """
    from monai.transforms.utils import convert_applied_interp_mode
    from monai.utils import TraceKeys

    def exact(item):
        if isinstance(item, (list, tuple)):
            return [exact(x) for x in item]
        if not isinstance(item, Mapping):
            return item
        if item.get(TraceKeys.CLASS_NAME) in _INTERPOLATE_CLASSES:
            return convert_applied_interp_mode(item, mode="nearest-exact", align_corners=None)
        return {k: exact(v) for k, v in item.items()}

    return exact(convert_applied_interp_mode(info, mode="nearest", align_corners=None))


class Invertd(_MonaiInvertd):
    """MONAI's ``Invertd`` whose ``nearest_interp`` inverts ``Resize``/``Zoom`` with centre-aligned nearest.

    MONAI's ``nearest_interp=True`` sets every entry of the inverted stack to ``"nearest"``; for the
    interpolate-based ``Resize`` (the bundles' in-plane resize to ``img_size``) that is PyTorch's legacy
    nearest, which moves a label map by up to ~0.6 original voxels when the in-plane size is not a multiple
    of ``img_size``. Here those entries use ``"nearest-exact"`` (see :func:`_nearest_modes`); all other
    arguments and behaviour are those of ``monai.transforms.Invertd``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nearest_exact = self.nearest_interp
        self.nearest_interp = tuple(False for _ in self.nearest_exact)  # the stack is converted in __call__

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor
        from monai.transforms import InvertibleTransform

        d = dict(data)
        done = set()
        for key, orig_key, nearest in zip(self.keys, self.orig_keys, self.nearest_exact):
            if not nearest or key not in d or orig_key in done:
                continue
            done.add(orig_key)
            if isinstance(d.get(orig_key), MetaTensor):
                img = d[orig_key]  # a view with the converted stack: the caller's image keeps its own
                d[orig_key] = MetaTensor(
                    img.as_tensor(), meta=img.meta, applied_operations=_nearest_modes(img.applied_operations)
                )
            elif InvertibleTransform.trace_key(orig_key) in d:
                d[InvertibleTransform.trace_key(orig_key)] = _nearest_modes(d[InvertibleTransform.trace_key(orig_key)])
        out = super().__call__(d)
        for orig_key in done:  # hand back the caller's own image / trace
            for k in (orig_key, InvertibleTransform.trace_key(orig_key)):
                if k in data:
                    out[k] = data[k]
        return out


def checked_datalist(
    path: str | os.PathLike,
    split: str,
    label_key: str = "label",
    min_depth: int | None = None,
    num_classes: int | None = None,
    channels: int = 1,
) -> list[dict]:
    """A bundle's labelled datalist: :func:`load_datalist` then :func:`check_volumes`, the list every
    ``train#datalist`` / ``validate#datalist`` of the bundles reads.

    Args:
        path: the decathlon-style datalist JSON.
        split: the list to read (``training``, ``validation``, ``test``).
        label_key: the entry key holding the label file; when it is not ``label`` each entry gets a copy of
            it under ``label`` (the key the bundles' transforms read), e.g. 3DSAM-adapter's tumour-only labels.
        min_depth: passed to :func:`check_volumes` (at least this many slices).
        num_classes: passed to :func:`check_volumes` (classes incl. background; reads every label).
        channels: passed to :func:`check_volumes` (image channels).

    Returns:
        The checked entries, each with an ``image`` and a ``label`` file.
    """
    items = load_datalist(path, split, keys=["image", label_key])
    if label_key != "label":
        items = [dict(item, label=item[label_key]) for item in items]
    return check_volumes(items, min_depth=min_depth, num_classes=num_classes, channels=channels)


def demo_data_dir(bundle_root: str | os.PathLike) -> str:
    """Where the demo overlays (``configs/demo.json``) read the phantom data: ``$SAM_BUNDLES_DEMO_DATA`` when
    set, else ``<repo>/demo_output/data`` beside the ``bundles/`` folder that holds ``bundle_root``
    (``python -m tools demo_data`` writes it there)."""
    default = os.path.abspath(os.path.join(os.fspath(bundle_root), "..", "..", "demo_output", "data"))
    return os.environ.get("SAM_BUNDLES_DEMO_DATA", default)
