"""The 3DSAM-adapter tumour datasets (MSD Task07 pancreas, MSD Task10 colon, KiTS21, LiTS17), seeded 70/10/20.

Case discovery and the split are :func:`find_cases` / :func:`random_split` (the poster: "randomly
split into 70%, 10%, and 20%"), so a datalist written here has exactly the cases of
:func:`write_datalist` (absolute paths, the bare split) for the same seed; :func:`prepare_tumour`
adds the decathlon fields and paths relative to ``--out``. Labels stay as distributed (every file is
NIfTI, nothing is converted): the bundle picks the tumour id (``target_class``) in its config.
MA-SAM's pancreas-tumour task (Table 4) follows 3DSAM-adapter's split; its exact case list is
published only as a pickle in the MA-SAM repository, so this seeded split is ours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared_nets.io import atomic_write_json

from .common import DatasetLayoutError, find_folder, materialise, strip_suffix

__all__ = [
    "TUMOUR_INFO",
    "find_cases",
    "random_split",
    "write_datalist",
    "prepare_tumour",
    "prepare_msd_pancreas",
    "prepare_msd_colon",
    "prepare_kits21",
    "prepare_lits17",
]

#: per dataset: display name, label names as distributed, modality, reference, layout hint, where to look.
TUMOUR_INFO: dict[str, dict[str, Any]] = {
    "msd_pancreas": {
        "name": "MSD Task07 Pancreas",
        "labels": {0: "background", 1: "pancreas", 2: "tumour"},
        "reference": "Antonelli et al. 2022, The Medical Segmentation Decathlon (Task07_Pancreas)",
        "layout": "expected MSD Task07_Pancreas as downloaded: dataset.json, imagesTr/pancreas_001.nii.gz ..., "
        "labelsTr/pancreas_001.nii.gz ...",
        "folders": ("", "Task07_Pancreas"),
        "keyword": "pancreas",
    },
    "msd_colon": {
        "name": "MSD Task10 Colon",
        "labels": {0: "background", 1: "colon cancer"},
        "reference": "Antonelli et al. 2022, The Medical Segmentation Decathlon (Task10_Colon)",
        "layout": "expected MSD Task10_Colon as downloaded: dataset.json, imagesTr/colon_001.nii.gz ..., "
        "labelsTr/colon_001.nii.gz ...",
        "folders": ("", "Task10_Colon"),
        "keyword": "colon",
    },
    "kits21": {
        "name": "KiTS21",
        "labels": {0: "background", 1: "kidney", 2: "tumour", 3: "cyst"},
        "reference": "Heller et al. 2023, The KiTS21 Challenge (github.com/neheller/kits21)",
        "layout": "expected the kits21 repository with downloaded images: "
        "kits21/data/case_00000/imaging.nii.gz + aggregated_MAJ_seg.nii.gz ...",
        "folders": ("", "data", "kits21/data"),
        "keyword": None,
    },
    "lits17": {
        "name": "LiTS17",
        "labels": {0: "background", 1: "liver", 2: "tumour"},
        "reference": "Bilic et al. 2023, The Liver Tumor Segmentation Benchmark (LiTS)",
        "layout": "expected the LiTS training batches: volume-0.nii + segmentation-0.nii ... "
        "(in any sub-folders, e.g. 'Training Batch 1/')",
        "folders": ("",),
        "keyword": None,
    },
}


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
        dataset: one of :data:`shared_nets.sam3d_adapter.data.TUMOUR_DATASETS`.
        root: the extracted dataset folder.

    Returns:
        ``[{"image": path, "label": path}, ...]`` with absolute paths.

    Raises:
        ValueError: unknown dataset, missing folder, no cases found, or an image without label.
    """
    from shared_nets.sam3d_adapter.data import TUMOUR_DATASETS

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
                raise ValueError(
                    f"KiTS21 case '{case}' has imaging.nii.gz but no aggregated_MAJ_seg.nii.gz / segmentation.nii.gz."
                )
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


def write_datalist(dataset: str, root: str | os.PathLike, out: str | os.PathLike | None = None, seed: int = 0) -> str:
    """Write the seeded 70/10/20 datalist of a tumour dataset (MONAI decathlon format, absolute paths).

    Args:
        dataset: one of :data:`shared_nets.sam3d_adapter.data.TUMOUR_DATASETS`.
        root: the extracted dataset folder.
        out: JSON path; default ``root/datalist.json`` (what the bundle's configs read).
        seed: split seed.

    Returns:
        The path written (atomically: temporary file, then rename).
    """
    from shared_nets.sam3d_adapter.data import TUMOUR_DATASETS

    split = random_split(find_cases(dataset, root), seed=seed)
    out = Path(out) if out is not None else Path(root) / "datalist.json"
    payload = {"name": dataset, "split_seed": seed, **TUMOUR_DATASETS[dataset], **split}
    atomic_write_json(payload, out)
    return str(out)


def _looks_right(dataset: str, folder: Path) -> bool:
    if dataset == "kits21":
        return any(c.is_dir() and c.name.startswith("case_") for c in folder.iterdir())
    if dataset == "lits17":
        return True  # find_cases searches every sub-folder for volume-N.nii
    return (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir()


def _root(dataset: str, src: Path) -> Path:
    info = TUMOUR_INFO[dataset]
    root = find_folder(src, info["folders"], lambda p: _looks_right(dataset, p))
    if root is None:
        raise DatasetLayoutError(f"'{src}' does not look like {info['name']}; {info['layout']}.")
    return root


def _msd_meta(dataset: str, root: Path) -> dict[str, Any]:
    """Labels/modality from MSD's dataset.json, checking it is the right task."""
    info = TUMOUR_INFO[dataset]
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetLayoutError(f"'{path}' is not readable JSON ({e}); {info['layout']}.") from None
    name = str(meta.get("name", "")) + " " + str(meta.get("description", ""))
    if info["keyword"] and info["keyword"] not in name.lower():
        raise DatasetLayoutError(f"'{path}' describes {meta.get('name')!r}, not {info['name']}; {info['layout']}.")
    return {k: meta[k] for k in ("modality", "labels", "licence", "reference", "release") if k in meta}


def _case_name(dataset: str, image: str) -> str:
    p = Path(image)
    return p.parent.name if dataset == "kits21" else strip_suffix(p.name)


def prepare_tumour(dataset: str, src: Path, out: Path, *, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """A 3DSAM-adapter tumour dataset with the poster's seeded 70/10/20 split.

    Args:
        dataset: ``msd_pancreas``, ``msd_colon``, ``kits21`` or ``lits17``.
        src: the dataset as downloaded (see :data:`TUMOUR_INFO` for the layouts).
        out: output folder (only ``datalist.json`` is written; volumes are referenced in ``src``).
        seed: split seed (same seed, same cases as :func:`write_datalist`).
        progress: show a progress bar.

    Returns:
        The datalist content, with the official-code intensity statistics of the dataset
        (``target_class``, ``intensity_range``, ``mean``, ``std``) as extra keys.
    """
    from shared_nets.sam3d_adapter.data import TUMOUR_DATASETS

    info = TUMOUR_INFO[dataset]
    root = _root(dataset, src)
    meta = _msd_meta(dataset, root) if dataset.startswith("msd_") else {}
    try:
        found = find_cases(dataset, root)
    except ValueError as e:
        raise DatasetLayoutError(f"{e} {info['layout']}.") from None
    split = random_split(found, fractions=(0.7, 0.1, 0.2), seed=seed)
    lists = {}
    for key, items in split.items():
        items = [{**i, "case": _case_name(dataset, i["image"])} for i in items]
        lists[key] = materialise(items, out, progress=progress, desc=f"{dataset} {key}")
    labels = {str(k): v for k, v in info["labels"].items()}
    return {
        "name": info["name"],
        "description": f"{info['name']} tumour segmentation; 3DSAM-adapter's random 70/10/20 split (seed {seed})",
        "reference": meta.get("reference", info["reference"]),
        "licence": meta.get("licence", "see the dataset's own terms"),
        "tensorImageSize": "3D",
        "modality": meta.get("modality", {"0": "CT"}),
        "labels": labels,
        "numTraining": len(lists["training"]),
        "numTest": len(lists["test"]),
        "split": {
            "kind": "seeded",
            "seed": seed,
            "fractions": [0.7, 0.1, 0.2],
            "source": "3DSAM-adapter poster, Experiments (random 70/10/20); tools.recipes.tumour.random_split",
        },
        "label_ids": dataset,
        **TUMOUR_DATASETS[dataset],
        **lists,
    }


def prepare_msd_pancreas(src: Path, out: Path, *, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """MSD Task07 pancreas tumour (3DSAM-adapter; MA-SAM Table 4). See :func:`prepare_tumour`."""
    return prepare_tumour("msd_pancreas", src, out, seed=seed, progress=progress)


def prepare_msd_colon(src: Path, out: Path, *, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """MSD Task10 colon cancer (3DSAM-adapter). See :func:`prepare_tumour`."""
    return prepare_tumour("msd_colon", src, out, seed=seed, progress=progress)


def prepare_kits21(src: Path, out: Path, *, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """KiTS21 kidney tumour (3DSAM-adapter). See :func:`prepare_tumour`."""
    return prepare_tumour("kits21", src, out, seed=seed, progress=progress)


def prepare_lits17(src: Path, out: Path, *, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """LiTS17 liver tumour (3DSAM-adapter). See :func:`prepare_tumour`."""
    return prepare_tumour("lits17", src, out, seed=seed, progress=progress)
