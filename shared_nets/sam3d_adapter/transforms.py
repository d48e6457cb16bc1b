"""3DSAM-adapter transforms: reject an inference request without a positive click."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import MapTransform

from shared_nets.prompts import parse_prompt

__all__ = ["RequirePositiveClicksd"]


class RequirePositiveClicksd(MapTransform):
    """Reject a sample without a positive click (3DSAM-adapter segments from at least one).

    Use in inference pre-processing right after loading, on the MONAI Label prompt keys, so a
    request with only background clicks (or none) fails with a one-line error instead of
    returning an empty mask.

    Args:
        positive_key: key of the positive clicks ``[[i, j, k], ...]`` (MONAI Label ``foreground``).
    """

    def __init__(self, positive_key: str = "foreground") -> None:
        super().__init__([positive_key], allow_missing_keys=True)
        self.positive_key = positive_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        kind, _ = parse_prompt(d.get(self.positive_key), self.positive_key)
        if kind != "points":
            raise ValueError(
                f"prompt '{self.positive_key}' holds no positive click: 3DSAM-adapter needs at least one "
                "[i, j, k] voxel on the object (e.g. {'" + self.positive_key + "': [[120, 96, 40]]})."
            )
        return d
