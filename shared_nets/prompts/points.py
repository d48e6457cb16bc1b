"""Prompt coordinates: parsing MONAI Label prompt lists and mapping them between voxel grids."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.transforms.utils import apply_affine_to_points

__all__ = ["PointsToGridd", "parse_prompt", "map_points", "map_boxes"]

logger = logging.getLogger(__name__)

_ON_OUTSIDE = ("drop", "raise")


def parse_prompt(value: Any, key: str = "prompt") -> tuple[str, np.ndarray]:
    """Classify a MONAI Label prompt value as clicks or boxes.

    A flat list of 3 numbers is one click ``[i, j, k]``, a flat list of 6 numbers one box
    ``[i0, j0, k0, i1, j1, k1]``; a list of such lists is several clicks or several boxes
    (the per-slice boxes of :class:`~shared_nets.prompts.SimulateBoxd` ``mode="2d"``).
    ``None`` or an empty list is "no prompt".

    Args:
        value: the data-dictionary entry (list, tuple, numpy array or tensor).
        key: its key, used in error messages.

    Returns:
        ``(kind, array)``: kind ``"empty"`` with an ``[0, 3]`` array, ``"points"`` with ``[N, 3]``
        or ``"boxes"`` with ``[N, 6]`` (float64, as given).

    Raises:
        ValueError: when the value is neither.
    """
    if value is None:
        return "empty", np.zeros((0, 3))
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: an int beyond float64's range
        text = repr(value)
        text = text if len(text) <= 200 else text[:197] + "..."
        raise ValueError(
            f"prompt '{key}' must be a list of [i, j, k] clicks or [i0, j0, k0, i1, j1, k1] boxes, got {text}."
        ) from e
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"prompt '{key}' holds NaN or infinite values; expected finite voxel indices.")
    if arr.size == 0:
        return "empty", np.zeros((0, 3))
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] not in (3, 6):
        raise ValueError(
            f"prompt '{key}' must be a list of [i, j, k] clicks or [i0, j0, k0, i1, j1, k1] boxes, "
            f"got an array of shape {arr.shape}."
        )
    return ("points" if arr.shape[1] == 3 else "boxes"), arr


def _as_f64(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).as_subclass(torch.Tensor)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _is_flat(value: Any) -> bool:
    """True for a single un-nested prompt such as ``[i0, j0, k0, i1, j1, k1]``."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 1
    return np.ndim(np.asarray(value, dtype=np.float64)) == 1


def _grid_to_grid(src_affine: Any, dst_affine: Any) -> torch.Tensor:
    """``inv(A_dst) @ A_src`` in float64: source voxel index -> destination voxel index."""
    return torch.linalg.inv(_as_f64(dst_affine)) @ _as_f64(src_affine)


def map_points(points: np.ndarray, transform: torch.Tensor) -> np.ndarray:
    """Apply a 4x4 voxel-to-voxel ``transform`` to voxel-centre coordinates.

    Args:
        points: ``[N, 3]`` voxel indices.
        transform: ``[4, 4]`` affine.

    Returns:
        ``[N, 3]`` continuous coordinates (not rounded).
    """
    pts = torch.as_tensor(np.asarray(points, dtype=np.float64))[None]  # [1, N, 3]
    return apply_affine_to_points(pts, transform, dtype=torch.float64)[0].numpy()


def map_boxes(boxes: np.ndarray, transform: torch.Tensor) -> np.ndarray:
    """Map ``[i0, j0, k0, i1, j1, k1]`` boxes (inclusive start, exclusive end) through ``transform``.

    Voxel ``i`` covers the continuous interval ``[i - 0.5, i + 0.5]``, so a box covers
    ``[i0 - 0.5, i1 - 0.5]``. All 8 corners of that cuboid are mapped (exact for axis flips,
    permutations and scalings; the enclosing box for anything oblique), re-sorted per axis and
    turned back into voxel bounds by rounding.

    Args:
        boxes: ``[N, 6]``.
        transform: ``[4, 4]`` voxel-to-voxel affine.

    Returns:
        ``[N, 6]`` integer boxes, each at least one voxel wide per axis (not clamped).
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape[0] == 0:
        return boxes.astype(np.int64)
    lo, hi = boxes[:, :3] - 0.5, boxes[:, 3:] - 0.5
    corners = np.stack(
        [np.where(np.array(bits, dtype=bool), hi, lo) for bits in np.ndindex(2, 2, 2)], axis=1
    )  # [N, 8, 3]
    mapped = map_points(corners.reshape(-1, 3), transform).reshape(-1, 8, 3)
    new_lo = np.rint(mapped.min(axis=1) + 0.5)
    new_hi = np.rint(mapped.max(axis=1) + 0.5)
    new_hi = np.maximum(new_hi, new_lo + 1)
    return np.concatenate([new_lo, new_hi], axis=1).astype(np.int64)


# Prompts become guidance channels only at the end of pre-processing: until then clicks cross the spatial
# transforms as coordinates, mapped through the image's affines, so resampling cannot blur a one-voxel click
class PointsToGridd(MapTransform):
    """Map MONAI Label prompts from the image's original voxel grid to its current grid.

    MONAI Label sends clicks/boxes as voxel indices of the image as loaded. After
    ``Orientationd``, ``Spacingd``, ``Resized`` or crops the image ``MetaTensor`` holds its
    current ``affine`` and still carries ``meta["original_affine"]`` (set by ``LoadImaged``),
    so a click maps as ``idx_new = round(inv(A_cur) @ A_orig @ [i, j, k, 1])``. Boxes map by
    their continuous corners (see :func:`map_boxes`) and are clamped to the grid.

    Prompts that fall outside the current grid (e.g. cut off by a crop) are dropped with a
    logged warning, or raise ``ValueError`` with ``on_outside="raise"``. Apply it once, after
    the spatial transforms and before :class:`~shared_nets.prompts.AddGuidanceChannelsd`.
    If the image has no original affine and no applied operations, the grids are the same
    and prompts pass through (rounded to ints).

    Args:
        keys: prompt keys (missing ones are skipped unless ``allow_missing_keys=False``).
        ref_key: key of the image ``MetaTensor`` ``[C, H, W, D]`` whose grid is the target.
        original_affine_key: key in the image's meta dict holding the original affine, or
            ``None`` for ``"original_affine"``. If the data dictionary itself has this key,
            that value is used (an explicit ``[4, 4]`` affine).
        on_outside: ``"drop"`` or ``"raise"``.
        allow_missing_keys: skip absent prompt keys (default True: prompts are optional).
    """

    def __init__(
        self,
        keys: KeysCollection = ("foreground", "background", "roi"),
        ref_key: str = "image",
        original_affine_key: str | None = None,
        on_outside: str = "drop",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if on_outside not in _ON_OUTSIDE:
            raise ValueError(f"on_outside must be one of {_ON_OUTSIDE}, got {on_outside!r}.")
        self.ref_key = ref_key
        self.original_affine_key = original_affine_key or "original_affine"
        self.on_outside = on_outside

    def _transform(self, d: Mapping[Hashable, Any]) -> tuple[torch.Tensor, tuple[int, ...]]:
        if self.ref_key not in d:
            raise ValueError(f"PointsToGridd: reference image key '{self.ref_key}' is not in the data.")
        img = d[self.ref_key]
        if not isinstance(img, MetaTensor):
            raise ValueError(
                f"PointsToGridd: '{self.ref_key}' must be a MetaTensor with an affine, got {type(img).__name__}."
            )
        if img.ndim != 4:
            raise ValueError(
                f"PointsToGridd: '{self.ref_key}' must be channel-first [C, H, W, D], got shape {tuple(img.shape)}."
            )
        if self.original_affine_key in d:
            orig = d[self.original_affine_key]
        elif self.original_affine_key in img.meta:
            orig = img.meta[self.original_affine_key]
        elif not img.applied_operations:
            orig = img.affine
        else:
            raise ValueError(
                f"PointsToGridd: '{self.ref_key}' has no meta['{self.original_affine_key}'] but was transformed; "
                "load it with LoadImaged or pass original_affine_key."
            )
        orig = _as_f64(orig)
        if orig.shape != (4, 4):
            raise ValueError(f"PointsToGridd: the original affine must be 4x4, got shape {tuple(orig.shape)}.")
        return _grid_to_grid(orig, img.affine), tuple(int(s) for s in img.shape[1:])

    def _outside(self, key: Hashable, what: str, value: Any, shape: tuple[int, ...]) -> None:
        msg = f"PointsToGridd: prompt '{key}' {what} {value} falls outside the current grid of spatial shape {shape}"
        if self.on_outside == "raise":
            raise ValueError(msg + ".")
        logger.warning(msg + "; dropped.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with the prompt lists in the current grid (lists of ints)."""
        d = dict(data)
        transform, shape = None, None
        size = None
        for key in self.key_iterator(d):
            kind, arr = parse_prompt(d[key], str(key))
            if kind == "empty":
                d[key] = []
                continue
            if transform is None:
                transform, shape = self._transform(d)
                size = np.asarray(shape)
            was_flat_box = kind == "boxes" and _is_flat(d[key])
            out: list[list[int]] = []
            if kind == "points":
                mapped = np.rint(map_points(arr, transform)).astype(np.int64)
                for src, p in zip(arr, mapped):
                    if np.any(p < 0) or np.any(p >= size):
                        self._outside(key, "click", src.astype(int).tolist(), shape)
                        continue
                    out.append(p.tolist())
            else:
                mapped = map_boxes(arr, transform)
                for src, b in zip(arr, mapped):
                    lo, hi = np.clip(b[:3], 0, size), np.clip(b[3:], 0, size)
                    if np.any(hi <= lo):
                        self._outside(key, "box", src.astype(int).tolist(), shape)
                        continue
                    out.append(np.concatenate([lo, hi]).tolist())
                if was_flat_box:
                    out = out[0] if out else []
            d[key] = out
        return d
