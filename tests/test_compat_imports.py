"""Old ``shared_nets.nets.<module>.<name>`` paths still resolve after the one-package-per-method move.

MONAI Label apps made by ``tools/label_app.py`` and users' own configs hold copies of bundle JSON
with these dotted names (``_target_``, ``$`` expressions, ``$import``). The lists are the public
names of each module under ``shared_nets/nets/`` before the move (its ``__all__`` plus every
other public top-level name).
"""

from __future__ import annotations

import importlib
import pickle

import pytest

OLD_NAMES: dict[str, list[str]] = {
    "common": [
        "EmbeddingCache",
        "ProgressiveUpsampling",
        "attention_residual",
        "block_norms",
        "block_width",
        "check_input",
        "decode_masks",
        "mlp_residual",
        "run_encoder",
        "slices_to_volume",
        "to_rgb",
        "upsample_to",
        "volume_to_slices",
    ],
    "h_sam": ["ENSEMBLE_MODES", "FINETUNE_MODES", "HSAM"],
    "h_sam_data": [
        "BTCV_TO_SYNAPSE",
        "SelectSlicesd",
        "axial_depth",
        "few_shot",
        "label_frequencies",
        "noise_var",
        "write_few_shot_datalist",
    ],
    "h_sam_decoder": [
        "CMAttn",
        "HSAMStage2Decoder",
        "MASK_ATTENTION_MODES",
        "MaskGuidedAttention",
        "MaskGuidedTwoWayTransformer",
        "class_balanced_noise_var",
        "decode_stage1",
        "run_two_way_transformer",
    ],
    "h_sam_loss": ["HSAMStageWeights", "STAGE_LOSS_TYPES", "STAGE_WEIGHT_SCHEDULES", "stage_loss", "stage_weights"],
    "ma_sam": ["ADAPTER_POSITIONS", "DECODERS", "FINETUNE_MODES", "MASAM", "MultiScaleFusion"],
    "med_sa": ["MEDSA_OFFICIAL_CODE_SETTINGS", "MedSA", "PROMPT_SCOPES"],
    "med_sa_blocks": [
        "HyPAdapter",
        "MedSADecoderBlock",
        "MedSAEncoderBlock",
        "MedSATinyViTBlock",
        "MedSATwoWayTransformer",
        "PROMPT_FUSIONS",
        "adapter_width",
        "depth_attention",
    ],
    "med_sa_interactive": [
        "InteractiveRefinementCurve",
        "MedSAClickInteraction",
        "PerObjectMetrics",
        "PromptSettingsRunner",
        "add_corrective_clicks",
        "corrective_click",
        "logger",
    ],
    "med_sa_prompts": ["CheckPromptsd", "ObjectLabeld", "PROMPT_SETTINGS", "SimulatePromptSettingd", "object_datalist"],
    "s_sam": ["SSAM", "S_SAM_MODES", "TAL_TYPES", "TextAffineLayer"],
    "s_sam_text": [
        "ClipTextEncoder",
        "HashTextEncoder",
        "TEXT_EMBEDDING_DIM",
        "add_text_embeddings",
        "channel_targets",
        "foreground_names",
        "get_text_encoder",
        "load_class_embeddings",
        "names_to_ids",
        "normalize_name",
        "read_text_embeddings",
        "write_text_embeddings",
    ],
    "sam3d_adapter": ["NO_POSITIVE_MODES", "PROMPT_ENCODER_MODES", "SAM3DAdapter", "SAM3D_TRAINABLE_PATTERNS"],
    "sam3d_adapter_bench": ["training_step_memory"],
    "sam3d_adapter_data": [
        "RECIPES",
        "RequirePositiveClicksd",
        "TUMOUR_DATASETS",
        "check_isotropic",
        "check_target_class",
        "find_cases",
        "random_split",
        "write_datalist",
    ],
    "sam3d_adapter_encoder": [
        "Block3D",
        "LayerNorm3d",
        "Neck3D",
        "SpatialAdapter3D",
        "VolumeTokenizer",
        "WindowAttention3D",
        "run_blocks",
        "shifted_window_regions",
        "window_partition_3d",
        "window_unpartition_3d",
    ],
    "sam3d_adapter_heads": [
        "MultiLevelDecoder3D",
        "PROMPT_ENCODINGS",
        "PROMPT_LAYERS",
        "PositionEmbeddingRandom3D",
        "PromptEncoder3D",
    ],
}
PACKAGE_NAMES = ["HSAM", "MASAM", "MEDSA_OFFICIAL_CODE_SETTINGS", "MedSA", "SAM3DAdapter", "SSAM", "TextAffineLayer"]
DOTTED = [f"shared_nets.nets.{module}.{name}" for module, names in OLD_NAMES.items() for name in names]


def _new_home(dotted: str):
    """The object at ``dotted`` found without the compatibility hook: via the module that defines it now.

    A network class's old name is served by its method's builder (the class now takes built parts).
    """
    from shared_nets.nets import BUILT_BY

    module, _, name = dotted.rpartition(".")
    if name in BUILT_BY:
        home, _, attr = BUILT_BY[name].partition(":")
        return getattr(importlib.import_module(home), attr)
    obj = getattr(importlib.import_module(module), name)
    home = getattr(obj, "__module__", None)
    if home is None or not home.startswith(("shared_nets.", "tools.")) or home.startswith("shared_nets.nets"):
        return obj
    return getattr(importlib.import_module(home), name)


def test_every_old_module_is_listed():
    from shared_nets.nets import MOVED_MODULES, SPLIT_MODULES

    assert set(OLD_NAMES) == set(MOVED_MODULES) | set(SPLIT_MODULES)
    assert not set(MOVED_MODULES) & set(SPLIT_MODULES)
    for old, homes in SPLIT_MODULES.items():  # a split module serves every old public name
        assert set(OLD_NAMES[old]) <= set(homes), old


@pytest.mark.parametrize("dotted", DOTTED)
def test_old_name_imports(dotted):
    module, _, name = dotted.rpartition(".")
    mod = importlib.import_module(module)
    obj = getattr(mod, name)
    assert obj is _new_home(dotted)
    exec(f"from {module} import {name}", {})  # the `from ... import` form too


@pytest.mark.parametrize("module", ["common", "h_sam_data", "med_sa_prompts", "sam3d_adapter_data"])
def test_split_module_star_import_and_dir(module):
    """A split module's ``import *`` gives its old ``__all__`` (there: every public name)."""
    namespace: dict = {}
    exec(f"from shared_nets.nets.{module} import *", namespace)
    assert set(OLD_NAMES[module]) <= set(namespace), sorted(set(OLD_NAMES[module]) - set(namespace))
    assert set(OLD_NAMES[module]) <= set(dir(importlib.import_module(f"shared_nets.nets.{module}")))


@pytest.mark.parametrize("dotted", DOTTED)
def test_old_name_resolves_in_a_monai_config(dotted):
    from monai.bundle import ConfigParser

    module = dotted.rpartition(".")[0]
    parser = ConfigParser({"imports": ["$import shared_nets", f"$import {module}"], "expr": f"${dotted}"})
    assert parser.get_parsed_content("expr") is _new_home(dotted)
    if callable(_new_home(dotted)) and not dotted.endswith("logger"):
        parser = ConfigParser({"target": {"_target_": dotted, "_mode_": "callable"}})
        assert parser.get_parsed_content("target") is _new_home(dotted)


def test_package_names():
    import shared_nets.nets as nets
    from shared_nets.nets import MASAM  # noqa: F401

    for name in PACKAGE_NAMES:
        assert getattr(nets, name) is _new_home(f"shared_nets.nets.{name}")
    with pytest.raises(AttributeError):
        nets.DoesNotExist  # noqa: B018
    with pytest.raises(ImportError):
        importlib.import_module("shared_nets.nets.does_not_exist")


def test_unknown_name_of_a_split_module_is_an_attribute_error():
    import shared_nets.nets.common as common

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        common.nope  # noqa: B018


@pytest.mark.parametrize(
    "dotted, home",
    [
        ("shared_nets.nets.ma_sam.MultiScaleFusion", "shared_nets.ma_sam.blocks"),
        ("shared_nets.nets.common.EmbeddingCache", "shared_nets.sam.cache"),
        ("shared_nets.nets.med_sa_prompts.CheckPromptsd", "shared_nets.prompts.check"),
        ("shared_nets.nets.h_sam_data.SelectSlicesd", "shared_nets.h_sam.transforms"),
    ],
)
def test_pickling_names_the_new_module(dotted, home):
    module, _, name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert cls.__module__ == home
    data = pickle.dumps(cls)
    assert home.encode() in data and b"shared_nets.nets" not in data
    assert pickle.loads(data) is cls


def test_pickled_instance_round_trips_through_the_new_path():
    from shared_nets.nets.med_sa_prompts import ObjectLabeld

    data = pickle.dumps(ObjectLabeld("label"))
    assert b"shared_nets.med_sa.transforms" in data and b"shared_nets.nets" not in data
    assert pickle.loads(data).label_key == "label"


# tiny settings of each old network target, as a config written before the move holds them
OLD_NETWORK_DEFS = {
    "shared_nets.nets.ma_sam.MASAM": dict(variant="tiny", img_size=64, num_classes=3, patch_size=8),
    "shared_nets.nets.med_sa.MedSA": dict(variant="tiny", img_size=32, patch_size=8, max_points=4, max_depth=2),
    "shared_nets.nets.sam3d_adapter.SAM3DAdapter": dict(variant="tiny", img_size=32, sam_input_size=64, window_size=2),
    "shared_nets.nets.s_sam.SSAM": dict(variant="tiny", img_size=64, class_names=["liver", "spleen"]),
    "shared_nets.nets.h_sam.HSAM": dict(variant="tiny", img_size=64, num_classes=3),
}


@pytest.mark.parametrize("target", sorted(OLD_NETWORK_DEFS))
def test_old_network_def_builds_the_same_network(target):
    """A ``network_def`` naming the old class with flat arguments (e.g. in a MONAI Label app's copied
    inference.json) builds, through the builder, the network the new target builds: same class, same keys."""
    import torch
    from monai.bundle import ConfigParser

    from shared_nets.nets import BUILT_BY

    new_target = BUILT_BY[target.rpartition(".")[2]].replace(".builder:", ".")
    nets = []
    for t in (target, new_target):
        torch.manual_seed(0)
        nets.append(
            ConfigParser({"network_def": {"_target_": t, **OLD_NETWORK_DEFS[target]}}).get_parsed_content("network_def")
        )
    old, new = nets
    assert type(old) is type(new) and type(old).__name__ == target.rpartition(".")[2]
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert list(old_sd) == list(new_sd)
    assert all(torch.equal(old_sd[k], new_sd[k]) for k in old_sd)
