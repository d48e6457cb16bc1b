"""BTCV (13 organs, MA-SAM's 24/6 split) and Synapse (8 organs, TransUNet's 18/12 split) from the BTCV download;
AMOS 22 in BTCV ids (MA-SAM's generalisation study, Fig. 6).

Both read the "Multi-Atlas Labeling Beyond the Cranial Vault" abdomen training set as published
on Synapse (syn3193805, ``RawData.zip``): ``RawData/Training/img/img0001.nii.gz`` and
``RawData/Training/label/label0001.nii.gz``, 30 cases numbered 0001-0010 and 0021-0040, labels
0-13 (:data:`BTCV_ORGANS`). The MONAI tutorial layout (``imagesTr/img0001.nii.gz`` +
``labelsTr/label0001.nii.gz``) is accepted too.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from shared_nets.labels import ADRENAL_MERGE, BTCV_LABELS, BTCV_TO_SYNAPSE

from .common import (
    DatasetLayoutError,
    find_folder,
    hold_out,
    is_nifti,
    lut_from_mapping,
    materialise,
    strip_suffix,
    validation_split,
)

__all__ = [
    "BTCV_ORGANS",
    "BTCV_TRAIN_CASES",
    "BTCV_TEST_CASES",
    "SYNAPSE_TEST_CASES",
    "SYNAPSE_TRAIN_CASES",
    "ADRENAL_MERGE",
    "find_btcv_cases",
    "synapse_labels",
    "prepare_btcv",
    "prepare_synapse",
    "AMOS_TO_BTCV",
    "find_amos_cases",
    "prepare_amos22",
]

#: BTCV label ids as distributed; names as in the bundles' ``channel_def`` (MA-SAM, S-SAM).
BTCV_ORGANS: dict[int, str] = BTCV_LABELS

# MA-SAM sec. 4.1: "the same data split as (Tang et al., 2022a), 24 cases for training and 6 for
# testing". The split is SwinUNETR/UNETR's BTCV datalist (MONAI's dataset_0.json: training
# img0001-0010 + img0021-0034, validation img0035-0040); MA-SAM's repository lists the same six
# test cases (preprocessing/dataset_split.md).
BTCV_TRAIN_CASES: tuple[int, ...] = (*range(1, 11), *range(21, 35))
BTCV_TEST_CASES: tuple[int, ...] = tuple(range(35, 41))

# H-SAM sec. 4.1 / SAMed / TransUNet: 18 training and 12 test cases of the same 30 volumes;
# the test ids are TransUNet's lists_Synapse/test_vol.txt (SAMed's preprocessing uses the same).
SYNAPSE_TEST_CASES: tuple[int, ...] = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)
SYNAPSE_TRAIN_CASES: tuple[int, ...] = tuple(i for i in (*range(1, 11), *range(21, 41)) if i not in SYNAPSE_TEST_CASES)

_LAYOUT = (
    "expected the BTCV abdomen training set as published on Synapse (syn3193805, RawData.zip): "
    "RawData/Training/img/img0001.nii.gz ... and RawData/Training/label/label0001.nii.gz ... "
    "(--src may point at the folder holding RawData, at RawData, or at Training)"
)


def _pair_folders(p: Path) -> tuple[Path, Path] | None:
    for img, lab in (("img", "label"), ("imagesTr", "labelsTr")):
        if (p / img).is_dir() and (p / lab).is_dir():
            return p / img, p / lab
    return None


def find_btcv_cases(src: Path) -> dict[int, dict[str, Any]]:
    """The BTCV training cases under ``src`` keyed by case number.

    Args:
        src: the download (``Abdomen``), ``RawData``, ``RawData/Training``, or a MONAI-style folder.

    Returns:
        ``{n: {"case": "img000n", "image": abs path, "label": abs path}}``.

    Raises:
        DatasetLayoutError: no BTCV layout, an image without its label, or no cases.
    """
    folder = find_folder(
        src,
        ("", "Training", "RawData/Training", "Abdomen/RawData/Training", "RawData"),
        lambda p: _pair_folders(p) is not None,
    )
    if folder is None:
        if (src / "train_npz").is_dir() or (src / "test_vol_h5").is_dir():
            raise DatasetLayoutError(
                f"'{src}' holds TransUNet's preprocessed slices (train_npz/test_vol_h5), not volumes; {_LAYOUT}."
            )
        raise DatasetLayoutError(f"'{src}' does not look like BTCV: no img/ + label/ folders found; {_LAYOUT}.")
    img_dir, lab_dir = _pair_folders(folder)  # type: ignore[misc]
    cases: dict[int, dict[str, Any]] = {}
    for img in sorted(p for p in img_dir.iterdir() if is_nifti(p) and p.name.startswith("img")):
        digits = strip_suffix(img.name)[3:]
        if not digits.isdigit():
            continue
        n = int(digits)
        suffix = img.name[len("img") + len(digits) :]
        label = lab_dir / f"label{digits}{suffix}"
        if not label.is_file():
            alt = [p for p in lab_dir.glob(f"label{digits}.nii*") if is_nifti(p)]
            if not alt:
                raise DatasetLayoutError(f"BTCV image '{img}' has no label '{label}'; {_LAYOUT}.")
            label = alt[0]
        cases[n] = {"case": f"img{digits}", "image": str(img), "label": str(label)}
    if not cases:
        raise DatasetLayoutError(f"'{img_dir}' holds no imgNNNN.nii.gz files; {_LAYOUT}.")
    return cases


def _select(cases: dict[int, dict[str, Any]], ids: tuple[int, ...], split: str, src: Path) -> list[dict[str, Any]]:
    missing = [i for i in ids if i not in cases]
    if missing:
        raise DatasetLayoutError(
            f"'{src}' lacks BTCV case(s) {', '.join(f'img{i:04d}' for i in missing)} of the {split} split "
            f"(the published training set has img0001-0010 and img0021-0040); {_LAYOUT}."
        )
    return [cases[i] for i in ids]


def _warn_extra(cases: dict[int, dict[str, Any]], used: set[int]) -> None:
    extra = sorted(set(cases) - used)
    if extra:
        warnings.warn(
            f"BTCV cases {', '.join(cases[i]['case'] for i in extra)} are not in the paper's split; left out.",
            stacklevel=3,
        )


def _common_payload(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "reference": "Landman et al., MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault (Synapse syn3193805)",
        "licence": "see the Synapse syn3193805 data use terms",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
    }


def prepare_btcv(
    src: Path, out: Path, *, seed: int = 0, num_val: int = 0, merge_adrenals: bool = False, progress: bool = True
) -> dict[str, Any]:
    """BTCV, 13 organs, MA-SAM's split: 24 training / 6 test cases (MA-SAM sec. 4.1, Task 1).

    Args:
        src: the BTCV download (see module docstring).
        out: output folder.
        seed: seed for ``num_val`` hold-outs (the split itself is fixed).
        num_val: 0 = validation list = the 6 test cases (the paper's practice); ``n`` = hold out
            ``n`` seeded training cases instead.
        merge_adrenals: write labels with the left adrenal gland merged into the right one (ids
            0-12, MA-SAM's 12-class setting) to ``out/labelsTr``; otherwise the BTCV labels are
            referenced unchanged.
        progress: show a progress bar.

    Returns:
        The datalist content (written by ``tools.prepare``).
    """
    cases = find_btcv_cases(src)
    train = _select(cases, BTCV_TRAIN_CASES, "training", src)
    test = _select(cases, BTCV_TEST_CASES, "test", src)
    _warn_extra(cases, set(BTCV_TRAIN_CASES) | set(BTCV_TEST_CASES))
    train, val, note = validation_split(train, test, num_val, seed)
    lut = lut_from_mapping(ADRENAL_MERGE, len(BTCV_ORGANS)) if merge_adrenals else None
    labels = dict(BTCV_ORGANS)
    if merge_adrenals:
        labels.pop(13)
        labels[12] = "adrenal gland"
    lists = {}
    for key, items in (("training", train), ("validation", val), ("test", test)):
        lists[key] = materialise(items, out, label_lut=lut, progress=progress, desc=f"btcv {key}")
    payload = _common_payload(
        "BTCV",
        "BTCV abdomen CT, 13 organs"
        + (" (adrenal glands merged: 12)" if merge_adrenals else "")
        + "; MA-SAM's split = SwinUNETR/UNETR dataset_0.json (24 training, 6 test)",
    )
    payload.update(
        {
            "labels": {str(k): v for k, v in labels.items()},
            "numTraining": len(lists["training"]),
            "numTest": len(lists["test"]),
            "split": {
                "kind": "fixed",
                "source": "Tang et al. 2022 (SwinUNETR) BTCV dataset_0.json, as MA-SAM sec. 4.1",
                "validation": note,
            },
            "label_ids": "btcv_adrenals_merged" if merge_adrenals else "btcv",
            **({"label_mapping": {"from": "btcv", "lut": lut.tolist()}} if lut is not None else {}),
            **lists,
        }
    )
    return payload


def synapse_labels() -> tuple[np.ndarray, dict[int, str]]:
    """BTCV -> Synapse 8-organ look-up table and the Synapse label names.

    The ids are SAMed's/H-SAM's (``shared_nets.labels.BTCV_TO_SYNAPSE``): 1 spleen,
    2 right kidney, 3 left kidney, 4 gallbladder, 5 liver, 6 stomach, 7 aorta, 8 pancreas;
    esophagus, IVC, portal/splenic veins and adrenal glands become background.
    """
    lut = np.asarray(BTCV_TO_SYNAPSE, dtype=np.uint8)
    names = {0: "background"}
    for btcv_id, syn_id in enumerate(BTCV_TO_SYNAPSE):
        if syn_id:
            names[int(syn_id)] = BTCV_ORGANS[btcv_id]
    return lut, dict(sorted(names.items()))


def prepare_synapse(
    src: Path, out: Path, *, seed: int = 0, num_val: int = 0, label_ids: str = "btcv", progress: bool = True
) -> dict[str, Any]:
    """Synapse multi-organ (8 organs), TransUNet's 18 training / 12 test cases
    (H-SAM sec. 4.1; SAMed; MA-SAM baselines).

    Args:
        src: the BTCV download (see module docstring).
        out: output folder.
        seed: seed for ``num_val`` hold-outs (the split itself is fixed).
        num_val: 0 = validation list = the 12 test cases (the papers' practice); ``n`` = hold out
            ``n`` seeded training cases instead.
        label_ids: ``"synapse"`` writes labels mapped to the 8 Synapse ids (SAMed/H-SAM order,
            see :func:`synapse_labels`) to ``out/labelsTr``; ``"btcv"`` references the BTCV labels
            unchanged (for configs that map BTCV ids themselves, e.g. H-SAM's
            ``map_btcv_to_synapse: true``).
        progress: show a progress bar.

    Returns:
        The datalist content (written by ``tools.prepare``).
    """
    if label_ids not in ("synapse", "btcv"):
        raise ValueError(
            f"label_ids must be 'synapse' (write the 8-organ ids) or 'btcv' (keep BTCV ids), got {label_ids!r}."
        )
    cases = find_btcv_cases(src)
    train = _select(cases, SYNAPSE_TRAIN_CASES, "training", src)
    test = _select(cases, SYNAPSE_TEST_CASES, "test", src)
    _warn_extra(cases, set(SYNAPSE_TRAIN_CASES) | set(SYNAPSE_TEST_CASES))
    train, val, note = validation_split(train, test, num_val, seed)
    lut, names = synapse_labels()
    use_lut = lut if label_ids == "synapse" else None
    lists = {}
    for key, items in (("training", train), ("validation", val), ("test", test)):
        lists[key] = materialise(items, out, label_lut=use_lut, progress=progress, desc=f"synapse {key}")
    payload = _common_payload(
        "Synapse", "Synapse multi-organ CT (BTCV volumes), 8 organs; TransUNet's split (18 training, 12 test)"
    )
    payload.update(
        {
            "labels": {str(k): v for k, v in (names if label_ids == "synapse" else BTCV_ORGANS).items()},
            "numTraining": len(lists["training"]),
            "numTest": len(lists["test"]),
            "split": {
                "kind": "fixed",
                "source": "TransUNet lists_Synapse (test_vol.txt), as SAMed and H-SAM sec. 4.1",
                "validation": note,
            },
            "label_ids": label_ids,
            **({"label_mapping": {"from": "btcv", "lut": lut.tolist()}} if use_lut is not None else {}),
            **lists,
        }
    )
    return payload


# -- AMOS 22 ---------------------------------------------------------------------------------------

#: AMOS 22 label ids (its dataset.json: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder,
#: 5 esophagus, 6 liver, 7 stomach, 8 aorta, 9 postcava (IVC), 10 pancreas, 11 right adrenal gland,
#: 12 left adrenal gland, 13 duodenum, 14 bladder, 15 prostate/uterus) -> BTCV ids. MA-SAM sec. 4.1:
#: "Each scan was annotated with 15 organs, but we focus on the 12 organs that overlap with the BTCV
#: dataset"; duodenum, bladder and prostate/uterus become background. BTCV's portal/splenic vein
#: (10) has no AMOS counterpart.
AMOS_TO_BTCV: dict[int, int] = {**{i: i for i in range(10)}, 10: 11, 11: 12, 12: 13, 13: 0, 14: 0, 15: 0}
AMOS_NUM_IDS = 16
#: AMOS 22 numbering: amos_0001-0500 are CT, amos_0501-0600 MRI.
AMOS_LAST_CT_ID = 500
AMOS_MODALITIES = ("ct", "mri")

_AMOS_LAYOUT = (
    "expected the AMOS 22 release (amos22.zip, zenodo 7262581): imagesTr/amos_0001.nii.gz + labelsTr/amos_0001.nii.gz "
    "and imagesVa/ + labelsVa/ (--src may point at the folder holding amos22 or at amos22 itself)"
)


def find_amos_cases(src: Path) -> list[dict[str, Any]]:
    """The labelled AMOS 22 cases (training + validation sets) under ``src``.

    Returns:
        ``[{"case": "amos_0001", "image": abs path, "label": abs path, "number": 1, "set": "Tr"}, ...]``.

    Raises:
        DatasetLayoutError: no ``imagesTr``/``labelsTr`` folders, an image without its label, or no cases.
    """

    def has_pairs(p: Path) -> bool:
        return (p / "imagesTr").is_dir() and (p / "labelsTr").is_dir()

    folder = find_folder(src, ("", "amos22", "AMOS22"), has_pairs)
    if folder is None:
        raise DatasetLayoutError(
            f"'{src}' does not look like AMOS 22: no imagesTr/ + labelsTr/ folders; {_AMOS_LAYOUT}."
        )
    cases = []
    for part in ("Tr", "Va"):
        img_dir, lab_dir = folder / f"images{part}", folder / f"labels{part}"
        if not img_dir.is_dir():
            continue
        for img in sorted(p for p in img_dir.iterdir() if is_nifti(p) and p.name.startswith("amos_")):
            name = strip_suffix(img.name)
            digits = name[len("amos_") :]
            if not digits.isdigit():
                continue
            label = next((p for p in lab_dir.glob(f"{name}.nii*") if is_nifti(p)), None) if lab_dir.is_dir() else None
            if label is None:
                raise DatasetLayoutError(f"AMOS image '{img}' has no label in '{lab_dir}'; {_AMOS_LAYOUT}.")
            cases.append({"case": name, "image": str(img), "label": str(label), "number": int(digits), "set": part})
    if not cases:
        raise DatasetLayoutError(f"'{folder}' holds no amos_NNNN.nii.gz images; {_AMOS_LAYOUT}.")
    return cases


def prepare_amos22(
    src: Path,
    out: Path,
    *,
    modality: str = "ct",
    shots: int = 0,
    merge_adrenals: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """AMOS 22 CT or MRI in BTCV label ids, for MA-SAM's generalisation study (sec. 4.4, Fig. 6).

    The paper applies its BTCV-trained model to "300 CT scans and 60 MRI scans in the training and
    validation sets of AMOS 22" (0 shot), and fine-tunes it "with 5 additional training cases from the
    AMOS22 dataset" (5 shot). The paper does not name the five cases: ``shots`` seeded cases form the
    ``training`` list, the rest of the chosen modality is ``test`` (and ``validation``).

    Args:
        src: the AMOS 22 folder (``imagesTr``, ``labelsTr``, ``imagesVa``, ``labelsVa``).
        out: output folder; labels are written there in BTCV ids (:data:`AMOS_TO_BTCV`).
        modality: ``ct`` (ids up to 500) or ``mri`` (ids above 500).
        shots: cases moved to ``training`` for few-shot fine-tuning (0: evaluation only, no training list).
        merge_adrenals: also merge the left adrenal gland into the right one (BTCV ids 0-12, for a model
            trained with ``merge_adrenals``).
        seed: seed for picking the ``shots`` cases.
        progress: show a progress bar.

    Returns:
        The datalist content (written by ``tools.prepare``).
    """
    if modality not in AMOS_MODALITIES:
        raise ValueError(f"modality must be one of {AMOS_MODALITIES}, got {modality!r}.")
    cases = [c for c in find_amos_cases(src) if (c["number"] > AMOS_LAST_CT_ID) == (modality == "mri")]
    if not cases:
        raise DatasetLayoutError(
            f"'{src}' holds no AMOS 22 {modality.upper()} cases (CT: amos_0001-0500, MRI: above 0500)."
        )
    if isinstance(shots, bool) or not isinstance(shots, int) or not 0 <= shots < len(cases):
        raise ValueError(f"shots must be an integer in [0, {len(cases) - 1}] (cases moved to training), got {shots!r}.")
    test, train = hold_out(cases, shots, seed)
    mapping = dict(AMOS_TO_BTCV)
    labels = {k: v for k, v in BTCV_ORGANS.items() if k != 10}
    if merge_adrenals:
        mapping[12] = 12
        labels.pop(13)
        labels[12] = "adrenal gland"
    lut = lut_from_mapping(mapping, AMOS_NUM_IDS)
    lists = {}
    for key, items in (("training", train), ("test", test)):
        lists[key] = materialise(items, out, label_lut=lut, progress=progress, desc=f"amos22 {modality} {key}")
    lists["validation"] = [dict(i) for i in lists["test"]]
    payload = {
        "name": f"AMOS22-{modality.upper()}",
        "description": f"AMOS 22 {modality.upper()}, the 12 organs shared with BTCV, in BTCV label ids"
        + (" (adrenal glands merged)" if merge_adrenals else ""),
        "reference": "Ji et al., AMOS: a large-scale abdominal multi-organ benchmark, NeurIPS 2022 (zenodo 7262581)",
        "licence": "CC BY 4.0 (AMOS 22)",
        "tensorImageSize": "3D",
        "modality": {"0": modality.upper()},
        "labels": {str(k): v for k, v in labels.items()},
        "numTraining": len(lists["training"]),
        "numTest": len(lists["test"]),
        "split": {
            "kind": "seeded" if shots else "all",
            "source": "MA-SAM sec. 4.4 / Fig. 6 (cases not named)",
            "shots": shots,
            "seed": seed,
            "validation": "validation = the test cases",
        },
        "label_ids": "btcv_adrenals_merged" if merge_adrenals else "btcv",
        "label_mapping": {"from": "amos22", "lut": lut.tolist()},
        **lists,
    }
    return payload
