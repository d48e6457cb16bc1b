"""Few-shot subsets of a datalist (H-SAM sec. 4.1) and H-SAM's class-balanced CMAttn noise variances.

The paper's few-shot settings train on 10 % of the Synapse training *slices*, on 4 LA scans (5 %)
and on 3 of 40 PROMISE12 cases. :func:`write_few_shot_datalist` writes either kind of subset as a
decathlon datalist: a ``fraction`` of all axial slices (each kept case lists its slices under
``"slices"``, RAS order, so :class:`shared_nets.h_sam.transforms.SelectSlicesd` placed after
``Orientationd("RAS")`` keeps exactly those) or ``num_cases`` whole cases. Validation and test
lists are copied unchanged.

Command line (from the checkout)::

    python -m tools few_shot --datalist D.json --out D_10pct.json --fraction 0.1 --seed 0
    python -m tools few_shot --datalist D.json --out D_4cases.json --num_cases 4 --seed 0
    python -m tools noise_var --datalist D.json --num_classes 8 --label_map btcv_to_synapse
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared_nets.h_sam.decoder import class_balanced_noise_var
from shared_nets.io import atomic_write_json
from shared_nets.labels import BTCV_TO_SYNAPSE

__all__ = ["axial_depth", "write_few_shot_datalist", "label_frequencies", "few_shot", "noise_var"]


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
        return {
            k: os.path.join(base, v)
            if isinstance(v, str) and not os.path.isabs(v) and os.path.exists(os.path.join(base, v))
            else v
            for k, v in item.items()
        }

    total = 0
    if num_cases is not None:
        if isinstance(num_cases, bool) or not isinstance(num_cases, int) or not 1 <= num_cases <= len(items):
            raise ValueError(
                f"num_cases must be an integer in [1, {len(items)}] (cases in '{key}'), got {num_cases!r}."
            )
        chosen = sorted(rng.choice(len(items), size=num_cases, replace=False).tolist())
        subset = [fix(items[i]) for i in chosen]
        n_slices = None
    else:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}.")
        depths = [
            axial_depth(os.path.join(base, it[image_key]) if not os.path.isabs(it[image_key]) else it[image_key])
            for it in items
        ]
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
    lut = None
    if label_map is not None:
        lut = np.asarray(BTCV_TO_SYNAPSE if label_map == "btcv_to_synapse" else label_map)
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


def few_shot(
    datalist: str,
    out: str,
    fraction: float | None = None,
    num_cases: int | None = None,
    seed: int = 0,
    key: str = "training",
) -> str:
    """``python -m tools few_shot``: write a few-shot datalist (``--fraction 0.1`` of slices or ``--num_cases 4``).

    Args:
        datalist: the full decathlon datalist.
        out: the few-shot datalist to write (next to ``datalist`` keeps relative paths relative).
        fraction: share of all axial slices of ``key``'s cases.
        num_cases: number of whole cases instead.
        seed: draw seed.
        key: the list to subsample.

    Returns:
        A one-line JSON summary. Bad arguments print one ``error:`` line and exit with status 1.
    """
    try:
        summary = write_few_shot_datalist(datalist, out, fraction=fraction, num_cases=num_cases, seed=seed, key=key)
    except ValueError as e:
        _exit(e)
    return json.dumps({"out": out, **summary})


def noise_var(
    datalist: str,
    num_classes: int = 8,
    max_var: float = 0.1,
    label_map: str | None = "btcv_to_synapse",
    key: str = "training",
) -> str:
    """``python -m tools noise_var``: the ``cmattn_noise_var`` list (∝ 1 / class frequency) of a training datalist.

    Args:
        datalist: decathlon datalist (``slices`` lists of a few-shot datalist are honoured).
        num_classes: foreground classes after ``label_map``.
        max_var: variance of the rarest class.
        label_map: ``"btcv_to_synapse"``, a lookup list, or None.
        key: the list to count.

    Returns:
        The variances as JSON. Bad arguments print one ``error:`` line and exit with status 1.
    """
    try:
        frequencies = label_frequencies(datalist, num_classes, key, label_map=label_map)
        return json.dumps(class_balanced_noise_var(frequencies, max_var))
    except ValueError as e:
        _exit(e)


def _exit(error: ValueError) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
