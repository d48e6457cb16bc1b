"""MedSAM's ViT-B weights load into every bundle through ``configs/medsam.json``.

MedSAM (bowang-lab/MedSAM) publishes ``medsam_vit_b.pth`` in SAM ViT-B's own key layout (its
``utils/ckpt_convert.py`` writes the fine-tuned tensors under SAM's names), so the bundles load it with
the loader they use for Meta's files: strict, with the position embedding and relative-position tables
resized to the bundle's input size. The real file is a hand download without a published checksum, so
the test writes a file of exactly that layout (full ViT-B shapes, random values from a fixed seed) and
checks that every tensor a bundle takes from SAM equals the file's, or its resized copy.

The *bundles* are made small instead of the file (a narrower file would not be ViT-B): in-plane size 64
(3DSAM-adapter: SAM at 256 for 32-voxel patches); S-SAM is built without its SVD re-parameterisation,
whose ~50 full-size SVDs of the loaded matrices take ~25 s on one thread and come after loading
(tests/nets covers them).
"""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
import torch

from shared_nets.sam import SAM_CHECKPOINTS, SamCheckpointError, build_sam, resize_pos_embed, resize_rel_pos
from tests.bundle_harness import REPO

BUNDLES = ("h_sam", "ma_sam", "med_sa", "s_sam", "sam3d_adapter")
MEDSAM = SAM_CHECKPOINTS["medsam_vit_b"]
SMALL: dict[str, dict[str, Any]] = {
    "h_sam": {"img_size": 64},
    "ma_sam": {"img_size": 64},
    "med_sa": {"img_size": 64},
    "s_sam": {"img_size": 64},
    "sam3d_adapter": {"img_size": 32, "sam_input_size": 128},
}
#: position-embedding resizing each bundle uses (S-SAM pools as its paper does)
POS_EMBED_MODE = {"s_sam": "avgpool"}
#: SAM tensors a bundle does not keep, by design: 3DSAM-adapter replaces SAM's neck, prompt encoder and mask
#: decoder with its 3D ones; MA-SAM's progressive decoder replaces SAM's output hypernetworks (by wider ones).
DROPPED = {
    "sam3d_adapter": ("image_encoder.neck.", "prompt_encoder.", "mask_decoder."),
    "ma_sam": ("mask_decoder.output_hypernetworks_mlps.",),
}
#: SAMed-style decoders with one mask token per class: rows copied from SAM's 4 tokens (``expand_mask_tokens``)
EXPANDED = ("mask_decoder.mask_tokens.weight", "mask_decoder.iou_prediction_head.layers.2.")


@pytest.fixture(scope="module")
def medsam_file(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A ``medsam_vit_b.pth`` of SAM ViT-B's layout (flat state dict, 1024-pixel shapes), random values."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_sam(MEDSAM.variant).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    path = tmp_path_factory.mktemp("medsam") / MEDSAM.file_name
    torch.save(state, path)
    return str(path), state


def _parser(bundle: str, checkpoint: str | None = None):
    from monai.bundle import ConfigParser

    folder = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(folder / "train.json"), str(folder / "medsam.json")])
    parser.read_meta(str(folder / "metadata.json"))
    parser.update({"bundle_root": str(REPO / "bundles" / bundle), "dataset_dir": "unused"})
    if checkpoint is not None:
        parser.update({"sam_checkpoint": checkpoint, **SMALL[bundle]})
        if bundle == "s_sam":  # no SVD re-parameterisation (see the module docstring)
            parser.update({"peft": "full"} if "peft" in parser else {"full_finetune": True})
    return parser


def _sam_name(key: str) -> str:
    """The SAM checkpoint key a bundle parameter comes from (wrappers and prefixes removed)."""
    key = key.replace(".base_layer.", ".")  # LoRA / FacT keep the frozen weight under base_layer
    key = key.removeprefix("sam.")
    if key.startswith("tokenizer."):  # 3DSAM-adapter: SAM's patch embedding and position embedding
        key = "image_encoder." + key.removeprefix("tokenizer.")
    if key.startswith("blocks."):  # 3DSAM-adapter: SAM's blocks made 3D
        key = "image_encoder." + key
    if key.startswith("upscaling.sam_upscaling."):  # MA-SAM: SAM's up-sampling, first stages of its progressive one
        key = "mask_decoder.output_upscaling." + key.removeprefix("upscaling.sam_upscaling.")
    return key


@pytest.mark.parametrize("bundle", BUNDLES)
def test_medsam_overlay_points_at_the_vit_b_file(bundle):
    parser = _parser(bundle)
    assert parser.get_parsed_content("variant") == MEDSAM.variant
    path = parser.get_parsed_content("sam_checkpoint")
    assert path == str(REPO / "bundles" / bundle) + "/models/" + MEDSAM.file_name
    overlay = json.loads((REPO / "bundles" / bundle / "configs" / "medsam.json").read_text())
    # MedSAM takes the image scaled to [0, 1] with no mean/std: the bundles that z-score by default switch it off
    if bundle in ("ma_sam", "med_sa"):
        assert overlay["unit_intensity"] is True


@pytest.mark.parametrize("bundle", BUNDLES)
def test_medsam_weights_load_into_bundle(bundle, medsam_file):
    path, state = medsam_file
    net = _parser(bundle, path).get_parsed_content("network_def")  # raises on any key or shape mismatch
    taken: set[str] = set()
    for name, value in net.state_dict().items():
        key = _sam_name(name)
        if key not in state:
            continue  # the method's own parameters (adapters, LoRA factors, 3D parts, ...)
        source = state[key]
        if key.endswith("pos_embed"):
            expected = resize_pos_embed(source, tuple(value.shape[1:3]), mode=POS_EMBED_MODE.get(bundle, "bicubic"))
        elif key.endswith(("rel_pos_h", "rel_pos_w")):
            expected = resize_rel_pos(source, value.shape[0])
        elif key.startswith(EXPANDED):
            rows = torch.arange(value.shape[0]) % source.shape[0]
            expected = source[rows]
        else:
            expected = source
        assert value.shape == expected.shape, f"{bundle}: {name}"
        assert torch.equal(value, expected), f"{bundle}: {name} differs from the checkpoint's {key}"
        taken.add(key)
    blocks = {f"image_encoder.blocks.{i}.attn.qkv.weight" for i in range(12)}
    assert blocks | {"image_encoder.patch_embed.proj.weight", "image_encoder.pos_embed"} <= taken
    left = sorted(k for k in set(state) - taken if not k.startswith(DROPPED.get(bundle, ())))
    assert not left, f"{bundle} does not take {left[:5]} from the checkpoint"
    del net
    gc.collect()


def test_sam_med2d_adapter_layout_is_refused_by_name(medsam_file, tmp_path):
    """SAM-Med2D's blocks add a non-linear adapter; strict loading names its keys instead of dropping them."""
    _, state = medsam_file
    path = tmp_path / "sam_med2d_like.pth"
    extra = "image_encoder.blocks.0.Adapter.channel.0.weight"
    torch.save({**state, extra: torch.zeros(192, 768)}, path)
    with pytest.raises(SamCheckpointError, match=f"unexpected keys \\['{extra}'\\]"):
        build_sam("vit_b", str(path), img_size=64)
