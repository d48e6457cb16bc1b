"""3DSAM-adapter data recipes: the four tumour datasets, their intensity statistics and config checks.

Poster "Experiments": KiTS21 (kidney tumour), MSD Task07 pancreas tumour, LiTS17 (liver
tumour), MSD Task10 colon cancer, "randomly split into 70%, 10%, and 20% for training,
validation, and testing". The per-dataset intensity windows and z-score statistics are those
the official code uses (read for facts). The official split file is not published; the seeded
70/10/20 split is ``python -m tools prepare <dataset>`` (``tools/recipes/tumour.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TUMOUR_DATASETS", "RECIPES", "check_target_class", "check_isotropic"]

#: target label id, HU clip window and z-score statistics (official code) per dataset.
TUMOUR_DATASETS: dict[str, dict[str, Any]] = {
    "kits21": {"target_class": 2, "intensity_range": [-54, 247], "mean": 59.53867, "std": 55.457336},
    "msd_pancreas": {"target_class": 2, "intensity_range": [-39, 204], "mean": 68.45214, "std": 63.422806},
    "lits17": {"target_class": 2, "intensity_range": [-48, 163], "mean": 60.057533, "std": 40.198017},
    "msd_colon": {"target_class": 1, "intensity_range": [-57, 175], "mean": 65.175035, "std": 32.651197},
}

#: every ``tumour_dataset`` a bundle config accepts: the four real datasets plus ``phantom``, the demo's
#: binary tumour files (``tools demo_data``: tumour id 1; intensities as KiTS21).
RECIPES: dict[str, dict[str, Any]] = {**TUMOUR_DATASETS, "phantom": {**TUMOUR_DATASETS["kits21"], "target_class": 1}}


def check_target_class(tumour_dataset: str, target_class: int) -> int:
    """Stop when ``target_class`` contradicts ``tumour_dataset`` (the configs derive one from the other).

    Args:
        tumour_dataset: a key of :data:`RECIPES`.
        target_class: the label id the bundle segments.

    Returns:
        ``target_class``.
    """
    if tumour_dataset not in RECIPES:
        raise ValueError(f"tumour_dataset: expected one of {sorted(RECIPES)}, got {tumour_dataset!r}.")
    expected = RECIPES[tumour_dataset]["target_class"]
    if int(target_class) != expected:
        raise ValueError(
            f"target_class {target_class} contradicts tumour_dataset {tumour_dataset!r} (its tumour id is {expected}); "
            "set tumour_dataset and let target_class follow it."
        )
    return int(target_class)


def check_isotropic(spacing: Sequence[float]) -> float:
    """The voxel size of an isotropic resampling grid, or ValueError (NSD tolerances convert mm -> voxels with it).

    Args:
        spacing: the bundle's ``spacing`` ``[sx, sy, sz]`` in mm.

    Returns:
        ``sx``.
    """
    vals = [float(v) for v in spacing] if isinstance(spacing, Sequence) and not isinstance(spacing, str) else []
    if len(vals) != 3 or min(vals) <= 0 or max(vals) - min(vals) > 1e-6 * max(vals):
        raise ValueError(
            f"spacing must be three equal positive numbers (an isotropic grid; the NSD tolerance is converted "
            f"from mm to voxels with it), got {spacing!r}."
        )
    return vals[0]
