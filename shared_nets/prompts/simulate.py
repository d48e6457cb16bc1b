"""Prompt simulation from labels for prompted training and evaluation.

Produces MONAI Label style prompts in the data dictionary: ``foreground`` / ``background``
click lists ``[[i, j, k], ...]`` and a ``roi`` box ``[i0, j0, k0, i1, j1, k1]`` (inclusive
start, exclusive end), all in the voxel grid of the label as it is when the transform runs
(i.e. after cropping), so no :class:`~shared_nets.prompts.PointsToGridd` is needed.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable
from monai.transforms.utils import distance_transform_edt, generate_spatial_bounding_box
from monai.utils import convert_data_type

__all__ = ["SelectObjectd", "SimulateClicksd", "SimulateBoxd", "box_iou"]

_MODES = ("3d", "2d")


def _label_numpy(label: Any, key: str) -> np.ndarray:
    """``[C, H, W, D]`` label (tensor or array) -> numpy array, checking its shape."""
    arr = convert_data_type(label, np.ndarray)[0]
    if arr.ndim != 4:
        raise ValueError(f"'{key}' must be a channel-first label [C, H, W, D], got shape {tuple(arr.shape)}.")
    return arr


def _object_mask(label: Any, key: str) -> np.ndarray:
    """Binary object ``[H, W, D]``: voxels > 0 in any channel."""
    return np.any(_label_numpy(label, key) > 0, axis=0)


def _check_axis(slice_axis: int) -> int:
    if not isinstance(slice_axis, (int, np.integer)) or not -3 <= slice_axis <= 2:
        raise ValueError(f"slice_axis must be a spatial axis in [-3, 2] (-1 = axial D), got {slice_axis!r}.")
    return int(slice_axis) % 3


def _check_count(value: Any, name: str) -> tuple[int, int]:
    """``n`` or ``(min, max)`` (inclusive) -> ``(min, max)``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        lo = hi = int(value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value):
        lo, hi = int(value[0]), int(value[1])
    else:
        raise ValueError(f"{name} must be a non-negative int or a (min, max) pair of ints, got {value!r}.")
    if lo < 0 or hi < lo:
        raise ValueError(f"{name} must satisfy 0 <= min <= max, got {value!r}.")
    return lo, hi


def box_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU of two ``[i0, j0, k0, i1, j1, k1]`` boxes (exclusive ends), in voxels."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = a.size // 2
    inter = np.prod(np.clip(np.minimum(a[n:], b[n:]) - np.maximum(a[:n], b[:n]), 0, None))
    union = np.prod(a[n:] - a[:n]) + np.prod(b[n:] - b[:n]) - inter
    return float(inter / union) if union > 0 else 0.0


# Prompted bundles segment one object per forward: K = 2 output channels (background, object).
class SelectObjectd(Randomizable, MapTransform):
    """Pick one foreground class of a label map for one-object prompted training.

    Chooses uniformly among the class ids present in the label (restricted to ``class_ids``
    if given), replaces the label by its binary mask (1 for that class, same dtype and meta)
    and stores the chosen id under ``object_key``. When no (allowed) foreground is present the
    label becomes all zero and ``object_key`` is 0, so empty crops still train "nothing here".

    Args:
        label_key: key of the single-channel label ``[1, H, W, D]`` holding class ids.
        class_ids: allowed class ids, or ``None`` for all positive ids present.
        object_key: where the chosen id (int) is written.
        allow_missing_keys: skip the transform when the label key is missing.
    """

    def __init__(
        self,
        label_key: str = "label",
        class_ids: Sequence[int] | None = None,
        object_key: str = "object_id",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, label_key, allow_missing_keys)
        if class_ids is not None:
            if isinstance(class_ids, (int, np.integer)):
                class_ids = [int(class_ids)]
            if not all(isinstance(c, (int, np.integer)) and c > 0 for c in class_ids) or len(class_ids) == 0:
                raise ValueError(f"class_ids must be None or a non-empty list of positive ints, got {class_ids!r}.")
            class_ids = sorted({int(c) for c in class_ids})
        self.label_key = label_key
        self.class_ids = class_ids
        self.object_key = object_key
        self._chosen = 0

    def randomize(self, data: Sequence[int]) -> None:
        """Choose one id from ``data`` (the candidate ids), or 0 when empty."""
        self._chosen = int(self.R.choice(np.asarray(data))) if len(data) else 0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            lab = _label_numpy(label, str(key))
            if lab.shape[0] != 1:
                raise ValueError(
                    f"SelectObjectd: '{key}' must hold class ids in one channel [1, H, W, D], got shape {lab.shape}."
                )
            if np.issubdtype(lab.dtype, np.floating):
                lab = np.rint(lab)
            present = [int(v) for v in np.unique(lab) if v > 0]
            if self.class_ids is not None:
                present = [c for c in present if c in self.class_ids]
            self.randomize(present)
            if isinstance(label, torch.Tensor):
                vals = torch.round(label) if label.is_floating_point() else label
                d[key] = (vals == self._chosen).to(label.dtype) if self._chosen else torch.zeros_like(label)
            else:
                d[key] = (lab == self._chosen).astype(np.asarray(label).dtype) if self._chosen else np.zeros_like(label)
            d[self.object_key] = self._chosen
        return d


# Med-SA "Experimental settings" (1-point / 3-points, positive + negative clicks); 3DSAM-adapter training points
class SimulateClicksd(Randomizable, MapTransform):
    """Simulate positive/negative clicks from a (binary) label, as a user would place them.

    Positive clicks are drawn without replacement inside the object (label > 0 in any
    channel). With ``sampling="edt"`` (default) the probability of a voxel is proportional to
    its Euclidean distance to the object boundary, so interior points are preferred (the
    DeepGrow convention); ``"uniform"`` draws uniformly. Negative clicks are drawn uniformly
    from background voxels inside the object's bounding box dilated by ``negative_margin``
    (``negative_region="near"``, falling back to anywhere if that box has no background) or
    anywhere (``"anywhere"``).

    ``mode="3d"`` draws ``num_positive`` / ``num_negative`` clicks from the whole volume;
    ``mode="2d"`` draws them per slice along ``slice_axis`` for every slice that contains the
    object (each click is ``[i, j, k]`` with its slice index on the slice axis; distances are
    in-plane). An empty label gives no positive clicks; in 3D mode negatives are then drawn
    anywhere, in 2D mode there are no clicks at all.

    ``jitter`` moves each click by a random integer offset in ``[-jitter, jitter]`` per
    (in-plane) axis; a jittered click that leaves its region (a positive leaving the object, a
    negative entering it) keeps its un-jittered position, so click labels stay truthful.

    Args:
        label_key: key of the label ``[C, H, W, D]``.
        num_positive: clicks per volume (3d) or per slice (2d): int or inclusive ``(min, max)``.
        num_negative: same for negative clicks.
        mode: ``"3d"`` or ``"2d"``.
        jitter: maximum click offset in voxels (int >= 0).
        positive_key: output key for the positive clicks ``[[i, j, k], ...]``.
        negative_key: output key for the negative clicks.
        slice_axis: spatial axis of the slices in ``"2d"`` mode (-1 = D, axial after RAS).
        sampling: ``"edt"`` or ``"uniform"`` for positive clicks.
        negative_region: ``"near"`` or ``"anywhere"``.
        negative_margin: dilation of the bounding box for ``"near"`` negatives, in voxels.
        allow_missing_keys: skip the transform when the label key is missing.
    """

    def __init__(
        self,
        label_key: str = "label",
        num_positive: int | Sequence[int] = 1,
        num_negative: int | Sequence[int] = 0,
        mode: str = "3d",
        jitter: int = 0,
        positive_key: str = "foreground",
        negative_key: str = "background",
        slice_axis: int = -1,
        sampling: str = "edt",
        negative_region: str = "near",
        negative_margin: int = 5,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, label_key, allow_missing_keys)
        self.num_positive = _check_count(num_positive, "num_positive")
        self.num_negative = _check_count(num_negative, "num_negative")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if not isinstance(jitter, (int, np.integer)) or jitter < 0:
            raise ValueError(f"jitter must be a non-negative int (voxels), got {jitter!r}.")
        if sampling not in ("edt", "uniform"):
            raise ValueError(f"sampling must be 'edt' or 'uniform', got {sampling!r}.")
        if negative_region not in ("near", "anywhere"):
            raise ValueError(f"negative_region must be 'near' or 'anywhere', got {negative_region!r}.")
        if not isinstance(negative_margin, (int, np.integer)) or negative_margin < 0:
            raise ValueError(f"negative_margin must be a non-negative int, got {negative_margin!r}.")
        self.label_key = label_key
        self.mode = mode
        self.jitter = int(jitter)
        self.positive_key = positive_key
        self.negative_key = negative_key
        self.slice_axis = _check_axis(slice_axis)
        self.sampling = sampling
        self.negative_region = negative_region
        self.negative_margin = int(negative_margin)

    def randomize(self, data: Any = None) -> None:
        """Unused: sampling draws from ``self.R`` while it visits the label."""

    def _count(self, rng: tuple[int, int]) -> int:
        return int(self.R.randint(rng[0], rng[1] + 1)) if rng[1] > rng[0] else rng[0]

    def _draw(self, mask: np.ndarray, n: int, weights: np.ndarray | None = None) -> np.ndarray:
        """``n`` distinct voxels of ``mask`` (fewer if it is smaller) -> ``[n, ndim]`` indices."""
        idx = np.flatnonzero(mask)
        n = min(n, idx.size)
        if n == 0:
            return np.zeros((0, mask.ndim), dtype=np.int64)
        p = None
        if weights is not None:
            w = weights.reshape(-1)[idx].astype(np.float64)
            p = w / w.sum()
        chosen = self.R.choice(idx.size, size=n, replace=False, p=p)
        return np.stack(np.unravel_index(idx[chosen], mask.shape), axis=1)

    def _jitter(self, pts: np.ndarray, region: np.ndarray) -> np.ndarray:
        if self.jitter == 0 or len(pts) == 0:
            return pts
        off = self.R.randint(-self.jitter, self.jitter + 1, size=pts.shape)
        moved = np.clip(pts + off, 0, np.asarray(region.shape) - 1)
        ok = region[tuple(moved.T)]
        return np.where(ok[:, None], moved, pts)

    def _clicks(self, obj: np.ndarray, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
        """Clicks on one n-d object mask (a volume or a slice)."""
        has_obj = bool(obj.any())
        pos = np.zeros((0, obj.ndim), dtype=np.int64)
        if has_obj and n_pos:
            w = None
            if self.sampling == "edt":
                w = convert_data_type(distance_transform_edt(obj[None].astype(np.float32)), np.ndarray)[0][0]
            pos = self._jitter(self._draw(obj, n_pos, w), obj)
        neg = np.zeros((0, obj.ndim), dtype=np.int64)
        if n_neg:
            bg = ~obj
            region = bg
            if self.negative_region == "near" and has_obj:
                start, end = generate_spatial_bounding_box(obj[None], margin=self.negative_margin)
                near = np.zeros_like(obj)
                near[tuple(slice(max(int(s), 0), int(e)) for s, e in zip(start, end))] = (
                    True  # the margin may reach past 0
                )
                if (near & bg).any():
                    region = near & bg
            neg = self._jitter(self._draw(region, n_neg), bg)
        return pos, neg

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            obj = _object_mask(d[key], str(key))
            if self.mode == "3d":
                pos, neg = self._clicks(obj, self._count(self.num_positive), self._count(self.num_negative))
            else:
                pos_l, neg_l = [], []
                ax = self.slice_axis
                for s in np.flatnonzero(np.any(obj, axis=tuple(a for a in range(3) if a != ax))):
                    p2, n2 = self._clicks(
                        np.take(obj, s, axis=ax), self._count(self.num_positive), self._count(self.num_negative)
                    )
                    pos_l.append(np.insert(p2, ax, s, axis=1))
                    neg_l.append(np.insert(n2, ax, s, axis=1))
                empty = np.zeros((0, 3), dtype=np.int64)
                pos = np.concatenate(pos_l) if pos_l else empty
                neg = np.concatenate(neg_l) if neg_l else empty
            d[self.positive_key] = pos.astype(int).tolist()
            d[self.negative_key] = neg.astype(int).tolist()
        return d


# MA-SAM Table 4 (tight / 5 % relaxed 3D box); Med-SA "Experimental settings" (BBox 0.5 / 0.75)
class SimulateBoxd(Randomizable, MapTransform):
    """Simulate a box prompt from a (binary) label.

    The tight box is the bounding box of label > 0. Then one of:

    - ``jitter`` (MA-SAM's "5 % relaxed box", jitter=0.05): every face moves outward by a
      random fraction in ``[0, jitter]`` of the box extent along its axis (independently per
      face, so the box grows and shifts but always contains the object), clamped to the image.
    - ``iou`` (Med-SA's "BBox 0.5 / 0.75"): the tight box, same size, is translated so that its
      IoU with the tight box is ``iou``. Axes are visited in random order; each takes the
      integer overlap (hence shift) that brings the IoU closest to the target given the
      shifts already chosen, so small boxes that one axis cannot reach use a second axis.
      Shift directions are random among those keeping the box inside the image, and an axis
      only takes shifts that fit (a box spanning the image along an axis cannot move along it).
      Tiny boxes, and boxes that fill the image, reach the nearest achievable IoU only.

    ``mode="3d"`` writes one box ``[i0, j0, k0, i1, j1, k1]``; ``mode="2d"`` a list of
    per-slice boxes ``[[i0, j0, k, i1, j1, k + 1], ...]`` (for ``slice_axis=-1``; the slice
    axis extent is always one slice) for every slice containing the object, with
    jitter/iou applied in-plane. An empty label writes ``[]`` (no box).

    Args:
        label_key: key of the label ``[C, H, W, D]``.
        mode: ``"3d"`` or ``"2d"``.
        jitter: relative random enlargement per face (float >= 0).
        iou: target IoU with the tight box in ``(0, 1]``, or ``None``; exclusive with ``jitter``.
        roi_key: output key.
        slice_axis: spatial axis of the slices in ``"2d"`` mode.
        allow_missing_keys: skip the transform when the label key is missing.
    """

    def __init__(
        self,
        label_key: str = "label",
        mode: str = "3d",
        jitter: float = 0.0,
        iou: float | None = None,
        roi_key: str = "roi",
        slice_axis: int = -1,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, label_key, allow_missing_keys)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if not isinstance(jitter, (int, float)) or jitter < 0:
            raise ValueError(f"jitter must be a float >= 0 (relative enlargement, e.g. 0.05), got {jitter!r}.")
        if iou is not None and (not isinstance(iou, (int, float)) or not 0 < iou <= 1):
            raise ValueError(f"iou must be None or a float in (0, 1], got {iou!r}.")
        if iou is not None and jitter:
            raise ValueError(f"pass either jitter or iou, not both (got jitter={jitter!r}, iou={iou!r}).")
        self.label_key = label_key
        self.mode = mode
        self.jitter = float(jitter)
        self.iou = None if iou is None else float(iou)
        self.roi_key = roi_key
        self.slice_axis = _check_axis(slice_axis)

    def randomize(self, data: Any = None) -> None:
        """Unused: draws happen from ``self.R`` while boxes are built."""

    def _relax(
        self, lo: np.ndarray, hi: np.ndarray, shape: np.ndarray, axes: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        ext = hi - lo
        u = self.R.uniform(0.0, self.jitter, size=(2, len(axes)))
        lo, hi = lo.copy(), hi.copy()
        lo[axes] = np.maximum(lo[axes] - np.rint(u[0] * ext[axes]).astype(np.int64), 0)
        hi[axes] = np.minimum(hi[axes] + np.rint(u[1] * ext[axes]).astype(np.int64), shape[axes])
        return lo, hi

    def _shift_to_iou(
        self, lo: np.ndarray, hi: np.ndarray, shape: np.ndarray, axes: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        # Translating a box of extents e by s voxels leaves overlaps r = e - s and
        # IoU = prod(r) / (2 prod(e) - prod(r)); the target overlap volume is 2 t V / (1 + t).
        t = self.iou
        ext = (hi - lo).astype(np.float64)
        vol = float(np.prod(ext))
        target = 2 * t * vol / (1 + t)
        # the box stays the same size and inside the image: along an axis it can move at most as
        # far as the larger gap to the image border, so the overlap there cannot go below ext - room
        room = np.maximum(lo, shape - hi).astype(np.float64)
        min_r = np.maximum(ext - room, 1.0)

        def iou_of(rr: np.ndarray) -> float:
            o = float(np.prod(rr))
            return o / (2 * vol - o)

        def greedy(order: Sequence[int]) -> np.ndarray:
            r = ext.copy()
            for a in order:
                other = float(np.prod(r)) / r[a]
                want = target / other
                best, best_err = r[a], abs(iou_of(r) - t)
                for c in {np.floor(want), np.ceil(want)}:
                    c = float(np.clip(c, min_r[a], ext[a]))
                    rr = r.copy()
                    rr[a] = c
                    if abs(iou_of(rr) - t) < best_err:
                        best, best_err = c, abs(iou_of(rr) - t)
                r[a] = best
            return r

        # One axis order can get stuck far from the target when its first axis is tiny (a 2 x 5
        # box aiming at IoU 0.66 gives 0.33 from the short axis first, 0.67 from the long one):
        # try every order, in random order, and keep the first within 0.01 of the closest.
        orders = list(itertools.permutations(axes))
        candidates = [greedy(orders[i]) for i in self.R.permutation(len(orders))]
        errors = [abs(iou_of(c) - t) for c in candidates]
        r = next(c for c, e in zip(candidates, errors) if e <= min(errors) + 0.01)
        shift = (ext - r).astype(np.int64)
        lo, hi = lo.copy(), hi.copy()
        for a in axes:
            s = int(shift[a])
            if s == 0:
                continue
            signs = [g for g in (-1, 1) if 0 <= lo[a] + g * s and hi[a] + g * s <= shape[a]]
            g = int(self.R.choice(signs)) if signs else int(self.R.choice([-1, 1]))
            lo[a], hi[a] = max(lo[a] + g * s, 0), min(hi[a] + g * s, shape[a])
        return lo, hi

    def _box(self, obj: np.ndarray) -> np.ndarray:
        """Box ``[lo..., hi...]`` of an n-d object mask, jittered or shifted along all its axes."""
        start, end = generate_spatial_bounding_box(obj[None])
        lo, hi = np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)
        shape = np.asarray(obj.shape, dtype=np.int64)
        axes = list(range(obj.ndim))
        if self.iou is not None:
            lo, hi = self._shift_to_iou(lo, hi, shape, axes)
        elif self.jitter:
            lo, hi = self._relax(lo, hi, shape, axes)
        return np.concatenate([lo, hi])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            obj = _object_mask(d[key], str(key))
            if not obj.any():
                d[self.roi_key] = []
                continue
            if self.mode == "3d":
                d[self.roi_key] = self._box(obj).astype(int).tolist()
                continue
            ax = self.slice_axis
            boxes = []
            for s in np.flatnonzero(np.any(obj, axis=tuple(a for a in range(3) if a != ax))):
                b2 = self._box(np.take(obj, s, axis=ax))  # [lo_a, lo_b, hi_a, hi_b]
                box = np.insert(np.insert(b2, 2 + ax, s + 1), ax, s)  # hi first, then lo
                boxes.append(box.astype(int).tolist())
            d[self.roi_key] = boxes
        return d
