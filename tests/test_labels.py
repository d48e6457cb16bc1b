"""shared_nets.labels: the one BTCV table agrees with the bundles' metadata.json, and the class-name /
class-count helpers return what the bundle JSON expressions they replace compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

import shared_nets.med_sa
import shared_nets.metrics
from shared_nets.labels import (
    ADRENAL_MERGE,
    BTCV_LABELS,
    BTCV_TO_SYNAPSE,
    btcv_class_names,
    btcv_foreground_labels,
    btcv_num_classes,
)

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def _json(bundle: str, name: str) -> dict:
    return json.loads((BUNDLES / bundle / "configs" / name).read_text())


def _evaluate(bundle: str, key: str, merge_adrenals: bool):
    """``key`` of ``bundle``'s evaluate.json parsed over train.json's ``num_classes`` and metadata.json."""
    train, evaluate = _json(bundle, "train.json"), _json(bundle, "evaluate.json")
    config = {
        "_meta_": _json(bundle, "metadata.json"),
        "merge_adrenals": merge_adrenals,
        "num_classes": train["num_classes"],
        **{k: evaluate[k] for k in (key, "btcv_class_names") if k in evaluate},
    }
    parser = ConfigParser(config, globals={"shared_nets": shared_nets})
    return parser.get_parsed_content(key)


@pytest.mark.parametrize("bundle", ["ma_sam", "s_sam"])
def test_table_equals_bundle_channel_def(bundle):
    channel_def = _json(bundle, "metadata.json")["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert {int(k): v for k, v in channel_def.items()} == BTCV_LABELS


def test_h_sam_channel_def_is_the_synapse_mapping():
    channel_def = _json("h_sam", "metadata.json")["network_data_format"]["outputs"]["pred"]["channel_def"]
    synapse = {0: "background"} | {s: BTCV_LABELS[b] for b, s in enumerate(BTCV_TO_SYNAPSE) if s}
    assert {int(k): v for k, v in channel_def.items()} == synapse
    assert sorted(set(BTCV_TO_SYNAPSE)) == list(range(9))


@pytest.mark.parametrize("merge", [False, True])
def test_class_names_equal_the_old_json_expressions(merge):
    names = btcv_class_names(merge)
    assert names == _evaluate("ma_sam", "metric_class_names", merge)
    med_sa = _evaluate("med_sa", "class_names", merge)
    assert {int(k): v for k, v in med_sa.items()} == btcv_foreground_labels(merge)
    assert list(med_sa.values()) == names
    assert len(names) == btcv_num_classes(merge) == (12 if merge else 13)
    assert names[-1] == ("adrenal glands" if merge else "left adrenal gland")


@pytest.mark.parametrize("bundle", ["ma_sam", "med_sa"])
@pytest.mark.parametrize("merge", [False, True])
def test_num_classes_equals_the_old_json_expression(bundle, merge):
    """The bundles' ``num_classes`` resolves to the helper's value, which is the expression it replaced."""
    old = ConfigParser({"merge_adrenals": merge, "num_classes": "$12 if @merge_adrenals else 13"})
    now = ConfigParser(
        {"merge_adrenals": merge, "num_classes": _json(bundle, "train.json")["num_classes"]},
        globals={"shared_nets": shared_nets},
    )
    assert btcv_num_classes(merge) == old.get_parsed_content("num_classes") == now.get_parsed_content("num_classes")


def test_adrenal_merge():
    assert ADRENAL_MERGE[13] == 12
    assert all(ADRENAL_MERGE[i] == i for i in range(13))
    assert sorted(set(ADRENAL_MERGE.values())) == list(range(13))


def test_recipes_and_demo_share_the_table():
    from tools.demo_data import BTCV_LABELS as demo_labels
    from tools.recipes.abdomen import BTCV_ORGANS

    assert BTCV_ORGANS is BTCV_LABELS
    assert demo_labels is BTCV_LABELS
