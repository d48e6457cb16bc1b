"""H-SAM transforms: keep the axial slices a few-shot datalist lists for each case."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["SelectSlicesd"]


class SelectSlicesd(MapTransform):
    """Keep only the axial slices listed under ``slices_key`` (few-shot slice subsets).

    Place it after ``Orientationd(axcodes="RAS")``: the indices count along the last (axial)
    axis in RAS order, as :func:`tools.recipes.few_shot.write_few_shot_datalist` writes them. Items without the key
    pass through unchanged. The key is removed afterwards (lists of different lengths do not
    collate into a batch).

    Args:
        keys: image/label keys to slice (``[C, H, W, D]`` arrays).
        slices_key: the data-dictionary key holding the list of slice indices.
    """

    def __init__(self, keys: KeysCollection, slices_key: str = "slices", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slices_key = slices_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        idx = d.pop(self.slices_key, None)
        if idx is None:
            return d
        idx = [int(i) for i in (idx.tolist() if isinstance(idx, (torch.Tensor, np.ndarray)) else idx)]
        for key in self.key_iterator(d):
            depth = d[key].shape[-1]
            if not idx or min(idx) < 0 or max(idx) >= depth:
                raise ValueError(
                    f"'{self.slices_key}' of this item lists slices {idx[:5]}{'...' if len(idx) > 5 else ''}; "
                    f"expected a non-empty list of indices in [0, {depth - 1}] along the axial axis of '{key}' "
                    f"(shape {tuple(d[key].shape)})."
                )
            d[key] = d[key][..., idx]
        return d
