"""The ``peft`` key of every bundle: one shared value, the paper's default, passed to the network the same way
in training and inference, old keys gone from the configs, trainable parameters logged at train start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_nets.peft import PEFT_METHODS

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"
PAPER = {"ma_sam": "fact", "med_sa": "adapter", "sam3d_adapter": "adapter", "s_sam": "svd", "h_sam": "lora"}
SIZE_KEYS = {
    "ma_sam": ("lora_rank", "fact_rank", "adapter_ratio"),
    "med_sa": ("lora_rank", "fact_rank", "adapter_ratio"),
    "sam3d_adapter": ("lora_rank", "fact_rank"),
    "s_sam": ("lora_rank", "fact_rank", "adapter_ratio"),
    "h_sam": ("lora_rank", "fact_rank", "adapter_ratio"),
}


def _config(bundle: str, name: str) -> dict:
    return json.loads((BUNDLES_DIR / bundle / "configs" / name).read_text())


@pytest.mark.parametrize("bundle", sorted(PAPER))
def test_peft_key_is_shared_and_reaches_the_network(bundle):
    assert _config(bundle, "common.json")["peft"] == PAPER[bundle]
    for name in ("train.json", "inference.json"):
        config = _config(bundle, name)
        assert config["peft"] == PAPER[bundle]
        net = config["network_def"]
        assert net["peft"] == "@peft", name
        for key in SIZE_KEYS[bundle]:
            assert net[key] == f"@{key}" and key in config, (name, key)
    demo = _config(bundle, "demo.json")
    assert demo.get("peft", PAPER[bundle]) in PEFT_METHODS


@pytest.mark.parametrize("bundle", sorted(PAPER))
def test_old_keys_are_gone_and_trainable_parameters_are_logged(bundle):
    for path in (BUNDLES_DIR / bundle / "configs").glob("*.json"):
        text = path.read_text()
        assert '"finetune"' not in text and '"full_finetune"' not in text, path.name
        assert '"@finetune"' not in text and '"@full_finetune"' not in text, path.name
    for name in ("train.json", "multi_gpu_train.json"):
        init = _config(bundle, name).get("initialize", [])
        assert any("log_trainable_parameters" in str(step) for step in init), name
