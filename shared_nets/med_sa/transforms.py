"""Med-SA prompt transforms: per-object evaluation labels and the paper's prompt settings.

Paper section "Implementation Details": the interactive model is evaluated with a random
1 positive point ("1-point"), three positive points ("3-points") and boxes overlapping the
target by 50 % / 75 % ("BBox 0.5" / "BBox 0.75"). Simulation itself is
:class:`shared_nets.prompts.SimulateClicksd` / :class:`~shared_nets.prompts.SimulateBoxd`;
this module only maps the paper's setting names onto them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

from shared_nets.prompts import SimulateBoxd, SimulateClicksd

__all__ = ["PROMPT_SETTINGS", "ObjectLabeld", "SimulatePromptSettingd"]

#: the paper's evaluation prompts (per slice containing the object, as SAM is prompted per image).
PROMPT_SETTINGS: dict[str, dict[str, Any]] = {
    "1-point": {"kind": "clicks", "num_positive": 1},
    "3-points": {"kind": "clicks", "num_positive": 3},
    "bbox0.5": {"kind": "box", "iou": 0.5},
    "bbox0.75": {"kind": "box", "iou": 0.75},
}


class ObjectLabeld(MapTransform):
    """Binary label of the object named by ``data[object_key]`` (one (volume, class) evaluation item).

    Args:
        label_key: key of the class-id label ``[1, H, W, D]``; replaced by ``label == id``.
        object_key: key of the class id (an int, e.g. added by :func:`shared_nets.med_sa.data.object_datalist`).
    """

    def __init__(self, label_key: str = "label", object_key: str = "object_id") -> None:
        super().__init__([label_key])
        self.label_key, self.object_key = label_key, object_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.object_key not in d:
            raise ValueError(
                f"ObjectLabeld: '{self.object_key}' (the class id to segment) is not in the data; "
                "build items with object_datalist."
            )
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
        self.label_key, self.positive_key, self.negative_key, self.roi_key = (
            label_key,
            positive_key,
            negative_key,
            roi_key,
        )
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
            sim = SimulateClicksd(
                self.label_key, num_positive=cfg["num_positive"], mode="2d", sampling="uniform", **keys
            )
        else:
            sim = SimulateBoxd(self.label_key, mode="2d", iou=cfg["iou"], roi_key=self.roi_key)
        sim.set_random_state(state=self.R)
        d = sim(data)
        for key in (self.positive_key, self.negative_key, self.roi_key):
            d.setdefault(key, [])
        return d
