"""S-SAM network and label-name embeddings: identity at init, exact trainable counts, decoder parity, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from shared_nets.peft import SVDConv2d, SVDLinear, trainable_parameter_report
from shared_nets.s_sam import SSAM, TextAffineLayer, build_s_sam
from shared_nets.s_sam.text import (
    ClipTextEncoder,
    HashTextEncoder,
    add_text_embeddings,
    load_class_embeddings,
    read_text_embeddings,
)
from shared_nets.sam import build_sam, get_variant

CLASSES = ["spleen", "liver", "aorta"]
TINY = dict(variant="tiny", img_size=64, class_names=CLASSES)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny SAM saved at 128 px, so loading at 64 px average-pools its 8x8 position embedding."""
    torch.manual_seed(0)
    sam = build_sam("tiny", img_size=128)
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict()


@pytest.fixture(scope="module")
def embedding_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text_embeddings.json"
    add_text_embeddings(str(path), CLASSES + ["kidney"], encoder="hash")
    return path


def test_output_contract_and_background_channel():
    model = build_s_sam(**TINY).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, 64, 64, 3))
    assert y.shape == (2, 4, 64, 64, 3)
    assert torch.all(y[:, 0] == 0)
    assert y[:, 1:].abs().amax() > 0


@pytest.mark.parametrize(
    "mode, expected",
    [
        # ViT-B at 256, trainable set of the paper vs. the official code (bundles/s_sam/docs/README.md table)
        (
            "paper",
            dict(
                pos_embed=196_608,
                svd_blocks=73_728,
                svd_neck=1_024,
                encoder_norms=36_864,
                tal=131_328,
                decoder_norms=0,
                total=439_552,
            ),
        ),
        (
            "official",
            dict(
                pos_embed=196_608,
                svd_blocks=73_728,
                svd_neck=1_024,
                encoder_norms=36_864,
                tal=131_840,
                decoder_norms=4_608,
                total=444_672,
            ),
        ),
    ],
)
def test_vit_b_trainable_parameter_counts_are_exact(mode, expected):
    with torch.device("meta"):  # shapes only: no weights, no real SVD
        model = build_s_sam(variant="vit_b", img_size=256, class_names=CLASSES, mode=mode)
    counts = model.trainable_parameter_counts()
    assert {k: counts[k] for k in expected} == expected
    assert counts["other"] == 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected["total"]
    # the paper's "0.4 % of SAM's parameters" (SAM ViT-B without our SVD buffers)
    report = trainable_parameter_report(model)
    assert report.trainable == expected["total"]
    sam_total = sum(p.numel() for n, p in model.sam.named_parameters() if not n.endswith((".scale", ".shift")))
    assert 0.004 < expected["total"] / sam_total < 0.005


def test_encoder_at_init_equals_sam_and_position_embedding_is_avg_pooled(tiny_checkpoint):
    path, state = tiny_checkpoint
    model = build_s_sam(**TINY, checkpoint=str(path)).eval()
    tiny_global = dataclasses.replace(get_variant("tiny"), global_attn_indexes=(0, 1, 2, 3))
    ref = build_sam(tiny_global, checkpoint=str(path), img_size=64, pos_embed_mode="avgpool").image_encoder.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.sam.image_encoder(x), ref(x), atol=1e-5, rtol=0)
    pooled = F.avg_pool2d(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(model.sam.image_encoder.pos_embed.detach(), pooled)
    # every targeted layer is re-parameterised, and the singular values are live
    assert sum(isinstance(m, SVDLinear) for m in model.modules()) == 4 * 4
    assert sum(isinstance(m, SVDConv2d) for m in model.modules()) == 2
    with torch.no_grad():
        model.svd_layers[0].shift.add_(0.5)
        assert (model.sam.image_encoder(x) - ref(x)).abs().amax() > 1e-3


def test_all_blocks_global_by_default_and_windowed_on_request():
    assert all(b.window_size == 0 for b in build_s_sam(**TINY).sam.image_encoder.blocks)
    windowed = build_s_sam(**TINY, global_attention=False).sam.image_encoder.blocks
    assert [b.window_size for b in windowed] == [4, 0, 4, 0]


def test_official_mode_switches():
    model = build_s_sam(**TINY, mode="official")
    assert isinstance(model.tal.norm, torch.nn.BatchNorm1d)
    assert not any(b.attn.use_rel_pos for b in model.sam.image_encoder.blocks)
    dec_norms = [m for m in model.sam.mask_decoder.transformer.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert dec_norms and all(p.requires_grad for m in dec_norms for p in m.parameters())
    paper = build_s_sam(**TINY)
    assert isinstance(paper.tal.norm, torch.nn.Identity)
    assert all(b.attn.use_rel_pos for b in paper.sam.image_encoder.blocks)
    # each switch can also be set on its own
    mixed = build_s_sam(**TINY, mode="official", tal="linear", use_rel_pos=True, train_decoder_norms=False)
    assert mixed.trainable_parameter_counts() == paper.trainable_parameter_counts()


def test_official_mode_has_no_relative_position_tables():
    """JayParanjape/SVDSAM ``model.py`` builds ``ImageEncoderViT`` with ``use_rel_pos=False``: no tables exist
    (ViT-B at 256: 12 blocks x 2 x (2*16-1) x 64 = 47,616 parameters fewer than with SAM's tables)."""
    with torch.device("meta"):
        official = build_s_sam(variant="vit_b", img_size=256, class_names=CLASSES, mode="official")
        paper = build_s_sam(variant="vit_b", img_size=256, class_names=CLASSES, mode="paper")
    assert not any("rel_pos" in k for k in official.state_dict())
    assert sum("rel_pos" in k for k in paper.state_dict()) == 24
    n_official = sum(p.numel() for p in official.parameters())
    n_paper = sum(p.numel() for p in paper.parameters())
    tal_extra = 256 * 2  # the official TAL's BatchNorm1d affine parameters
    assert n_paper - (n_official - tal_extra) == 47_616


def test_official_mode_loads_a_sam_checkpoint_and_runs(tiny_checkpoint):
    path, _ = tiny_checkpoint
    model = build_s_sam(**TINY, mode="official", checkpoint=str(path)).eval()
    assert not any("rel_pos" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        y = model(torch.randn(1, 1, 64, 64, 2))
    assert y.shape == (1, 4, 64, 64, 2) and torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs", [{}, {"mode": "official"}, {"full_finetune": True}])
def test_gradients_reach_exactly_the_trainable_set(kwargs):
    model = build_s_sam(**TINY, **kwargs)
    y = model(torch.randn(2, 1, 64, 64, 1))
    (y[:, 1:] ** 2).mean().backward()
    for name, p in model.named_parameters():  # every trainable parameter is used (DDP needs it)
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    if kwargs:
        return
    assert model.svd_layers[0].scale.grad.abs().sum() > 0 and model.svd_layers[0].shift.grad.abs().sum() > 0
    assert model.tal.linear.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.sam.mask_decoder.parameters())
    assert not any(p.requires_grad for p in model.sam.prompt_encoder.parameters())


@pytest.mark.parametrize(
    "switches, gone",
    [
        (dict(svd_scale=False), dict(svd_blocks=1024, svd_neck=64)),
        (dict(svd_shift=False), dict(svd_blocks=1024, svd_neck=64)),
        (dict(svd_scale=False, svd_shift=False), dict(svd_blocks=2048, svd_neck=128)),
        (dict(train_pos_embed=False), dict(pos_embed=1024)),
        (dict(train_norms=False), dict(encoder_norms=1024)),
        (dict(use_tal=False), dict(tal=512 * 32 + 32)),
    ],
)
def test_table3_ablation_switches(switches, gone):
    full = build_s_sam(**TINY).trainable_parameter_counts()
    counts = build_s_sam(**TINY, **switches).trainable_parameter_counts()
    for key, n in gone.items():
        assert full[key] - counts[key] == n
    assert full["total"] - counts["total"] == sum(gone.values())


def test_without_tal_the_token_is_the_truncated_text_embedding():
    model = build_s_sam(**TINY, use_tal=False)
    assert model.tal is None
    torch.testing.assert_close(model.class_prompts(), model.text_embeddings[:, :32])


def test_full_finetune_trains_encoder_decoder_and_tal_without_svd():
    model = build_s_sam(**TINY, full_finetune=True)
    assert model.svd_layers == [] and not any(isinstance(m, SVDLinear) for m in model.modules())
    for part in (model.sam.image_encoder, model.sam.mask_decoder.transformer, model.tal):
        assert all(p.requires_grad for p in part.parameters())
    assert not any(p.requires_grad for p in model.sam.mask_decoder.iou_prediction_head.parameters())


def test_decoder_matches_stock_sam_decoder_per_image_and_class():
    torch.manual_seed(0)
    model = build_s_sam(**TINY).eval()
    emb = torch.randn(2, 32, 4, 4)
    prompts = torch.randn(3, 32)
    with torch.no_grad():
        ours = model.decode(emb, prompts)
        pe = model.sam.prompt_encoder
        sparse0, dense = pe(points=None, boxes=None, masks=None)
        for n in range(2):
            for k in range(3):
                sparse = torch.cat([sparse0, prompts[k].reshape(1, 1, -1)], dim=1)
                ref, _ = model.sam.mask_decoder(
                    emb[n : n + 1], pe.get_dense_pe(), sparse, dense, multimask_output=False
                )
                torch.testing.assert_close(ours[n, k], ref[0, 0], atol=1e-5, rtol=1e-5)


def test_subset_of_classes_gives_the_same_logits(embedding_file):
    torch.manual_seed(0)
    full = build_s_sam(**TINY, text_embeddings=str(embedding_file)).eval()
    subset = build_s_sam(
        variant="tiny", img_size=64, class_names=["Aorta", "spleen"], text_embeddings=str(embedding_file)
    ).eval()
    subset.load_state_dict(full.state_dict())
    x = torch.randn(1, 1, 64, 64, 2)
    with torch.no_grad():
        a, b = full(x), subset(x)
    assert b.shape[1] == 3
    torch.testing.assert_close(b[:, 1], a[:, 3])  # aorta
    torch.testing.assert_close(b[:, 2], a[:, 1])  # spleen


def test_state_dict_does_not_depend_on_the_class_list():
    keys = set(build_s_sam(**TINY).state_dict())
    assert keys == set(build_s_sam(variant="tiny", img_size=64, class_names=["kidney"]).state_dict())
    assert not any("text_embeddings" in k for k in keys)


def test_in_plane_size_mismatch_is_an_error_unless_resizing_is_requested():
    with pytest.raises(ValueError, match=r"in-plane size \(48, 48\) must equal img_size=64"):
        build_s_sam(**TINY)(torch.randn(1, 1, 48, 48, 1))
    model = build_s_sam(**TINY, resize_input=True).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, 48, 40, 2))
    assert y.shape == (1, 4, 48, 40, 2)


@pytest.mark.parametrize(
    "shape, match",
    [((1, 1, 64, 64), "5D input"), ((1, 2, 64, 64, 1), "1 \\(grey\\) or 3 \\(RGB\\)")],
)
def test_bad_input_tensors(shape, match):
    with pytest.raises(ValueError, match=match):
        build_s_sam(**TINY)(torch.randn(*shape))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="svd"), "mode must be one of"),
        (dict(tal="mlp"), "tal must be one of"),
        (dict(class_names=[]), "class_names must be a non-empty list"),
        (dict(class_names="liver"), "class_names must be a non-empty list"),
        (dict(svd_scale="yes"), "svd_scale must be true or false"),
        (dict(img_size=60), "img_size must be a positive integer divisible by 16"),
        (dict(use_tal=False, text_dim=16), "text_dim=16 is smaller"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_s_sam(**{**TINY, **kwargs})


def test_unknown_class_name_names_the_class_and_the_file(embedding_file):
    with pytest.raises(ValueError, match=r"\['gallbladder'\] have no embedding in '.*text_embeddings.json'.*add them"):
        build_s_sam(
            variant="tiny", img_size=64, class_names=["liver", "gallbladder"], text_embeddings=str(embedding_file)
        )


def test_embedding_file_of_the_wrong_width_is_an_error(tmp_path):
    path = tmp_path / "narrow.json"
    add_text_embeddings(str(path), CLASSES, encoder="hash", dim=256)
    with pytest.raises(ValueError, match=r"holds 256-d vectors, the network expects text_dim=512"):
        build_s_sam(**TINY, text_embeddings=str(path))
    broken = tmp_path / "broken.json"
    obj = json.loads(path.read_text())
    obj["embeddings"]["liver"] = obj["embeddings"]["liver"][:10]
    broken.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"vector of 'liver' must be a list of 256 numbers"):
        read_text_embeddings(broken)
    with pytest.raises(ValueError, match=r"'.*missing.json' does not exist"):
        load_class_embeddings(tmp_path / "missing.json", CLASSES)


def test_batchnorm_tal_needs_two_classes_in_training():
    model = build_s_sam(variant="tiny", img_size=64, class_names=["liver"], mode="official")
    with pytest.raises(ValueError, match="needs at least 2 classes in training"):
        model(torch.randn(1, 1, 64, 64, 1))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64, 1)).shape == (1, 2, 64, 64, 1)
    assert TextAffineLayer(512, 32, "linear")(torch.randn(1, 512)).shape == (1, 32)


def test_hash_encoder_is_deterministic_and_name_normalised():
    enc = HashTextEncoder(512)
    a = enc(["Right  Kidney", "liver"])
    b = enc(["right kidney", "LIVER"])
    assert a.shape == (2, 512)
    torch.testing.assert_close(a, b)
    assert (a[0] - a[1]).abs().amax() > 0.1


def test_adding_names_keeps_the_others_and_refuses_mixed_encoders(tmp_path):
    path = tmp_path / "emb.json"
    assert add_text_embeddings(str(path), ["liver", "spleen"], encoder="hash") == ["liver", "spleen"]
    before = load_class_embeddings(path, ["liver"])
    assert add_text_embeddings(str(path), "stomach, Liver", encoder="hash") == ["spleen", "stomach", "Liver"]
    torch.testing.assert_close(load_class_embeddings(path, ["liver"]), before)
    table, info = read_text_embeddings(path)
    assert info["encoder"] == "hash" and info["dim"] == 512 and set(table) == {"liver", "spleen", "stomach"}
    obj = json.loads(path.read_text())
    obj["encoder"] = "clip:ViT-B-32:openai"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="was written by encoder 'clip:ViT-B-32:openai', not 'hash'"):
        add_text_embeddings(str(path), ["aorta"], encoder="hash")


def test_clip_encoder_fails_clearly_offline():
    # open_clip is an optional extra; either it is missing or its weights cannot be downloaded here
    with pytest.raises(RuntimeError, match=r"open_clip_torch|could not load CLIP 'ViT-B-32'"):
        ClipTextEncoder(pretrained="/nonexistent/open_clip_pytorch_model.bin")


def test_building_and_loading_a_trained_model_does_no_svd(monkeypatch):
    """The SVD is deferred to first use: a trained state dict (with U, S, Vh) replaces it, so
    inference and MONAI Label loads never decompose; the outputs equal the trained model's."""
    torch.manual_seed(0)
    trained = build_s_sam(**TINY).eval()
    with torch.no_grad():
        for layer in trained.svd_layers:
            layer.shift.add_(0.3 * torch.randn_like(layer.shift))
    state = trained.state_dict()  # decomposes the trained model's base weights
    x = torch.randn(1, 1, 64, 64, 2)
    with torch.no_grad():
        expected = trained(x)

    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    torch.manual_seed(1)  # different random base weights
    model = build_s_sam(**TINY).eval()
    assert calls == [] and all(layer.svd_pending for layer in model.svd_layers)
    model.load_state_dict(state)
    with torch.no_grad():
        out = model(x)
    assert calls == []
    assert torch.equal(out, expected)

    # training from base weights: each wrapped layer decomposes once, at first use
    fresh = build_s_sam(**TINY)
    assert calls == []
    fresh(x).mean().backward()
    fresh(x)
    assert len(calls) == len(fresh.svd_layers) == 4 * 4 + 2


# ---------------------------------------------------------------------------- composition and builder
def test_builder_returns_ssam_with_the_same_parameters_as_the_flat_constructor_had():
    """Keys and counts of ``TINY`` as the former flat ``SSAM(**TINY)`` made them (old model.pt files load)."""
    model = build_s_sam(**TINY)
    assert type(model) is SSAM
    params = dict(model.named_parameters())
    assert len(model.state_dict()) == 294 and len(params) == 239
    assert sum(p.numel() for p in params.values()) == 323_628
    assert model.trainable_parameter_counts()["total"] == 20_640
    assert len(model.svd_layers) == 4 * len(model.sam.image_encoder.blocks) + 2  # qkv, proj, lin1, lin2; neck convs


def test_ssam_composes_from_hand_built_parts():
    """Plain SAM + hash text vectors + a TAL: the constructor leaves requires_grad alone; set_trainable sets it."""
    names = ["liver", "spleen"]
    torch.manual_seed(0)
    sam = build_sam("tiny", img_size=64)
    text = HashTextEncoder(512)(names)
    prompt_dim = sam.prompt_encoder.embed_dim
    model = SSAM(sam, text, names, TextAffineLayer(512, prompt_dim), img_size=64).eval()
    assert model.svd_layers == [] and model.use_tal and model.text_dim == 512
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        y = model(torch.randn(1, 1, 64, 64, 2))
    assert y.shape == (1, 3, 64, 64, 2) and torch.all(y[:, 0] == 0)
    model.set_trainable()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"sam", "tal"} and not model.sam.mask_decoder.transformer.layers[0].norm1.weight.requires_grad
    with pytest.raises(ValueError, match=r"text_embeddings must be \[len\(class_names\)=2, text_dim\]"):
        SSAM(sam, text[:1], names, None, img_size=64)
    with pytest.raises(ValueError, match=f"use_tal=false feeds the first {prompt_dim} text entries"):
        SSAM(sam, text[:, : prompt_dim - 1], names, None, img_size=64)
