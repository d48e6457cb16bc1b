"""Left atrium (2018 Atrial Segmentation Challenge), UA-MT's 80/20 split; H-SAM's 4-scan few-shot set (Table 2).

Two layouts are read, one folder per case named by its 20-character id:

* the challenge download: ``Training Set/<id>/lgemri.nrrd`` + ``laendo.nrrd`` (label 255 = left
  atrium), read with ITK through MONAI's ``LoadImage`` and written as NIfTI with label 1;
* UA-MT's converted copy: ``2018LA_Seg_Training Set/<id>/mri_norm2.h5`` (datasets ``image``,
  z-scored and cropped around the atrium, and ``label`` 0/1; needs ``h5py``). The h5 files keep
  no geometry: they are written with the challenge's 0.625 mm voxels and the nrrd files' axes
  (LPS, so the NIfTI affine is ``diag(-0.625, -0.625, 0.625)``) and origin 0.

H-SAM sec. 4.1 follows UA-MT/BCP: 80 training and 20 test scans, 4 (5 %) labelled scans for
few-shot training. The 20 test ids are UA-MT's ``data/test.list``; the training scans are the
other 80 in UA-MT's ``train.list`` order (sorted ids), whose first 4 are the labelled scans of
UA-MT/BCP's 5 % setting (their loaders take ``labeled_idxs = range(4)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .common import DatasetLayoutError, apply_lut, find_folder, materialise, relative_to, save_nifti, validation_split

__all__ = ["LA_LABELS", "LA_TEST_CASES", "LA_SPACING", "find_la_cases", "prepare_la"]

LA_LABELS: dict[int, str] = {0: "background", 1: "left atrium"}
LA_SPACING = 0.625

#: UA-MT's data/test.list (20 of the 100 challenge training scans).
LA_TEST_CASES: tuple[str, ...] = (
    "UPT6DX9IQY9JAZ7HJKA7",
    "UTBUJIWZMKP64E3N73YC",
    "ULHWPWKKLTE921LQLH1P",
    "V0MZOWJ6MU3RMRCV9EXR",
    "VDOF02M8ZHEAADFMS6NP",
    "VG4C826RAAKVMV9BQLVD",
    "VIXBEFTNVHZWKAKURJBN",
    "VQ2L3WM8KEVF6L44E6G9",
    "WBG9WYZ1B25WDT5WAT8T",
    "WMDG2EFA6L2SNDZXIRU0",
    "WNPKE0W404QE9AELX1LR",
    "WSJB9P4JCXUVHBOYFVWL",
    "WW8F5CO4S4K5IM5Z7EXX",
    "X18LU5AOBNNDMLTA0JZL",
    "XYDLYJ5CS19FDBVLJIPI",
    "Y7ZU0B2APPF54WG6PDMF",
    "YDKD1HVHSME6NVMA8I39",
    "Z9GMG63CJLL0VW893BB1",
    "ZIJLJAVQV3FJ6JSQOH1E",
    "ZQPMJ4XEC5A4BISD45P1",
)

_NRRD, _NRRD_LABEL, _H5 = "lgemri.nrrd", "laendo.nrrd", "mri_norm2.h5"
_LAYOUT = (
    "expected the 2018 Atrial Segmentation Challenge training set: "
    "'Training Set/<case id>/lgemri.nrrd' + 'laendo.nrrd', "
    "or UA-MT's '2018LA_Seg_Training Set/<case id>/mri_norm2.h5'"
)
# 255 (challenge nrrd) and 1 (UA-MT h5) both mean left atrium
_LA_LUT = np.zeros(256, dtype=np.uint8)
_LA_LUT[[1, 255]] = 1


def _has_cases(folder: Path) -> bool:
    return any(c.is_dir() and ((c / _NRRD).is_file() or (c / _H5).is_file()) for c in folder.iterdir())


def find_la_cases(src: Path, source: str = "auto") -> list[dict[str, Any]]:
    """LA cases below ``src``, one per case folder.

    Args:
        src: ``Training Set``, ``2018LA_Seg_Training Set``, or a folder holding either.
        source: ``"nrrd"``, ``"h5"``, or ``"auto"`` (nrrd where a case has it, else h5).

    Returns:
        ``[{"case": id, "image": abs, "label": abs or None, "format": "nrrd"|"h5"}, ...]`` sorted by id.

    Raises:
        DatasetLayoutError: no case folders, or a case without the files ``source`` needs.
    """
    if source not in ("auto", "nrrd", "h5"):
        raise ValueError(f"source must be 'auto', 'nrrd' or 'h5', got {source!r}.")
    folder = find_folder(src, ("", "Training Set", "2018LA_Seg_Training Set"), _has_cases)
    if folder is None:
        raise DatasetLayoutError(
            f"'{src}' does not look like the LA dataset (no case folders with {_NRRD} or {_H5}); {_LAYOUT}."
        )
    cases = []
    for case in sorted(c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")):
        nrrd, h5 = case / _NRRD, case / _H5
        if source in ("auto", "nrrd") and nrrd.is_file():
            label = case / _NRRD_LABEL
            if not label.is_file():
                raise DatasetLayoutError(f"LA case '{case}' has {_NRRD} but no {_NRRD_LABEL}; {_LAYOUT}.")
            cases.append({"case": case.name, "image": str(nrrd), "label": str(label), "format": "nrrd"})
        elif source in ("auto", "h5") and h5.is_file():
            cases.append({"case": case.name, "image": str(h5), "label": None, "format": "h5"})
        elif source != "auto":
            raise DatasetLayoutError(f"LA case '{case}' has no {_NRRD if source == 'nrrd' else _H5}; {_LAYOUT}.")
    if not cases:
        raise DatasetLayoutError(f"'{folder}' holds no LA case with {_NRRD if source == 'nrrd' else _H5}; {_LAYOUT}.")
    return cases


def _h5_to_nifti(item: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write a UA-MT h5 case as ``imagesTr/<id>.nii.gz`` + ``labelsTr/<id>.nii.gz``; returns its datalist entry."""
    from monai.utils import optional_import

    h5py, has_h5py = optional_import("h5py")
    if not has_h5py:
        raise DatasetLayoutError(
            f"'{item['image']}' is an h5 file; reading it needs h5py (pip install h5py), "
            "or use the challenge's nrrd files."
        )
    try:
        with h5py.File(item["image"], "r") as f:
            image, label = np.asarray(f["image"]), np.asarray(f["label"])
    except (OSError, KeyError) as e:
        raise DatasetLayoutError(
            f"'{item['image']}' is not a UA-MT h5 file with 'image' and 'label' ({e}); {_LAYOUT}."
        ) from None
    if image.shape != label.shape or image.ndim != 3:
        raise DatasetLayoutError(
            f"'{item['image']}' holds image {image.shape} and label {label.shape}; expected two equal 3D arrays."
        )
    affine = np.diag([-LA_SPACING, -LA_SPACING, LA_SPACING, 1.0])  # nrrd axes are LPS; NIfTI affines are RAS
    img_path = save_nifti(image.astype(np.float32), affine, out / "imagesTr" / f"{item['case']}.nii.gz")
    lab_path = save_nifti(
        apply_lut(label, _LA_LUT, item["image"]), affine, out / "labelsTr" / f"{item['case']}.nii.gz", dtype=np.uint8
    )
    return {"case": item["case"], "image": relative_to(img_path, out), "label": relative_to(lab_path, out)}


def prepare_la(
    src: Path,
    out: Path,
    *,
    seed: int = 0,
    num_labeled: int | None = None,
    num_val: int = 0,
    source: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """LA (left atrium) with UA-MT's 80/20 split, converted to NIfTI (H-SAM sec. 4.1, Table 2).

    Args:
        src: the LA training set (see module docstring).
        out: output folder: ``imagesTr/<id>.nii.gz``, ``labelsTr/<id>.nii.gz``, ``datalist.json``.
        seed: seed for ``num_val`` hold-outs (the split is UA-MT's published list).
        num_labeled: None = all 80 training scans in ``training``; ``n`` = only the first ``n``
            (UA-MT/BCP's labelled scans; H-SAM's few-shot setting is 4), the rest listed under
            ``unlabeled`` (H-SAM trains on the labelled scans only).
        num_val: 0 = validation list = the test scans (the paper's practice); ``n`` = ``n`` seeded
            training scans held out.
        source: ``"auto"``, ``"nrrd"`` or ``"h5"`` (see :func:`find_la_cases`).
        progress: show a progress bar.

    Returns:
        The datalist content.
    """
    cases = {c["case"]: c for c in find_la_cases(src, source)}
    missing = [c for c in LA_TEST_CASES if c not in cases]
    if missing:
        raise DatasetLayoutError(
            f"'{src}' lacks {len(missing)} of UA-MT's 20 LA test scans (e.g. {', '.join(missing[:3])}); {_LAYOUT}."
        )
    train = [cases[k] for k in sorted(cases) if k not in LA_TEST_CASES]
    test = [cases[k] for k in LA_TEST_CASES]
    unlabeled: list[dict[str, Any]] = []
    if num_labeled is not None:
        if isinstance(num_labeled, bool) or not isinstance(num_labeled, int) or not 1 <= num_labeled <= len(train):
            raise ValueError(
                f"num_labeled must be None or an integer in [1, {len(train)}] (H-SAM: 4), got {num_labeled!r}."
            )
        train, unlabeled = train[:num_labeled], train[num_labeled:]
    train, val, note = validation_split(train, test, num_val, seed)
    lists = {}
    for key, items in (("training", train), ("validation", val), ("test", test), ("unlabeled", unlabeled)):
        entries = []
        for item in tqdm(items, desc=f"la {key}", disable=not progress, unit="case"):
            if item["format"] == "h5":
                entries.append(_h5_to_nifti(item, out))
            else:
                plain = {k: v for k, v in item.items() if k != "format"}
                entries.extend(materialise([plain], out, label_lut=_LA_LUT, progress=False))
        lists[key] = entries
    return {
        "name": "LA",
        "description": "left atrium LGE-MRI (2018 Atrial Segmentation Challenge); UA-MT's 80 training / 20 test split"
        + (f", first {num_labeled} training scans labelled (UA-MT/BCP order)" if num_labeled else ""),
        "reference": "Xiong et al. 2021, A global benchmark of algorithms for segmenting the left atrium "
        "from LGE-MRI (2018 challenge)",
        "licence": "see the 2018 Atrial Segmentation Challenge data terms",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(k): v for k, v in LA_LABELS.items()},
        "numTraining": len(lists["training"]),
        "numTest": len(lists["test"]),
        "split": {
            "kind": "fixed",
            "validation": note,
            "num_labeled": num_labeled,
            "source": "UA-MT data/test.list (20 test scans); "
            "labelled scans = first of the sorted training ids (UA-MT/BCP)",
        },
        "label_ids": "la",
        **lists,
    }
