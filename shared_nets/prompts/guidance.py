"""Guidance channels: rasterise prompts into extra input channels and decode them back.

Encoding (a pre-processing transform, DeepGrow/DeepEdit style): the image gets one extra
channel per prompt name, in the order ``[image..., positive clicks, negative clicks, box]``;
a click is one voxel set to 1, a box a filled cuboid of 1. Decoding (inside a network, per
window, batched torch, device-agnostic) turns those channels back into SAM's sparse prompts:
click coordinates with labels padded by -1 (as SAM and VISTA3D do) and boxes.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .points import parse_prompt

__all__ = [
    "AddGuidanceChannelsd",
    "decode_points",
    "decode_points_2d",
    "decode_boxes_2d",
    "decode_box_3d",
    "scale_coords",
]


# Prompts travel as extra input channels after the image channels, as MONAI's DeepGrow/DeepEdit guidance
# does: [image..., positive clicks, negative clicks, box] (docs/architecture.md, "Tensor contract").
class AddGuidanceChannelsd(MapTransform):
    """Append one guidance channel per prompt name to the image (clicks: one voxel each; box: a filled cuboid).

    Each entry of ``channels`` names a data-dictionary key. Its value is parsed by
    :func:`~shared_nets.prompts.points.parse_prompt`: clicks ``[[i, j, k], ...]`` set one
    voxel each to 1; a box ``[i0, j0, k0, i1, j1, k1]`` or a list of boxes (per-slice boxes of
    ``SimulateBoxd(mode="2d")``) fill their cuboids with 1. A missing key, ``None`` or an
    empty list gives an all-zero channel. Use it as the last pre-processing transform, after
    :class:`~shared_nets.prompts.PointsToGridd` or the prompt simulators.

    Args:
        image_key: key of the channel-first image ``[C, H, W, D]``; it becomes
            ``[C + len(channels), H, W, D]``, same dtype, device and meta.
        channels: prompt keys, one output channel each, in order.
        allow_missing_keys: skip the transform when the image key is missing.

    Raises:
        ValueError: a click or box outside the image (message names the key and the shape).
    """

    def __init__(
        self,
        image_key: str = "image",
        channels: Sequence[str] = ("foreground", "background", "roi"),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(image_key, allow_missing_keys)
        if isinstance(channels, str) or len(channels) == 0:
            raise ValueError(f"channels must be a non-empty list of prompt keys, got {channels!r}.")
        self.channels = tuple(channels)

    @staticmethod
    def rasterise(value: Any, key: str, spatial_shape: Sequence[int]) -> np.ndarray:
        """One prompt value -> a ``[H, W, D]`` float32 channel.

        Args:
            value: clicks, box(es), or None / [].
            key: prompt key for error messages.
            spatial_shape: ``(H, W, D)``.

        Returns:
            ``[H, W, D]`` array of 0 / 1.
        """
        shape = np.asarray(spatial_shape, dtype=np.int64)
        out = np.zeros(tuple(shape), dtype=np.float32)
        kind, arr = parse_prompt(value, key)
        if kind == "empty":
            return out
        if np.any(arr != np.rint(arr)):
            raise ValueError(f"prompt '{key}' must hold integer voxel indices, got {arr.tolist()}.")
        arr = arr.astype(np.int64)
        if kind == "points":
            bad = np.any((arr < 0) | (arr >= shape), axis=1)
            if bad.any():
                raise ValueError(
                    f"prompt '{key}' has clicks {arr[bad].tolist()} outside the image of spatial shape "
                    f"{tuple(shape.tolist())}; "
                    "map them with PointsToGridd first."
                )
            out[tuple(arr.T)] = 1.0
            return out
        for box in arr:
            lo, hi = box[:3], box[3:]
            if np.any(lo < 0) or np.any(hi > shape) or np.any(hi <= lo):
                raise ValueError(
                    f"prompt '{key}' box {box.tolist()} is empty or outside the image of spatial shape "
                    f"{tuple(shape.tolist())} "
                    "(expected 0 <= start < end <= size per axis)."
                )
            out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1.0
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, torch.Tensor):
                img = MetaTensor(torch.as_tensor(np.asarray(img)))
            if img.ndim != 4:
                raise ValueError(
                    f"AddGuidanceChannelsd: '{key}' must be channel-first [C, H, W, D], got shape {tuple(img.shape)}."
                )
            spatial = tuple(int(s) for s in img.shape[1:])
            guid = np.stack([self.rasterise(d.get(name), name, spatial) for name in self.channels])
            dtype = img.dtype if img.is_floating_point() else torch.float32
            guid_t = torch.as_tensor(guid, dtype=dtype, device=img.device)
            d[key] = torch.cat([img.to(dtype), guid_t], dim=0)
        return d


def _check_guidance(x: torch.Tensor, channels: int, name: str) -> torch.Tensor:
    """Validate ``[B, channels, H, W, D]`` and return it as a plain tensor."""
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor [B, {channels}, H, W, D], got {shape}.")
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _check_max_points(max_points: int) -> None:
    if not isinstance(max_points, (int, np.integer)) or isinstance(max_points, bool) or max_points < 1:
        raise ValueError(f"max_points must be a positive int, got {max_points!r}.")


def _points_from_rows(
    rows: torch.Tensor, chan: torch.Tensor, flat: torch.Tensor, num_rows: int, max_points: int, strict: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick at most ``max_points`` clicks per row from a list of nonzero guidance voxels.

    Args:
        rows: ``[N]`` row (batch item or slice) of each click voxel.
        chan: ``[N]`` 0 positive, 1 negative.
        flat: ``[N]`` flat index of the voxel within its row's spatial grid.
        num_rows: number of rows R.
        max_points: slots P per row.
        strict: raise instead of truncating.

    Returns:
        ``(flat_idx [R, P], labels [R, P], filled [R, P] bool)``; labels 1 / 0 / -1 (padding).
    """
    device = flat.device
    p = max_points
    # group by (row, channel), raster order inside each group
    n_flat = int(flat.max().item()) + 1 if flat.numel() else 1
    key = (rows * 2 + chan) * n_flat + flat
    key, order = torch.sort(key)
    rows, chan, flat = rows[order], chan[order], flat[order]
    counts = torch.bincount(rows * 2 + chan, minlength=num_rows * 2).view(num_rows, 2)
    n_pos, n_neg = counts[:, 0], counts[:, 1]
    if strict and bool(((n_pos + n_neg) > p).any()):
        worst = int((n_pos + n_neg).max().item())
        raise ValueError(f"guidance holds {worst} clicks in one prompt row but max_points={p} (strict=True).")
    # quotas: positives get up to ceil(P/2) slots when both kinds overflow, unused slots go to the other kind
    keep_pos = torch.minimum(n_pos, torch.clamp(p - n_neg, min=p - p // 2))
    keep_neg = torch.minimum(n_neg, p - keep_pos)
    group = rows * 2 + chan
    starts = torch.cumsum(counts.view(-1), 0) - counts.view(-1)
    rank = torch.arange(group.numel(), device=device) - starts[group]
    quota = torch.where(chan == 0, keep_pos[rows], keep_neg[rows])
    keep = rank < quota
    slot = torch.where(chan == 0, rank, keep_pos[rows] + rank)[keep]
    rows_k, chan_k, flat_k = rows[keep], chan[keep], flat[keep]
    flat_idx = torch.zeros(num_rows, p, dtype=torch.long, device=device)
    labels = torch.full((num_rows, p), -1, dtype=torch.long, device=device)
    flat_idx[rows_k, slot] = flat_k
    labels[rows_k, slot] = 1 - chan_k
    return flat_idx, labels, labels >= 0


# SAM prompt encoder input: point coordinates with labels, padding label -1 (SAM Sec. 3, VISTA3D)
def decode_points(guidance: torch.Tensor, max_points: int, strict: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Clicks from positive/negative guidance channels, per batch item (3D prompts).

    Every nonzero voxel of channel 0 is a positive click, of channel 1 a negative click.
    With more than ``max_points`` clicks the choice is deterministic: positives first, then
    negatives, each in raster (i, j, k) order; when both kinds overflow positives keep
    ``ceil(P / 2)`` slots and negatives the rest (unused slots of one kind go to the other).

    Args:
        guidance: ``[B, 2, H, W, D]`` (positive, negative).
        max_points: P, slots per item.
        strict: raise ``ValueError`` instead of dropping clicks beyond ``max_points``.

    Returns:
        ``coords [B, P, 3]`` float ``(i, j, k)`` voxel indices (0 in padding) and
        ``labels [B, P]`` long: 1 positive, 0 negative, -1 padding.
    """
    guidance = _check_guidance(guidance, 2, "guidance")
    _check_max_points(max_points)
    b, _, h, w, dd = guidance.shape
    nz = torch.nonzero(guidance != 0)  # [N, 5]: b, c, i, j, k
    flat = (nz[:, 2] * w + nz[:, 3]) * dd + nz[:, 4]
    flat_idx, labels, filled = _points_from_rows(nz[:, 0], nz[:, 1], flat, b, int(max_points), strict)
    coords = torch.stack([flat_idx // (w * dd), (flat_idx // dd) % w, flat_idx % dd], dim=-1)
    coords = torch.where(filled[..., None], coords, torch.zeros_like(coords))
    dtype = guidance.dtype if guidance.is_floating_point() else torch.float32
    return coords.to(dtype), labels


def decode_points_2d(
    guidance: torch.Tensor, max_points: int, strict: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clicks per axial slice, in SAM's point order (2D prompts for slice-based methods).

    Same selection rule as :func:`decode_points`, applied per slice; raster order is (y, x).

    Args:
        guidance: ``[B, 2, H, W, D]`` (positive, negative).
        max_points: P, slots per slice.
        strict: raise ``ValueError`` instead of dropping clicks beyond ``max_points``.

    Returns:
        ``coords [B*D, P, 2]`` float ``(x, y)`` with x the index along W and y along H (SAM's
        order), and ``labels [B*D, P]`` (1 / 0 / -1 padding); row ``b * D + d`` is slice d of item b.
    """
    guidance = _check_guidance(guidance, 2, "guidance")
    _check_max_points(max_points)
    b, _, h, w, dd = guidance.shape
    nz = torch.nonzero(guidance != 0)
    rows = nz[:, 0] * dd + nz[:, 4]
    flat = nz[:, 2] * w + nz[:, 3]
    flat_idx, labels, filled = _points_from_rows(rows, nz[:, 1], flat, b * dd, int(max_points), strict)
    coords = torch.stack([flat_idx % w, flat_idx // w], dim=-1)
    coords = torch.where(filled[..., None], coords, torch.zeros_like(coords))
    dtype = guidance.dtype if guidance.is_floating_point() else torch.float32
    return coords.to(dtype), labels


def _extent(occ: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First index and last index + 1 of True along ``dim`` (0, 0 where none)."""
    n = occ.shape[dim]
    idx = torch.arange(n, device=occ.device).view([-1 if a == dim % occ.ndim else 1 for a in range(occ.ndim)])
    big = torch.full_like(idx, n)
    first = torch.where(occ, idx, big).amin(dim=dim)
    last = torch.where(occ, idx, -torch.ones_like(idx)).amax(dim=dim) + 1
    valid = occ.any(dim=dim)
    return torch.where(valid, first, torch.zeros_like(first)), torch.where(valid, last, torch.zeros_like(last))


# SAM box prompt per slice (Med-SA 2D / slice-wise use of a 3D box)
def decode_boxes_2d(box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice boxes from a box guidance channel (the 3D box restricted to each slice).

    Args:
        box: ``[B, 1, H, W, D]``; the box of a slice is the bounding rectangle of its nonzero pixels.

    Returns:
        ``boxes [B*D, 4]`` float ``(x0, y0, x1, y1)``, x along W and y along H, pixel edges
        (inclusive start, exclusive end; zeros where invalid), and ``valid [B*D]`` bool
        (False for slices without box pixels). Row ``b * D + d`` is slice d of item b.
    """
    box = _check_guidance(box, 1, "box")
    occ = box[:, 0] != 0  # [B, H, W, D]
    x0, x1 = _extent(occ.any(dim=1), dim=1)  # along W -> [B, D]
    y0, y1 = _extent(occ.any(dim=2), dim=1)  # along H -> [B, D]
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).reshape(-1, 4)
    valid = occ.any(dim=(1, 2)).reshape(-1)
    dtype = box.dtype if box.is_floating_point() else torch.float32
    return boxes.to(dtype), valid


# MA-SAM Table 4: one 3D box per volume, restricted to the window
def decode_box_3d(box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item 3D box from a box guidance channel.

    Args:
        box: ``[B, 1, H, W, D]``; the box is the bounding cuboid of the nonzero voxels.

    Returns:
        ``boxes [B, 6]`` float ``(i0, j0, k0, i1, j1, k1)`` (inclusive start, exclusive end;
        zeros where invalid) and ``valid [B]`` bool.
    """
    box = _check_guidance(box, 1, "box")
    occ = box[:, 0] != 0  # [B, H, W, D]
    i0, i1 = _extent(occ.any(dim=3).any(dim=2), dim=1)
    j0, j1 = _extent(occ.any(dim=3).any(dim=1), dim=1)
    k0, k1 = _extent(occ.any(dim=2).any(dim=1), dim=1)
    boxes = torch.stack([i0, j0, k0, i1, j1, k1], dim=-1)
    valid = occ.flatten(1).any(dim=1)
    dtype = box.dtype if box.is_floating_point() else torch.float32
    return boxes.to(dtype), valid


def scale_coords(coords: torch.Tensor, from_size: int | Sequence[int], to_size: int | Sequence[int]) -> torch.Tensor:
    """Rescale coordinates from one frame to another (e.g. a window to SAM's ``img_size`` input).

    As ``segment_anything``'s ``ResizeLongestSide.apply_coords``: each coordinate is multiplied
    by ``to / from`` along its axis. Works for points and for boxes whose last dimension
    repeats the point axes (``(x0, y0, x1, y1)`` with sizes given for ``(x, y)``).

    Args:
        coords: ``[..., n]`` or ``[..., 2n]`` coordinates.
        from_size: source size per coordinate axis, in the coordinates' axis order (for SAM's
            ``(x, y)`` points that is ``(W, H)``); an int for all axes.
        to_size: target size, same form.

    Returns:
        Float tensor of the same shape.
    """
    n = coords.shape[-1]
    src = torch.as_tensor(from_size, dtype=torch.float64).reshape(-1)
    dst = torch.as_tensor(to_size, dtype=torch.float64).reshape(-1)
    allowed = {1, n} | ({n // 2} if n % 2 == 0 else set())
    if src.numel() != dst.numel() or src.numel() not in allowed:
        raise ValueError(
            "from_size and to_size must be ints or sequences with one size per coordinate axis "
            f"({sorted(allowed - {1})}), "
            f"got from_size={from_size!r}, to_size={to_size!r}."
        )
    if bool((src <= 0).any()) or bool((dst <= 0).any()):
        raise ValueError(f"from_size and to_size must be positive, got from_size={from_size!r}, to_size={to_size!r}.")
    factor = dst / src
    if factor.numel() not in (1, n):
        factor = factor.repeat(n // factor.numel())
    dtype = coords.dtype if coords.is_floating_point() else torch.float32
    return coords.to(dtype) * factor.to(device=coords.device, dtype=dtype)
