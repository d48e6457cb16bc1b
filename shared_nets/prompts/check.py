"""Checks of MONAI Label prompts (clicks, boxes) against the loaded image, before any spatial transform."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import MapTransform

from .points import parse_prompt

__all__ = ["CheckPromptsd"]


def _spatial_shape(d: Mapping[Hashable, Any], image_key: str, who: str) -> tuple[int, ...]:
    if image_key not in d:
        raise ValueError(f"{who}: image key '{image_key}' is not in the data.")
    shape = tuple(int(s) for s in np.shape(d[image_key]))
    if len(shape) != 4:
        raise ValueError(f"{who}: '{image_key}' must be channel-first [C, H, W, D], got shape {shape}.")
    return shape[1:]


class CheckPromptsd(MapTransform):
    """Reject bad MONAI Label prompts with a one-line error before any spatial transform.

    Checks, against the image as loaded (``[C, H, W, D]``, right after ``EnsureChannelFirstd``):
    clicks are integer voxel indices inside the image; boxes ``[i0, j0, k0, i1, j1, k1]`` lie
    inside it with ``start < end`` on every axis (zero-area and inverted boxes are errors, not
    silently reordered); at most ``max_points`` clicks (positive + negative) per axial slice
    (``per_slice=True``, the network's ``prompt_scope="slice"``) or in total.

    Args:
        image_key: key of the loaded image.
        click_keys: keys holding click lists (missing / empty = no clicks).
        box_key: key holding a box or a list of boxes (missing / empty = no box).
        max_points: the network's ``max_points``.
        per_slice: count clicks per axial slice (last axis) instead of in total.
        require_prompt: raise when there is neither a click nor a box (the bundle's
            ``automatic: false``), naming the keys to pass.
    """

    def __init__(
        self,
        image_key: str = "image",
        click_keys: Sequence[str] = ("foreground", "background"),
        box_key: str = "roi",
        max_points: int = 8,
        per_slice: bool = True,
        require_prompt: bool = False,
    ) -> None:
        super().__init__([image_key], allow_missing_keys=False)
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
            raise ValueError(f"max_points must be a positive integer, got {max_points!r}.")
        self.image_key, self.click_keys, self.box_key = image_key, tuple(click_keys), box_key
        self.max_points, self.per_slice, self.require_prompt = max_points, bool(per_slice), bool(require_prompt)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shape = np.asarray(_spatial_shape(d, self.image_key, "CheckPromptsd"))
        clicks = []
        for key in self.click_keys:
            kind, arr = parse_prompt(d.get(key), key)
            if kind == "empty":
                continue
            if kind != "points":
                raise ValueError(f"prompt '{key}' must be a list of [i, j, k] clicks, got boxes {arr.tolist()}.")
            if np.any(arr != np.rint(arr)) or np.any(arr < 0) or np.any(arr >= shape):
                bad = arr[np.any((arr < 0) | (arr >= shape) | (arr != np.rint(arr)), axis=1)]
                raise ValueError(
                    f"prompt '{key}' has clicks {bad.tolist()} outside the image of spatial shape "
                    f"{tuple(shape.tolist())} (expected integer voxel indices [i, j, k] with 0 <= index < size)."
                )
            clicks.append(arr.astype(np.int64))
        if clicks:
            allc = np.concatenate(clicks)
            if self.per_slice:
                slices, counts = np.unique(allc[:, 2], return_counts=True)
                if counts.max() > self.max_points:
                    k = int(slices[counts.argmax()])
                    raise ValueError(
                        f"prompts {list(self.click_keys)} hold {int(counts.max())} clicks on slice {k} but the network "
                        f"decodes at most max_points={self.max_points} clicks per slice."
                    )
            elif len(allc) > self.max_points:
                raise ValueError(
                    f"prompts {list(self.click_keys)} hold {len(allc)} clicks but the network decodes at most "
                    f"max_points={self.max_points}."
                )
        kind, boxes = parse_prompt(d.get(self.box_key), self.box_key)
        if kind == "points":
            raise ValueError(
                f"prompt '{self.box_key}' must be a box [i0, j0, k0, i1, j1, k1], got clicks {boxes.tolist()}."
            )
        if self.require_prompt and not clicks and kind != "boxes":
            raise ValueError(
                f"no prompt: pass clicks as '{self.click_keys[0]}' / '{self.click_keys[-1]}' ([[i, j, k], ...]) "
                f"or a box as '{self.box_key}' ([i0, j0, k0, i1, j1, k1]), "
                "or enable automatic mode ('automatic': true)."
            )
        for box in boxes if kind == "boxes" else ():
            lo, hi = box[:3], box[3:]
            if np.any(hi <= lo):
                raise ValueError(
                    f"prompt '{self.box_key}' box {box.astype(int).tolist()} has zero extent or inverted corners; "
                    "expected [i0, j0, k0, i1, j1, k1] with start < end on every axis (exclusive end)."
                )
            if np.any(lo < 0) or np.any(hi > shape):
                raise ValueError(
                    f"prompt '{self.box_key}' box {box.astype(int).tolist()} is outside the image of spatial shape "
                    f"{tuple(shape.tolist())}."
                )
        return d
