"""3DSAM-adapter: ``target_class`` follows ``tumour_dataset`` in every config, the demo included, and an
explicit contradiction stops with a message instead of training on the wrong label id."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from shared_nets.sam3d_adapter.data import RECIPES, check_target_class

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "sam3d_adapter"


def _parser(configs: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
    parser["bundle_root"] = str(BUNDLE)
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.mark.parametrize(
    "configs", [["train.json"], ["inference.json"], ["train.json", "demo.json"], ["inference.json", "demo.json"]]
)
@pytest.mark.parametrize("dataset", ["msd_pancreas", "msd_colon"])
def test_target_class_follows_tumour_dataset(configs, dataset):
    """The demo overlay once hard-coded target_class 1, silently overriding --tumour_dataset msd_pancreas."""
    parser = _parser(configs, tumour_dataset=dataset)
    assert parser.get_parsed_content("target_class") == RECIPES[dataset]["target_class"]


def test_demo_default_is_the_phantom_tumour_id():
    assert _parser(["train.json", "demo.json"]).get_parsed_content("target_class") == 1


def test_contradicting_target_class_stops_with_a_message():
    parser = _parser(["train.json", "demo.json"], tumour_dataset="msd_pancreas", target_class=1)
    index = next(i for i, e in enumerate(parser["initialize"]) if "check_target_class" in e)
    with pytest.raises(RuntimeError) as info:  # MONAI wraps the expression's error
        parser.get_parsed_content(f"initialize#{index}")
    assert isinstance(info.value.__cause__, ValueError)
    assert "target_class 1 contradicts tumour_dataset 'msd_pancreas' (its tumour id is 2)" in str(info.value.__cause__)
    with pytest.raises(ValueError, match="tumour_dataset: expected one of"):
        check_target_class("brats", 1)
