"""A bundle's train, inference and evaluation configs agree on every value they share.

``configs/common.json`` is the one place a shared value is edited; ``train.json`` and ``inference.json`` keep
verbatim copies so each still runs alone (``python -m tools configs sync`` writes them). These tests read the
raw JSON, so they fail as soon as one copy or one overlay drifts, before any model is built.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_nets.labels import BTCV_LABELS, BTCV_TO_SYNAPSE
from tools import configs

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"
BUNDLES = ("h_sam", "ma_sam", "med_sa", "s_sam", "sam3d_adapter")

#: Keys train.json and inference.json both have that differ by design: the inference network adds the output
#: activation (or the train one its wrapper), training starts from the official SAM weights while inference
#: loads the bundle's own model, and the workflow sections list different steps.
ALLOWED = {"network", "network_def", "sam_checkpoint", "imports", "initialize", "run", "finalize"}

#: ``network_def`` arguments that differ between training and inference by design (training-time switches:
#: gradient checkpointing, noise, which parameters train; 3DSAM-adapter's embedding cache and the rule for
#: a patch without a positive click).
TRAIN_ONLY_ARGS = {
    "h_sam": {"embedding_noise", "cmattn_noise_var", "gradient_checkpointing"},
    "ma_sam": {"gradient_checkpointing"},
    "med_sa": {"gradient_checkpointing"},
    "s_sam": {"train_pos_embed", "train_norms", "gradient_checkpointing"},
    "sam3d_adapter": {"use_checkpoint", "cache_image_embedding", "no_positive"},
}

#: ``network_def`` keys only inference.json has: ``_disabled_`` skips building it when ``inference_backend`` is
#: ``"onnx"`` (ONNX Runtime runs the exported file instead, ``shared_nets.onnx_backend``).
INFERENCE_ONLY_ARGS = {"_disabled_"}

#: Overlays merged after train.json only (evaluation and fine-tuning): they must not change a shared value,
#: or evaluation would score another model than inference runs.
TRAIN_SIDE_OVERLAYS = ("evaluate.json", "finetune.json")
#: The multi-GPU overlays of train, inference and evaluation: a shared value they set is set alike in all
#: three; ``multi_gpu_train.json`` also wraps the ``network`` for distributed training.
MULTI_GPU = ("multi_gpu_train.json", "multi_gpu_inference.json", "multi_gpu_evaluate.json")
MULTI_GPU_TRAIN_ONLY = {"network"}


def _config(bundle: str, name: str) -> dict:
    return json.loads((BUNDLES_DIR / bundle / "configs" / name).read_text())


def _key(overlay_key: str) -> str:
    """The top-level config key an overlay entry sets (``+imports`` → ``imports``, ``train#x`` → ``train``)."""
    return overlay_key.lstrip("+").split("#")[0]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_common_values_are_copied_verbatim(bundle):
    """(a) Every key of common.json has the same value in train.json and inference.json."""
    common = _config(bundle, "common.json")
    assert common, f"{bundle}: configs/common.json is empty"
    for name in ("train.json", "inference.json"):
        config = _config(bundle, name)
        for key, value in common.items():
            assert key in config, f"{bundle}/configs/{name} lacks common key '{key}' (python -m tools configs sync)"
            assert config[key] == value, f"{bundle}/configs/{name} '{key}' differs from common.json"
    assert configs.differences(BUNDLES_DIR / bundle) == []


@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_and_inference_share_only_common_values(bundle):
    """(b) A key in both train.json and inference.json is either in common.json or allowed to differ."""
    train, infer = _config(bundle, "train.json"), _config(bundle, "inference.json")
    common = _config(bundle, "common.json")
    shared = set(train) & set(infer)
    differ = sorted(k for k in shared - ALLOWED if train[k] != infer[k])
    assert not differ, f"{bundle}: train.json and inference.json disagree on {differ}"
    missing = sorted(shared - ALLOWED - set(common))
    assert not missing, f"{bundle}: shared keys {missing} are not defined in configs/common.json"
    assert set(common) <= shared, f"{bundle}: common.json keys {sorted(set(common) - shared)} are not in both files"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_network_definitions_agree(bundle):
    """(c) network_def: same class, and every argument both files give is equal unless it is a training switch."""
    train, infer = _config(bundle, "train.json")["network_def"], _config(bundle, "inference.json")["network_def"]
    assert train["_target_"] == infer["_target_"]
    differ = sorted(k for k in set(train) & set(infer) - TRAIN_ONLY_ARGS[bundle] if train[k] != infer[k])
    assert not differ, f"{bundle}: network_def arguments {differ} differ between train.json and inference.json"
    only = sorted((set(train) ^ set(infer)) - TRAIN_ONLY_ARGS[bundle] - (set(infer) & INFERENCE_ONLY_ARGS))
    assert not only, f"{bundle}: network_def arguments {only} are set in only one of train.json / inference.json"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_overlays_do_not_split_shared_values(bundle):
    """(d) Evaluation/fine-tuning overlays leave shared values alone; the multi-GPU overlays set them alike."""
    common = set(_config(bundle, "common.json"))
    folder = BUNDLES_DIR / bundle / "configs"
    for name in TRAIN_SIDE_OVERLAYS:
        if (folder / name).is_file():
            changed = sorted({_key(k) for k in _config(bundle, name)} & common)
            assert not changed, f"{bundle}/configs/{name} changes shared keys {changed}; change them in common.json"
    overlays = {name: _config(bundle, name) for name in MULTI_GPU}
    for name, overlay in overlays.items():
        for key in {_key(k) for k in overlay} & common:
            if name == "multi_gpu_train.json" and key in MULTI_GPU_TRAIN_ONLY:
                continue
            values = {other: cfg.get(key) for other, cfg in overlays.items()}
            assert len({json.dumps(v) for v in values.values()}) == 1, f"{bundle}: '{key}' differs: {values}"


def test_agreement_check_fails_on_a_drifted_copy(tmp_path):
    """The check above and `python -m tools configs check` catch a copy edited in one file only; sync repairs it."""
    bundle = tmp_path / "m" / "configs"
    bundle.mkdir(parents=True)
    (bundle / "common.json").write_text(json.dumps({"img_size": 64, "variant": "tiny"}, indent=4) + "\n")
    (bundle / "train.json").write_text(json.dumps({"max_epochs": 2, "img_size": 64, "variant": "tiny"}, indent=4))
    (bundle / "inference.json").write_text(json.dumps({"img_size": 128}, indent=4) + "\n")
    lines = configs.check(root=tmp_path)
    assert len(lines) == 2, lines
    assert "inference.json: 'img_size' is 128; expected 64" in lines[0]
    assert "inference.json: lacks 'variant'" in lines[1]
    written = configs.sync(root=tmp_path)
    assert written == [str(bundle / "inference.json")]  # train.json already agrees: left untouched
    assert configs.check(root=tmp_path) == []
    assert list(json.loads((bundle / "inference.json").read_text()).items()) == [("img_size", 64), ("variant", "tiny")]
    assert json.loads((bundle / "train.json").read_text())["max_epochs"] == 2


@pytest.mark.parametrize("bundle", ["ma_sam", "s_sam"])
def test_btcv_channel_def_is_the_label_table(bundle):
    """(e) The BTCV bundles name their output channels after shared_nets.labels.BTCV_LABELS."""
    channel_def = _config(bundle, "metadata.json")["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channel_def == {str(k): v for k, v in BTCV_LABELS.items()}


def test_h_sam_channel_def_is_the_synapse_mapping_of_the_label_table():
    """(e) H-SAM's 8 Synapse organs carry the BTCV names of the ids BTCV_TO_SYNAPSE maps to them."""
    channel_def = _config("h_sam", "metadata.json")["network_data_format"]["outputs"]["pred"]["channel_def"]
    expected = {"0": "background"} | {str(s): BTCV_LABELS[b] for b, s in enumerate(BTCV_TO_SYNAPSE) if s}
    assert channel_def == expected


def test_configs_command_exits_nonzero_on_drift(tmp_path, capsys):
    bundle = tmp_path / "m" / "configs"
    bundle.mkdir(parents=True)
    (bundle / "common.json").write_text(json.dumps({"img_size": 64}))
    for name in ("train.json", "inference.json"):
        (bundle / name).write_text(json.dumps({"img_size": 32 if name == "train.json" else 64}))
    with pytest.raises(SystemExit) as exit_info:
        configs.main("check", root=str(tmp_path))
    assert exit_info.value.code == 1
    assert "train.json: 'img_size' is 32; expected 64 as in configs/common.json." in capsys.readouterr().err
    configs.main("sync", bundle="m", root=str(tmp_path))
    configs.main("check", root=str(tmp_path))
    assert "agree" in capsys.readouterr().out
    with pytest.raises(ValueError, match="action must be"):
        configs.main("merge", root=str(tmp_path))
    with pytest.raises(ValueError, match="bundle 'x'"):
        configs.check(bundle="x", root=tmp_path)
