"""The 3DSAM-adapter tumour datasets (MSD Task07 pancreas, MSD Task10 colon, KiTS21, LiTS17), seeded 70/10/20.

Case discovery and the split are ``shared_nets.sam3d_adapter.data.find_cases`` /
``random_split`` (the poster: "randomly split into 70%, 10%, and 20%"), so a datalist written here
has exactly the cases of ``sam3d_adapter_data.write_datalist`` for the same seed; this recipe adds
the decathlon fields and paths relative to ``--out``. Labels stay as distributed (every file is
NIfTI, nothing is converted): the bundle picks the tumour id (``target_class``) in its config.
MA-SAM's pancreas-tumour task (Table 4) follows 3DSAM-adapter's split; its exact case list is
published only as a pickle in the MA-SAM repository, so this seeded split is ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import DatasetLayoutError, find_folder, materialise, strip_suffix

__all__ = ["TUMOUR_INFO", "prepare_tumour", "prepare_msd_pancreas", "prepare_msd_colon", "prepare_kits21", "prepare_lits17"]

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
        "layout": "expected MSD Task10_Colon as downloaded: dataset.json, imagesTr/colon_001.nii.gz ..., labelsTr/colon_001.nii.gz ...",
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
        seed: split seed (same seed, same cases as ``sam3d_adapter_data.write_datalist``).
        progress: show a progress bar.

    Returns:
        The datalist content, with the official-code intensity statistics of the dataset
        (``target_class``, ``intensity_range``, ``mean``, ``std``) as extra keys.
    """
    from shared_nets.sam3d_adapter.data import TUMOUR_DATASETS, find_cases, random_split

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
        "split": {"kind": "seeded", "seed": seed, "fractions": [0.7, 0.1, 0.2],
                  "source": "3DSAM-adapter poster, Experiments (random 70/10/20); shared_nets.sam3d_adapter.data.random_split"},
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
