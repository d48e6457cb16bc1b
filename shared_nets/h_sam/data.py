"""H-SAM few-shot data: seeded few-shot datalists, an axial-slice selection transform, CMAttn noise variances.

The paper's few-shot settings (sec. 4.1) train on 10 % of the Synapse training *slices*, on 4 LA
scans (5 %) and on 3 of 40 PROMISE12 cases. :func:`write_few_shot_datalist` writes either kind
of subset as a decathlon datalist: a ``fraction`` of all axial slices (each kept case lists its
slices under ``"slices"``, RAS order, so :class:`SelectSlicesd` placed after
``Orientationd("RAS")`` keeps exactly those) or ``num_cases`` whole cases. Validation and test
lists are copied unchanged.

Command line (from the checkout)::

    python -m shared_nets.h_sam.data few_shot --datalist D.json --out D_10pct.json --fraction 0.1 --seed 0
    python -m shared_nets.h_sam.data few_shot --datalist D.json --out D_4cases.json --num_cases 4 --seed 0
    python -m shared_nets.h_sam.data noise_var --datalist D.json --num_classes 8 --label_map btcv_to_synapse
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection

from shared_nets.io import atomic_write_json
from monai.transforms import MapTransform

from .decoder import class_balanced_noise_var

__all__ = [
    "BTCV_TO_SYNAPSE",
    "SelectSlicesd",
    "axial_depth",
    "write_few_shot_datalist",
    "label_frequencies",
    "few_shot",
    "noise_var",
]

#: BTCV ids 0..13 → the 8-organ Synapse ids of TransUNet/SAMed/H-SAM (spleen 1, right kidney 2,
#: left kidney 3, gallbladder 4, liver 5, stomach 6, aorta 7, pancreas 8; other organs → 0).
BTCV_TO_SYNAPSE: list[int] = [0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0]


class SelectSlicesd(MapTransform):
    """Keep only the axial slices listed under ``slices_key`` (few-shot slice subsets).

    Place it after ``Orientationd(axcodes="RAS")``: the indices count along the last (axial)
    axis in RAS order, as :func:`write_few_shot_datalist` writes them. Items without the key
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
                    f"'{self.slices_key}' of this item lists slices {idx[:5]}{'...' if len(idx) > 5 else ''}; expected a "
                    f"non-empty list of indices in [0, {depth - 1}] along the axial axis of '{key}' (shape {tuple(d[key].shape)})."
                )
            d[key] = d[key][..., idx]
        return d


def axial_depth(path: str | os.PathLike) -> int:
    """Number of axial slices of a NIfTI volume (the axis that ``Orientationd("RAS")`` puts last)."""
    import nibabel as nib

    img = nib.load(os.fspath(path))
    codes = nib.aff2axcodes(img.affine)
    axis = next(i for i, c in enumerate(codes) if c in ("S", "I"))
    return int(img.shape[axis])



def write_few_shot_datalist(
    datalist: str | os.PathLike,
    out: str | os.PathLike,
    fraction: float | None = None,
    num_cases: int | None = None,
    seed: int = 0,
    key: str = "training",
    image_key: str = "image",
) -> dict[str, Any]:
    """Write a seeded few-shot subset of ``datalist``'s ``key`` list (H-SAM sec. 4.1).

    Exactly one of ``fraction`` (share of all axial slices of the listed cases, drawn uniformly
    without replacement) and ``num_cases`` (whole cases) must be given. Relative file paths stay
    relative to the original datalist's folder, so write ``out`` next to it (or paths are made
    absolute when ``out`` lives elsewhere).

    Returns:
        A summary ``{"cases": n, "slices": m, "total_slices": t}``.
    """
    src = os.fspath(datalist)
    if not os.path.isfile(src):
        raise ValueError(f"datalist '{src}' does not exist.")
    with open(src) as f:
        content = json.load(f)
    items = content.get(key) if isinstance(content, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f"datalist '{src}' has no non-empty '{key}' list.")
    if (fraction is None) == (num_cases is None):
        raise ValueError("give exactly one of fraction (share of slices, e.g. 0.1) and num_cases (e.g. 4).")
    rng = np.random.default_rng(seed)
    base = os.path.dirname(os.path.abspath(src))
    out = os.fspath(out)
    rebase = os.path.abspath(os.path.dirname(os.path.abspath(out))) != base

    def fix(item: dict) -> dict:
        if not rebase:
            return dict(item)
        return {k: os.path.join(base, v) if isinstance(v, str) and not os.path.isabs(v) and os.path.exists(os.path.join(base, v)) else v
                for k, v in item.items()}

    total = 0
    if num_cases is not None:
        if isinstance(num_cases, bool) or not isinstance(num_cases, int) or not 1 <= num_cases <= len(items):
            raise ValueError(f"num_cases must be an integer in [1, {len(items)}] (cases in '{key}'), got {num_cases!r}.")
        chosen = sorted(rng.choice(len(items), size=num_cases, replace=False).tolist())
        subset = [fix(items[i]) for i in chosen]
        n_slices = None
    else:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}.")
        depths = [axial_depth(os.path.join(base, it[image_key]) if not os.path.isabs(it[image_key]) else it[image_key]) for it in items]
        total = int(sum(depths))
        n_slices = max(1, int(round(fraction * total)))
        flat = np.sort(rng.choice(total, size=n_slices, replace=False))
        starts = np.cumsum([0, *depths])
        subset = []
        for i, it in enumerate(items):
            sel = flat[(flat >= starts[i]) & (flat < starts[i + 1])] - starts[i]
            if sel.size:
                subset.append({**fix(it), "slices": sel.astype(int).tolist()})
    new = dict(content)
    new[key] = subset
    for other in ("validation", "test"):
        if other in new and rebase:
            new[other] = [fix(it) for it in new[other]]
    new["few_shot"] = {"source": src, "seed": seed, "fraction": fraction, "num_cases": num_cases}
    atomic_write_json(new, out)
    return {"cases": len(subset), "slices": n_slices if n_slices is not None else None, "total_slices": total or None}


def label_frequencies(
    datalist: str | os.PathLike,
    num_classes: int,
    key: str = "training",
    label_key: str = "label",
    label_map: str | Sequence[int] | None = None,
) -> list[float]:
    """Share of voxels per class (background first) over the ``key`` list's labels (honours ``slices``).

    Args:
        datalist: decathlon datalist.
        num_classes: foreground classes after mapping.
        key: list to count.
        label_key: entry key of the label files.
        label_map: ``"btcv_to_synapse"``, a lookup list (``new = map[old]``), or None.
    """
    import nibabel as nib

    src = os.fspath(datalist)
    with open(src) as f:
        items = json.load(f)[key]
    lut = np.asarray(BTCV_TO_SYNAPSE if label_map == "btcv_to_synapse" else label_map) if label_map is not None else None
    counts = np.zeros(num_classes + 1, dtype=np.float64)
    base = os.path.dirname(os.path.abspath(src))
    for it in items:
        path = it[label_key] if os.path.isabs(it[label_key]) else os.path.join(base, it[label_key])
        img = nib.as_closest_canonical(nib.load(path))  # RAS, so "slices" indices apply
        lab = np.asarray(img.dataobj).astype(np.int64)
        if "slices" in it:
            lab = lab[..., it["slices"]]
        if lut is not None:
            lab = lut[lab]
        if lab.min() < 0 or lab.max() > num_classes:
            raise ValueError(f"label '{path}' has values outside [0, {num_classes}] (after label_map); map them first.")
        counts += np.bincount(lab.ravel(), minlength=num_classes + 1)[: num_classes + 1]
    return (counts / counts.sum()).tolist()


def few_shot(datalist: str, out: str, fraction: float | None = None, num_cases: int | None = None, seed: int = 0, key: str = "training") -> str:
    """CLI: write a few-shot datalist (``--fraction 0.1`` of slices or ``--num_cases 4``); prints a summary."""
    summary = write_few_shot_datalist(datalist, out, fraction=fraction, num_cases=num_cases, seed=seed, key=key)
    return json.dumps({"out": out, **summary})


def noise_var(datalist: str, num_classes: int = 8, max_var: float = 0.1, label_map: str | None = "btcv_to_synapse", key: str = "training") -> str:
    """CLI: print the ``cmattn_noise_var`` list (∝ 1 / class frequency) for a training datalist."""
    return json.dumps(class_balanced_noise_var(label_frequencies(datalist, num_classes, key, label_map=label_map), max_var))


if __name__ == "__main__":  # pragma: no cover - thin CLI
    import fire

    try:
        fire.Fire({"few_shot": few_shot, "noise_var": noise_var})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
