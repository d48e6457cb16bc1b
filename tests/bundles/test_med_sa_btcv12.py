"""Med-SA bundle: the paper's twelve BTCV anatomies (``merge_adrenals``), as in the MA-SAM bundle."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from shared_nets.med_sa.data import object_datalist

CONFIGS = Path(__file__).resolve().parents[2] / "bundles" / "med_sa" / "configs"


@pytest.fixture()
def adrenal_case(tmp_path) -> dict[str, str]:
    """A tiny CT/label pair holding liver (6) and only the *left* adrenal gland (13)."""
    lab = np.zeros((16, 16, 4), np.uint8)
    lab[2:6, 2:6] = 6
    lab[10:12, 10:12, 1:3] = 13
    img = np.random.default_rng(0).normal(0, 100, lab.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    return {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}


def _parser(merge: bool, evaluate: bool = False) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")] + ([str(CONFIGS / "evaluate.json")] if evaluate else []))
    parser.update({"merge_adrenals": merge, "img_size": 16, "num_slices": 4})
    return parser


@pytest.mark.parametrize("merge, n, last", [(False, 13, "left adrenal gland"), (True, 12, "adrenal glands")])
def test_merge_adrenals_gives_twelve_classes_and_names(merge, n, last):
    parser = _parser(merge, evaluate=True)
    assert parser.get_parsed_content("num_classes") == n
    assert parser.get_parsed_content("class_ids") == list(range(1, n + 1))
    names = parser.get_parsed_content("class_names")
    assert len(names) == n and names[str(n)] == last


@pytest.mark.parametrize("merge", [False, True])
def test_preprocessing_maps_the_left_adrenal_onto_the_right_one(adrenal_case, merge):
    from monai.transforms import Compose

    transforms = Compose(_parser(merge).get_parsed_content("train#deterministic_transforms"))
    out = transforms(dict(adrenal_case))
    ids = set(np.unique(np.asarray(out["label"])).astype(int).tolist())
    assert ids == ({0, 6, 12} if merge else {0, 6, 13})


def test_object_datalist_applies_the_label_map(adrenal_case):
    plain = object_datalist([adrenal_case], list(range(1, 14)))
    assert [i["object_id"] for i in plain] == [6, 13]
    merged = object_datalist([adrenal_case], list(range(1, 13)), label_map={13: 12})
    assert [i["object_id"] for i in merged] == [6, 12]
    assert [i["object_id"] for i in object_datalist([adrenal_case], list(range(1, 13)))] == [6]  # unmapped: lost
