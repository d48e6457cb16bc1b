"""3DSAM-adapter data recipes: the four tumour datasets, their seeded 70/10/20 split, a prompt check.

Poster "Experiments": KiTS21 (kidney tumour), MSD Task07 pancreas tumour, LiTS17 (liver
tumour), MSD Task10 colon cancer, "randomly split into 70%, 10%, and 20% for training,
validation, and testing". The per-dataset intensity windows and z-score statistics are those
the official code uses (read for facts); the official split file is not published, so the
split here is our own, seeded and reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import MapTransform

from shared_nets.prompts import parse_prompt
from shared_nets.io import atomic_write_json

__all__ = [
    "TUMOUR_DATASETS",
    "RECIPES",
    "check_target_class",
    "RequirePositiveClicksd",
    "check_isotropic",
    "find_cases",
    "random_split",
    "write_datalist",
]

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


_NIFTI = (".nii.gz", ".nii")


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.endswith(_NIFTI) and not p.name.startswith(".")


def _stem(p: Path) -> str:
    for ext in _NIFTI:
        if p.name.endswith(ext):
            return p.name[: -len(ext)]
    return p.name


def _case_number(path: str) -> int:
    digits = "".join(ch for ch in _stem(Path(path)) if ch.isdigit())
    return int(digits) if digits else -1


def find_cases(dataset: str, root: str | os.PathLike) -> list[dict[str, str]]:
    """Image/label pairs of a tumour dataset as distributed, sorted by case name.

    Layouts:
        ``kits21``: ``root/case_XXXXX/imaging.nii.gz`` + ``aggregated_MAJ_seg.nii.gz`` (or
        ``segmentation.nii.gz``), labels 1 kidney, 2 tumour, 3 cyst.
        ``msd_pancreas`` / ``msd_colon``: ``root/imagesTr/*.nii.gz`` + ``root/labelsTr/`` (same names).
        ``lits17``: ``volume-N.nii`` + ``segmentation-N.nii`` anywhere below ``root``.

    Args:
        dataset: one of :data:`TUMOUR_DATASETS`.
        root: the extracted dataset folder.

    Returns:
        ``[{"image": path, "label": path}, ...]`` with absolute paths.

    Raises:
        ValueError: unknown dataset, missing folder, no cases found, or an image without label.
    """
    if dataset not in TUMOUR_DATASETS:
        raise ValueError(f"dataset must be one of {sorted(TUMOUR_DATASETS)}, got {dataset!r}.")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder '{root}' does not exist.")
    cases: list[dict[str, str]] = []
    if dataset == "kits21":
        for case in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("case_")):
            img = case / "imaging.nii.gz"
            labels = [case / n for n in ("aggregated_MAJ_seg.nii.gz", "segmentation.nii.gz") if (case / n).is_file()]
            if not img.is_file():
                continue
            if not labels:
                raise ValueError(f"KiTS21 case '{case}' has imaging.nii.gz but no aggregated_MAJ_seg.nii.gz / segmentation.nii.gz.")
            cases.append({"image": str(img.resolve()), "label": str(labels[0].resolve())})
    elif dataset in ("msd_pancreas", "msd_colon"):
        images, labels = root / "imagesTr", root / "labelsTr"
        if not images.is_dir() or not labels.is_dir():
            raise ValueError(f"MSD folder '{root}' must contain imagesTr/ and labelsTr/.")
        for img in sorted(p for p in images.iterdir() if _is_nifti(p)):
            lab = labels / img.name
            if not lab.is_file():
                raise ValueError(f"MSD image '{img}' has no label '{lab}'.")
            cases.append({"image": str(img.resolve()), "label": str(lab.resolve())})
    else:  # lits17
        for img in sorted(p for p in root.rglob("volume-*") if _is_nifti(p)):
            n = _stem(img)[len("volume-") :]
            found = [p for p in img.parent.parent.rglob(f"segmentation-{n}.nii*") if _is_nifti(p)]
            if not found:
                raise ValueError(f"LiTS volume '{img}' has no segmentation-{n}.nii(.gz) next to it.")
            cases.append({"image": str(img.resolve()), "label": str(found[0].resolve())})
        cases.sort(key=lambda c: _case_number(c["image"]))
    if not cases:
        raise ValueError(f"no {dataset} cases found under '{root}' (see find_cases for the expected layout).")
    return cases


def random_split(
    items: Sequence[Mapping[str, Any]], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Seeded random training / validation / test split (poster: 70 % / 10 % / 20 %).

    Args:
        items: the cases (their order does not matter: they are sorted by image path first).
        fractions: training, validation, test fractions summing to 1; validation and test get
            ``round(fraction * n)`` cases (at least 1 each when there are at least 3 cases),
            training the rest.
        seed: permutation seed.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {list(fractions)!r}.")
    ordered = sorted((dict(i) for i in items), key=lambda i: str(i.get("image")))
    n = len(ordered)
    n_val, n_test = (int(round(f * n)) for f in fractions[1:])
    if n >= 3:
        n_val, n_test = max(n_val, 1 if fractions[1] > 0 else 0), max(n_test, 1 if fractions[2] > 0 else 0)
    perm = np.random.default_rng(seed).permutation(n)
    picked = [ordered[i] for i in perm]
    return {
        "training": picked[: n - n_val - n_test],
        "validation": picked[n - n_val - n_test : n - n_test],
        "test": picked[n - n_test :],
    }


def write_datalist(
    dataset: str, root: str | os.PathLike, out: str | os.PathLike | None = None, seed: int = 0
) -> str:
    """Write the seeded 70/10/20 datalist of a tumour dataset (MONAI decathlon format, absolute paths).

    Args:
        dataset: one of :data:`TUMOUR_DATASETS`.
        root: the extracted dataset folder.
        out: JSON path; default ``root/datalist.json`` (what the bundle's configs read).
        seed: split seed.

    Returns:
        The path written (atomically: temporary file, then rename).
    """
    split = random_split(find_cases(dataset, root), seed=seed)
    out = Path(out) if out is not None else Path(root) / "datalist.json"
    payload = {"name": dataset, "split_seed": seed, **TUMOUR_DATASETS[dataset], **split}
    atomic_write_json(payload, out)
    return str(out)


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
