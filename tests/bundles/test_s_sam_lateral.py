"""S-SAM bundle: the training flip keeps "left" / "right" class names on the anatomical side they name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from shared_nets.data import RandLateralFlipd, lateral_pairs

CONFIGS = Path(__file__).resolve().parents[2] / "bundles" / "s_sam" / "configs"


def _flip_transform(class_names: list[str] | None = None):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.read_meta(str(CONFIGS / "metadata.json"))
    if class_names is not None:
        parser["class_names"] = class_names
    names = parser.get_parsed_content("class_names")
    flips = [t for t in parser.get_parsed_content("train#random_transforms") if "Flip" in type(t).__name__]
    assert len(flips) == 1, flips
    return flips[0], names


@pytest.mark.parametrize("class_names", [None, ["spleen", "right kidney", "left kidney", "liver"]])
def test_flip_in_train_config_keeps_lateral_labels_anatomical(class_names):
    """After Orientationd(RAS) spatial axis 0 runs left-right. Label ids are channels (1 + index in class_names)."""
    flip, names = _flip_transform(class_names)
    left, right = names.index("left kidney") + 1, names.index("right kidney") + 1
    label = torch.zeros(1, 16, 8, 1, dtype=torch.uint8)
    label[0, :6] = right  # one side of axis 0 holds the right kidney ...
    label[0, 10:] = left  # ... the other side the left one
    image = label.float()
    flip.prob = 1.0
    out = flip({"image": image, "label": label.clone()})
    lab = torch.as_tensor(out["label"])
    # the image is mirrored (the organ shapes moved) ...
    assert torch.equal(torch.as_tensor(out["image"]), image.flip(1))
    # ... and each side still carries the id of the kidney on that side
    assert set(lab[0, :6].unique().tolist()) == {right}
    assert set(lab[0, 10:].unique().tolist()) == {left}


def test_lateral_pairs_from_names():
    names = ["spleen", "Right Kidney", "left kidney", "right adrenal gland", "left adrenal gland", "leftover"]
    assert lateral_pairs(names) == [(3, 2), (5, 4)]
    assert lateral_pairs(names, first_id=0) == [(2, 1), (4, 3)]
    assert lateral_pairs(["liver", "left lung"]) == []


def test_no_flip_without_the_draw_and_bad_pairs():
    t = RandLateralFlipd(["label"], swap=[(1, 2)], prob=0.0)
    lab = torch.arange(4).reshape(1, 4, 1, 1)
    assert torch.equal(t({"label": lab})["label"], lab)
    with pytest.raises(ValueError, match="two different ids"):
        RandLateralFlipd(["label"], swap=[(1, 1)])
