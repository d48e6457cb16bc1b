"""``python -m tools demo_data``: write the synthetic phantom collection (:mod:`shared_nets.phantom`).

Command line (from the checkout)::

    python -m tools demo_data --out DIR [--num 12] [--seed 0] [--shape 96,96,48]
        [--spacing 1.5,1.5,3.0] [--orientation RAS|LPS] [--aorta True]

Layout written under ``DIR``: ``imagesTr/phantom_XXX.nii.gz`` (int16 HU),
``labelsTr/phantom_XXX.nii.gz`` (uint8 BTCV ids), ``tumoursTr/phantom_XXX.nii.gz`` (uint8,
1 = tumour) and ``datalist.json`` with ``training`` / ``validation`` / ``test`` lists of relative
paths, readable by ``monai.data.load_decathlon_datalist(path, data_list_key=..., base_dir=DIR)``.
The generator and its names below live in :mod:`shared_nets.phantom` (the tests and tools import them
from there); they are re-exported here for existing callers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from shared_nets.labels import BTCV_LABELS
from shared_nets.phantom import PHANTOM_LABELS, make_phantom, phantom_affine, split_counts, write_demo_dataset

__all__ = [
    "BTCV_LABELS",
    "PHANTOM_LABELS",
    "make_phantom",
    "phantom_affine",
    "split_counts",
    "write_demo_dataset",
    "main",
]


def main(
    out: str,
    num: int = 12,
    seed: int = 0,
    shape: str | Sequence[int] = "96,96,48",
    spacing: str | Sequence[float] = "1.5,1.5,3.0",
    orientation: str = "RAS",
    aorta: bool = True,
    progress: bool = True,
) -> str:
    """Write a synthetic phantom collection and its ``datalist.json``; print the datalist path.

    Args:
        out: output folder.
        num: number of cases (>= 3).
        seed: random seed (same seed, same arrays).
        shape: volume shape ``H,W,D`` (last axis axial).
        spacing: voxel size in mm ``sx,sy,sz``.
        orientation: ``RAS`` or ``LPS`` voxel order of the stored arrays.
        aorta: also draw the aorta (label 8).
        progress: show a progress bar.

    Returns:
        The path of the written ``datalist.json``.
    """
    try:
        return str(write_demo_dataset(out, num, seed, shape, spacing, orientation, aorta, progress))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
