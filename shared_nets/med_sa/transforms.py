"""Med-SA prompt transforms: input checks, per-object evaluation items, the paper's prompt settings.

Paper section "Implementation Details": the interactive model is evaluated with a random
1 positive point ("1-point"), three positive points ("3-points") and boxes overlapping the
target by 50 % / 75 % ("BBox 0.5" / "BBox 0.75"). Simulation itself is
:class:`shared_nets.prompts.SimulateClicksd` / :class:`~shared_nets.prompts.SimulateBoxd`;
this module only maps the paper's setting names onto them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

from shared_nets.prompts import SimulateBoxd, SimulateClicksd, parse_prompt

__all__ = ["PROMPT_SETTINGS", "CheckPromptsd", "ObjectLabeld", "SimulatePromptSettingd", "object_datalist"]

#: the paper's evaluation prompts (per slice containing the object, as SAM is prompted per image).
PROMPT_SETTINGS: dict[str, dict[str, Any]] = {
    "1-point": {"kind": "clicks", "num_positive": 1},
    "3-points": {"kind": "clicks", "num_positive": 3},
    "bbox0.5": {"kind": "box", "iou": 0.5},
    "bbox0.75": {"kind": "box", "iou": 0.75},
}


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
                    f"prompt '{key}' has clicks {bad.tolist()} outside the image of spatial shape {tuple(shape.tolist())} "
                    "(expected integer voxel indices [i, j, k] with 0 <= index < size)."
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
            raise ValueError(f"prompt '{self.box_key}' must be a box [i0, j0, k0, i1, j1, k1], got clicks {boxes.tolist()}.")
        if self.require_prompt and not clicks and kind != "boxes":
            raise ValueError(
                f"no prompt: pass clicks as '{self.click_keys[0]}' / '{self.click_keys[-1]}' ([[i, j, k], ...]) or a box as "
                f"'{self.box_key}' ([i0, j0, k0, i1, j1, k1]), or enable automatic mode ('automatic': true)."
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


class ObjectLabeld(MapTransform):
    """Binary label of the object named by ``data[object_key]`` (one (volume, class) evaluation item).

    Args:
        label_key: key of the class-id label ``[1, H, W, D]``; replaced by ``label == id``.
        object_key: key of the class id (an int, e.g. added by :func:`object_datalist`).
    """

    def __init__(self, label_key: str = "label", object_key: str = "object_id") -> None:
        super().__init__([label_key])
        self.label_key, self.object_key = label_key, object_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.object_key not in d:
            raise ValueError(f"ObjectLabeld: '{self.object_key}' (the class id to segment) is not in the data; build items with object_datalist.")
        obj = int(d[self.object_key])
        label = d[self.label_key]
        if isinstance(label, torch.Tensor):
            vals = torch.round(label) if label.is_floating_point() else label
            d[self.label_key] = (vals == obj).to(label.dtype)
        else:
            lab = np.asarray(label)
            d[self.label_key] = (np.rint(lab) == obj).astype(lab.dtype)
        return d


class SimulatePromptSettingd(Randomizable, MapTransform):
    """Simulate one of the paper's evaluation prompts (:data:`PROMPT_SETTINGS`) from a binary label.

    Per axial slice containing the object: ``1-point`` / ``3-points`` draw uniformly random
    positive clicks (the paper: "a random 1 positive point"); ``bbox0.5`` / ``bbox0.75`` a box of
    the tight box's size shifted to IoU 0.5 / 0.75 with it. ``setting`` may be changed between
    evaluation runs (see :class:`~shared_nets.med_sa.interactive.PromptSettingsRunner`).

    Args:
        label_key: binary label ``[1, H, W, D]``.
        setting: a key of :data:`PROMPT_SETTINGS`.
        positive_key, negative_key, roi_key: output keys (MONAI Label names).
    """

    def __init__(
        self,
        label_key: str = "label",
        setting: str = "bbox0.75",
        positive_key: str = "foreground",
        negative_key: str = "background",
        roi_key: str = "roi",
    ) -> None:
        super().__init__([label_key])
        self.label_key, self.positive_key, self.negative_key, self.roi_key = label_key, positive_key, negative_key, roi_key
        self.setting = setting

    @property
    def setting(self) -> str:
        return self._setting

    @setting.setter
    def setting(self, value: str) -> None:
        if value not in PROMPT_SETTINGS:
            raise ValueError(f"prompt setting must be one of {list(PROMPT_SETTINGS)}, got {value!r}.")
        self._setting = value

    def randomize(self, data: Any = None) -> None:
        """Unused: the simulators draw from ``self.R``."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        cfg = PROMPT_SETTINGS[self.setting]
        keys = dict(positive_key=self.positive_key, negative_key=self.negative_key)
        if cfg["kind"] == "clicks":
            sim = SimulateClicksd(self.label_key, num_positive=cfg["num_positive"], mode="2d", sampling="uniform", **keys)
        else:
            sim = SimulateBoxd(self.label_key, mode="2d", iou=cfg["iou"], roi_key=self.roi_key)
        sim.set_random_state(state=self.R)
        d = sim(data)
        for key in (self.positive_key, self.negative_key, self.roi_key):
            d.setdefault(key, [])
        return d


def object_datalist(
    datalist: Sequence[Mapping[str, Any]],
    class_ids: Sequence[int],
    label_key: str = "label",
    object_key: str = "object_id",
    label_map: Mapping[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One evaluation item per (volume, class present in its label).

    Args:
        datalist: items with a label file path (or array) under ``label_key``.
        class_ids: classes to evaluate.
        label_key: key of the label.
        object_key: key that receives the class id.
        label_map: ``{file id: class id}`` applied to the label's ids before the presence test, as the
            pre-processing's ``MapLabelValued`` does (e.g. ``{13: 12}``: BTCV's adrenal glands merged).

    Returns:
        New items ``dict(item, object_id=c)`` for every class ``c`` of ``class_ids`` present.
    """
    from monai.transforms import LoadImage

    ids = [int(c) for c in class_ids]
    if not ids or any(c <= 0 for c in ids):
        raise ValueError(f"class_ids must be a non-empty list of positive class ids, got {class_ids!r}.")
    loader = LoadImage(image_only=True)
    out = []
    for item in datalist:
        if label_key not in item:
            raise ValueError(f"object_datalist: item {dict(item)!r} has no '{label_key}'.")
        lab = item[label_key]
        arr = np.asarray(loader(lab) if isinstance(lab, str) else lab)
        present = set(np.unique(np.rint(arr)).astype(int).tolist())
        if label_map:
            present = {int(label_map.get(c, c)) for c in present}
        out.extend(dict(item, **{object_key: c}) for c in ids if c in present)
    return out
