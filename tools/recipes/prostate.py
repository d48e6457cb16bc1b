"""Prostate MRI: PROMISE12 (H-SAM's few-shot task) and the 6-site set of MA-SAM (Task 2).

PROMISE12 is distributed as MetaImage pairs (``Case00.mhd``/``.raw`` +
``Case00_segmentation.mhd``/``.raw``, 50 training cases in ``TrainingData_Part1..3``); both are
read with ITK (through MONAI's ``LoadImage``) and written as NIfTI. The multi-site set is the
NIfTI collection of Liu et al. (MS-Net 2020 / SAML 2020) that MA-SAM uses: one folder per site
(``RUNMC``, ``BMC``, ``HCRUDB``, ``UCL``, ``BIDMC``, ``HK`` = Sites A-F) holding ``Case00.nii.gz``
and ``Case00_segmentation.nii.gz`` (some sites spell it ``_Segmentation``). Prostate labels are
binarised (MA-SAM's code sets every value > 1 to 1) and written to ``--out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    DatasetLayoutError,
    case_number,
    find_folder,
    is_nifti,
    materialise,
    seeded_pick,
    strip_suffix,
    validation_split,
)

__all__ = [
    "PROSTATE_LABELS",
    "PROSTATE_SITES",
    "MA_SAM_PROSTATE_TEST",
    "find_promise12_cases",
    "find_site_cases",
    "prepare_promise12",
    "prepare_prostate_multisite",
]

PROSTATE_LABELS: dict[int, str] = {0: "background", 1: "prostate"}

#: MA-SAM's Sites A-F (order of Liu et al. 2020; 30, 30, 19, 13, 12, 12 cases): canonical folder
#: name, other folder names the same data circulates under.
PROSTATE_SITES: dict[str, tuple[str, tuple[str, ...]]] = {
    "A": ("RUNMC", ("ISBI",)),
    "B": ("BMC", ("ISBI_1.5",)),
    "C": ("HCRUDB", ("I2CVB",)),
    "D": ("UCL", ()),
    "E": ("BIDMC", ()),
    "F": ("HK", ()),
}

# MA-SAM sec. 4.1: each site "randomly divided into 80% and 20% for training and testing"; the
# test cases are those listed in MA-SAM's repository (preprocessing/dataset_split.md, case numbers
# of the CaseNN file names).
MA_SAM_PROSTATE_TEST: dict[str, tuple[int, ...]] = {
    "A": (3, 8, 12, 15, 18, 26),
    "B": (3, 8, 12, 15, 18, 26),
    "C": (3, 8, 13, 15),
    "D": (1, 32, 34),
    "E": (0, 4, 9),
    "F": (38, 41, 46),
}

# every positive value -> prostate (PROMISE12 is 0/1 already; some multi-site labels carry 2)
_BINARISE = np.concatenate([[0], np.ones(255)]).astype(np.uint8)

_PROMISE_LAYOUT = (
    "expected the PROMISE12 training data as downloaded: TrainingData_Part1/Case00.mhd + Case00.raw + "
    "Case00_segmentation.mhd + Case00_segmentation.raw ... (any sub-folders)"
)
_SITES_LAYOUT = (
    "expected one folder per site under --src (RUNMC, BMC, HCRUDB or I2CVB, UCL, BIDMC, HK), each holding "
    "Case00.nii.gz + Case00_segmentation.nii.gz (or _Segmentation) ..."
)


def find_promise12_cases(src: Path) -> list[dict[str, Any]]:
    """PROMISE12 training cases (those with a ``_segmentation.mhd``) anywhere below ``src``.

    Returns:
        ``[{"case": "Case00", "image": abs .mhd, "label": abs _segmentation.mhd}, ...]`` sorted by case.

    Raises:
        DatasetLayoutError: no labelled case, a label without its image, or a case found twice.
    """
    cases: dict[str, dict[str, Any]] = {}
    for seg in sorted(src.rglob("*.mhd")):
        stem = seg.name[: -len(".mhd")]
        if not stem.lower().endswith("_segmentation") or seg.name.startswith("."):
            continue
        case = stem[: -len("_segmentation")]
        image = seg.with_name(case + ".mhd")
        if not image.is_file():
            raise DatasetLayoutError(f"PROMISE12 label '{seg}' has no image '{image}'; {_PROMISE_LAYOUT}.")
        if case in cases:
            raise DatasetLayoutError(
                f"PROMISE12 case {case} found twice ('{cases[case]['image']}' and '{image}'); "
                "point --src at one copy of the training data."
            )
        cases[case] = {"case": case, "image": str(image), "label": str(seg)}
    if not cases:
        raise DatasetLayoutError(f"'{src}' holds no CaseNN_segmentation.mhd files; {_PROMISE_LAYOUT}.")
    return [cases[k] for k in sorted(cases)]


def prepare_promise12(
    src: Path, out: Path, *, seed: int = 0, num_test: int = 10, num_val: int = 0, progress: bool = True
) -> dict[str, Any]:
    """PROMISE12, 40 training / 10 test cases (H-SAM sec. 4.1, following MLB-Seg), converted to NIfTI.

    MLB-Seg does not publish its case lists, so the split is seeded (ours). The 3-labelled-case
    few-shot subset comes after: ``python -m tools few_shot --num_cases 3``.

    Args:
        src: the PROMISE12 training data (see module docstring).
        out: output folder: ``imagesTr/CaseNN.nii.gz``, ``labelsTr/CaseNN.nii.gz``, ``datalist.json``.
        seed: split seed.
        num_test: test cases (paper: 10 of 50).
        num_val: 0 = validation list = the test cases (the paper's practice); ``n`` = ``n`` seeded
            training cases held out.
        progress: show a progress bar.

    Returns:
        The datalist content.
    """
    cases = find_promise12_cases(src)
    if isinstance(num_test, bool) or not isinstance(num_test, int) or not 1 <= num_test < len(cases):
        raise ValueError(
            f"num_test must be an integer in [1, {len(cases) - 1}] (cases found: {len(cases)}), got {num_test!r}."
        )
    test_ids = set(seeded_pick([c["case"] for c in cases], num_test, seed))
    train = [c for c in cases if c["case"] not in test_ids]
    test = [c for c in cases if c["case"] in test_ids]
    train, val, note = validation_split(train, test, num_val, seed)
    lists = {}
    for key, items in (("training", train), ("validation", val), ("test", test)):
        lists[key] = materialise(items, out, label_lut=_BINARISE, progress=progress, desc=f"promise12 {key}")
    return {
        "name": "PROMISE12",
        "description": f"PROMISE12 prostate T2w MRI, {len(cases) - num_test} training / {num_test} test cases "
        "(H-SAM sec. 4.1); "
        "seeded split (MLB-Seg's lists are not published)",
        "reference": "Litjens et al. 2014, Evaluation of prostate segmentation algorithms for MRI: "
        "the PROMISE12 challenge",
        "licence": "see the PROMISE12 challenge terms (promise12.grand-challenge.org)",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(k): v for k, v in PROSTATE_LABELS.items()},
        "numTraining": len(lists["training"]),
        "numTest": len(lists["test"]),
        "split": {
            "kind": "seeded",
            "seed": seed,
            "num_test": num_test,
            "validation": note,
            "source": "H-SAM sec. 4.1: 40/10 as MLB-Seg (lists unpublished; seeded here)",
        },
        "label_ids": "prostate",
        **lists,
    }


def _site_keys(sites: str | Sequence[str] | None) -> list[str]:
    if sites is None or sites == "all":
        return list(PROSTATE_SITES)
    names = [s.strip() for s in sites.split(",")] if isinstance(sites, str) else [str(s).strip() for s in sites]
    lookup = {}
    for key, (canonical, aliases) in PROSTATE_SITES.items():
        for n in (key, canonical, *aliases):
            lookup[n.upper()] = key
    keys = []
    for n in names:
        if n.upper() not in lookup:
            raise ValueError(
                "sites must be 'all' or site letters/names from "
                f"{[f'{k}={v[0]}' for k, v in PROSTATE_SITES.items()]}, got {n!r}."
            )
        if lookup[n.upper()] not in keys:
            keys.append(lookup[n.upper()])
    return keys


def find_site_cases(src: Path, site: str) -> list[dict[str, Any]]:
    """The cases of one site (``"A"``-``"F"``) of the multi-site prostate set.

    Returns:
        ``[{"case": "RUNMC_Case03", "site": "RUNMC", "image": abs, "label": abs}, ...]`` sorted.

    Raises:
        DatasetLayoutError: no folder for the site, an image without label, or an empty folder.
    """
    canonical, aliases = PROSTATE_SITES[site]
    folder = find_folder(src, (canonical, *aliases), lambda p: True)
    if folder is None:
        raise DatasetLayoutError(
            f"'{src}' has no folder for Site {site} ({' or '.join((canonical, *aliases))}); {_SITES_LAYOUT}."
        )
    files = {p.name: p for p in folder.iterdir() if is_nifti(p)}
    by_stem = {strip_suffix(n).lower(): p for n, p in files.items()}
    cases = []
    for name, img in sorted(files.items()):
        stem = strip_suffix(name)
        if "segmentation" in stem.lower():
            continue
        label = by_stem.get(stem.lower() + "_segmentation")
        if label is None:
            raise DatasetLayoutError(
                f"prostate image '{img}' has no {stem}_segmentation.nii.gz next to it; {_SITES_LAYOUT}."
            )
        cases.append({"case": f"{canonical}_{stem}", "site": canonical, "image": str(img), "label": str(label)})
    if not cases:
        raise DatasetLayoutError(f"site folder '{folder}' holds no CaseNN.nii.gz images; {_SITES_LAYOUT}.")
    return cases


def prepare_prostate_multisite(
    src: Path, out: Path, *, sites: str | Sequence[str] = "all", seed: int = 0, num_val: int = 0, progress: bool = True
) -> dict[str, Any]:
    """MA-SAM's 6-site prostate MRI set with its per-site 80/20 split (MA-SAM sec. 4.1, Task 2; Tables 2 and 5).

    Args:
        src: the folder holding the site folders (see module docstring).
        out: output folder: binarised ``labelsTr/<SITE>_CaseNN.nii.gz`` and ``datalist.json``
            (images are referenced in ``src``).
        sites: ``"all"`` or a comma-separated list of site letters or names (``"A"``, ``"RUNMC"``;
            MA-SAM's Table 5 trains on Site A alone).
        seed: seed for ``num_val`` hold-outs (the split is MA-SAM's published test list).
        num_val: 0 = validation list = the test cases (MA-SAM's code draws validation from the
            test list); ``n`` = ``n`` seeded training cases held out over all chosen sites.
        progress: show a progress bar.

    Returns:
        The datalist content; every entry carries its ``site``.
    """
    keys = _site_keys(sites)
    train, test = [], []
    for key in keys:
        cases = find_site_cases(src, key)
        wanted = set(MA_SAM_PROSTATE_TEST[key])
        numbers = {case_number(Path(c["image"]).name) for c in cases}
        missing = sorted(wanted - numbers)
        if missing:
            raise DatasetLayoutError(
                f"Site {key} ({PROSTATE_SITES[key][0]}) lacks test case(s) "
                f"{', '.join(f'Case{i:02d}' for i in missing)} of MA-SAM's split; "
                f"{_SITES_LAYOUT}."
            )
        for c in cases:
            (test if case_number(Path(c["image"]).name) in wanted else train).append(c)
    train, val, note = validation_split(train, test, num_val, seed)
    lists = {}
    for key, items in (("training", train), ("validation", val), ("test", test)):
        lists[key] = materialise(items, out, label_lut=_BINARISE, progress=progress, desc=f"prostate {key}")
    chosen = [f"{k}={PROSTATE_SITES[k][0]}" for k in keys]
    return {
        "name": "Prostate multi-site",
        "description": f"prostate T2w MRI from 6 sites (Liu et al. 2020), sites {', '.join(chosen)}; "
        "MA-SAM's per-site 80/20 split",
        "reference": "Liu et al. 2020 (MS-Net / SAML): NCI-ISBI13, I2CVB and PROMISE12 prostate MRI, "
        "re-sampled per site",
        "licence": "see the source datasets' terms (NCI-ISBI 2013, I2CVB, PROMISE12)",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(k): v for k, v in PROSTATE_LABELS.items()},
        "sites": {k: PROSTATE_SITES[k][0] for k in keys},
        "numTraining": len(lists["training"]),
        "numTest": len(lists["test"]),
        "split": {
            "kind": "fixed",
            "validation": note,
            "source": "MA-SAM sec. 4.1 (random 80/20 per site); "
            "test cases from MA-SAM's preprocessing/dataset_split.md",
        },
        "label_ids": "prostate",
        **lists,
    }
