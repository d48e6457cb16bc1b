"""MA-SAM network: identity at init, cross-slice mixing, shapes, ablation switches, trainable sets."""

from __future__ import annotations

import pytest
import torch

from shared_nets.ma_sam import MASAM, build_ma_sam
from shared_nets.peft import trainable_parameter_report
from shared_nets.sam import build_sam

TINY = dict(variant="tiny", img_size=64, num_classes=4, fact_rank=8)


def _randomise_adapters(model: MASAM) -> None:
    with torch.no_grad():
        for adapters in (model.adapters_before, model.adapters_after):
            for a in adapters or []:
                a.up.weight.normal_(0, 0.5)


@pytest.mark.parametrize("use_3d_adapters", [False, True])
def test_fact_model_at_init_equals_plain_sam_encoder(use_3d_adapters):
    torch.manual_seed(0)
    ref = build_sam("tiny", img_size=64, num_multimask_outputs=4).image_encoder.eval()
    torch.manual_seed(0)
    model = build_ma_sam(**TINY, use_3d_adapters=use_3d_adapters).eval()
    x = torch.randn(10, 3, 64, 64)
    with torch.no_grad():
        ours, _ = model.encode(x)
        torch.testing.assert_close(ours, ref(x), atol=1e-5, rtol=0)
    # the FacT branch is live: a trained core changes the features
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fact_" in name:
                p.normal_(0, 0.5)
        assert (model.encode(x)[0] - ref(x)).abs().max() > 1e-3


@pytest.mark.parametrize("use_3d_adapters", [True, False])
def test_only_3d_adapters_mix_slices(use_3d_adapters):
    torch.manual_seed(0)
    model = build_ma_sam(**TINY, use_3d_adapters=use_3d_adapters).eval()
    _randomise_adapters(model)
    x = torch.randn(1, 1, 64, 64, 5)
    x2 = x.clone()
    x2[..., 0] += 1.0  # perturb slice 0 only
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    changed = (y[..., 1] - y2[..., 1]).abs().max().item()
    assert (changed > 1e-4) == use_3d_adapters
    assert (y[..., 0] - y2[..., 0]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["tiny", "vit_b"])
def test_output_shape_and_dtype(variant):
    model = build_ma_sam(variant=variant, img_size=64, num_classes=13, fact_rank=8).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, 64, 64, 5))
    assert y.shape == (2, 14, 64, 64, 5) and y.dtype == torch.float32
    print(f"\n{variant} @64:\n{trainable_parameter_report(model)}")


@pytest.mark.parametrize("decoder", ["progressive", "sam", "multiscale"])
@pytest.mark.parametrize("position", ["both", "before", "after"])
def test_ablation_switches_build_and_train(decoder, position):
    model = build_ma_sam(**TINY, decoder=decoder, adapter_position=position)
    y = model(torch.randn(1, 1, 64, 64, 5))
    assert y.shape == (1, 5, 64, 64, 5)
    y.logsumexp(1).mean().backward()
    # a trainable parameter in each trained part receives a gradient
    assert model.sam.mask_decoder.mask_tokens.weight.grad is not None
    assert model.sam.image_encoder.fact_factors.U.grad is not None
    adapters = model.adapters_before if position != "after" else model.adapters_after
    assert adapters[0].up.weight.grad is not None


@pytest.mark.parametrize(
    "finetune, frozen_encoder_weight_trains",
    [("fact", False), ("frozen", False), ("full", True)],
)
def test_gradients_only_where_expected(finetune, frozen_encoder_weight_trains):
    model = build_ma_sam(**TINY, finetune=finetune)
    model(torch.randn(1, 1, 64, 64, 5)).mean().backward()
    qkv = model.sam.image_encoder.blocks[0].attn.qkv
    base_weight = qkv.base_layer.weight if hasattr(qkv, "base_layer") else qkv.weight
    assert (base_weight.grad is not None) == frozen_encoder_weight_trains
    assert model.sam.image_encoder.patch_embed.proj.weight.requires_grad == frozen_encoder_weight_trains
    for p in model.parameters():
        if not p.requires_grad:
            assert p.grad is None
    has_fact = any("fact_" in n for n, _ in model.named_parameters())
    assert has_fact == (finetune == "fact")


def test_vit_b_trainable_counts_match_the_formulas():
    model = build_ma_sam(variant="vit_b", img_size=64, num_classes=13)
    named = dict(model.named_parameters())
    fact = sum(p.numel() for n, p in named.items() if "fact_" in n)
    assert fact == 2 * 768 * 32 + 12 * 2 * 32 * 32  # shared U, V + q/v cores per block
    adapters = sum(p.numel() for n, p in named.items() if n.startswith("adapters_"))
    per_adapter = 2 * 768 + 768 * 384 + (384 * 384 * 3 + 384) + 384 * 768  # norm, down, conv3d, up
    assert adapters == 24 * per_adapter
    frozen = {n for n, p in named.items() if not p.requires_grad}
    encoder_base = {n for n in named if n.startswith("sam.image_encoder.") and "fact_" not in n}
    unused = {
        n
        for n in named
        if n.startswith(
            (
                "sam.mask_decoder.iou_prediction_head.",
                "sam.prompt_encoder.mask_downscaling.",
                "sam.prompt_encoder.point_embeddings.",
                "sam.prompt_encoder.not_a_point_embed.",
            )
        )
    }
    assert frozen == encoder_base | unused  # automatic mode: no IoU loss, no click/mask prompts


def test_box_prompt_changes_the_prediction():
    torch.manual_seed(0)
    model = build_ma_sam(**TINY, use_box_prompt=True).eval()
    x = torch.randn(1, 2, 64, 64, 5)
    x[:, 1] = 0
    x_box = x.clone()
    x_box[:, 1, 10:30, 20:40, 1:4] = 1
    with torch.no_grad():
        y, y_box = model(x), model(x_box)
    assert y.shape == (1, 5, 64, 64, 5)
    assert (y[..., 2] - y_box[..., 2]).abs().max() > 1e-4  # slice crossed by the box
    torch.testing.assert_close(y[..., 0], y_box[..., 0])  # slice the box does not cross


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = build_ma_sam(**TINY, fact_dropout=0.0)
    _randomise_adapters(model)
    x = torch.randn(1, 1, 64, 64, 5)
    model.gradient_checkpointing = False
    model(x).square().mean().backward()
    g_ref = model.sam.image_encoder.fact_factors.U.grad.clone()
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x).square().mean().backward()
    torch.testing.assert_close(model.sam.image_encoder.fact_factors.U.grad, g_ref)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 1, 64, 64, 3), "expected 5 slices"),
        ((1, 2, 64, 64, 5), "expected 1 input channel"),
        ((1, 1, 48, 48, 5), "expected in-plane size 64x64"),
        ((1, 64, 64, 5), "expected a 5D input"),
    ],
)
def test_bad_input_shapes(shape, match):
    model = build_ma_sam(**TINY)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(finetune="partial"), "finetune must be one of"),
        (dict(peft="lora", finetune="full"), "contradicts finetune"),
        (dict(adapter_position="middle"), "adapter_position must be one of"),
        (dict(decoder="unet"), "decoder must be one of"),
        (dict(img_size=100), "divisible by 16"),
        (dict(num_classes=0), "num_classes must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_ma_sam(**{**TINY, **kwargs})


def test_progressive_upsampling_matches_the_official_output_upscaling():
    """cchen-cc/MA-SAM ``MA-SAM/segment_anything/modeling/mask_decoder.py``: ``output_upscaling`` is
    ConvT(256→64), LN, GELU, ConvT(64→32), LN(32), GELU, ConvT(32→16), LN, GELU, ConvT(16→8), GELU —
    a LayerNorm2d after the second transposed conv that SAM's own upscaling lacks (64 parameters)."""
    from segment_anything.modeling.common import LayerNorm2d
    from torch import nn

    model = build_ma_sam(variant="vit_b", img_size=64, num_classes=13)
    up = model.upscaling
    layers = [*up.sam_upscaling, *up.extra]
    kinds = [type(m) for m in layers]
    ct, ln, gelu = nn.ConvTranspose2d, LayerNorm2d, nn.GELU
    assert kinds == [ct, ln, gelu, ct, ln, gelu, ct, ln, gelu, ct, gelu]
    assert [m.out_channels for m in layers if isinstance(m, ct)] == [64, 32, 16, 8]
    assert [m.weight.numel() for m in layers if isinstance(m, ln)] == [64, 32, 16]
    # official total: 65,600 + 128 + 8,224 + 64 + 2,064 + 32 + 520
    assert sum(p.numel() for p in up.parameters()) == 76_632
    # the official state-dict indices 0..5 (SAM's pretrained convs at 0 and 3, the new LN at 4)
    keys = {k for k in up.sam_upscaling.state_dict()}
    assert keys == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "4.weight", "4.bias"}
    assert all(p.requires_grad for p in up.parameters())


def test_progressive_upsampling_keeps_sams_pretrained_convs():
    sam = build_sam("tiny", img_size=64, num_multimask_outputs=4, use_sdpa=True)
    ref = [p.detach().clone() for p in sam.mask_decoder.output_upscaling.parameters()]
    torch.manual_seed(0)
    model = build_ma_sam(**TINY)
    torch.manual_seed(0)
    twin = build_sam("tiny", img_size=64, num_multimask_outputs=4)
    ours = model.upscaling.sam_upscaling
    for a, b in zip([ours[0], ours[1], ours[3]], [twin.mask_decoder.output_upscaling[i] for i in (0, 1, 3)]):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb)
    assert len(ref) == 6  # SAM's own upscaling: two convs and one LN, no second LN


@pytest.mark.parametrize("autocast", [False, True])
def test_box_tokens_equal_the_prompt_encoders_own_box_embedding(autocast):
    """The box tokens come from SAM's public ``PromptEncoder.forward(boxes=...)``; they equal its private
    ``_embed_boxes`` (what the official code calls). Under autocast ``_embed_boxes`` is low precision
    (its Fourier features are an autocast matmul) while the public forward concatenates onto a float32
    tensor; the tokens that reach the decoder are float32 either way, with the same values."""
    from shared_nets.prompts import decode_boxes_2d

    torch.manual_seed(0)
    model = build_ma_sam(**TINY, use_box_prompt=True).eval()
    box = torch.zeros(1, 1, 64, 64, 5)
    box[:, 0, 10:30, 20:40, 1:4] = 1
    pe = model.sam.prompt_encoder
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        tokens, dense = model.prompt_embeddings(box, 5)
        boxes, valid = decode_boxes_2d(box)
        private = pe._embed_boxes(boxes)
    assert private.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert tokens.dtype == dense.dtype == torch.float32 and tokens.shape == (5, 2, pe.embed_dim)
    assert valid.tolist() == [False, True, True, True, False]
    torch.testing.assert_close(tokens[valid], private[valid].float(), rtol=0, atol=0)
    empty = pe.not_a_point_embed.weight.expand(2, -1)
    torch.testing.assert_close(tokens[~valid], empty.expand(2, -1, -1), rtol=0, atol=0)


def test_progressive_upsampling_stages_compose_to_the_forward():
    from shared_nets.ma_sam.blocks import ProgressiveUpsampling

    model = build_ma_sam(**TINY)
    up = model.upscaling
    assert isinstance(up, ProgressiveUpsampling) and up.num_stages == 2 and up.stage_bounds == ((0, 3), (3, 5))
    assert set(up.extra.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
    x = torch.randn(2, up.sam_upscaling[0].in_channels, 4, 4)
    with torch.no_grad():
        staged = up.run_stage(1, up.run_stage(0, up.sam_upscaling(x)))
        torch.testing.assert_close(staged, up(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"stage must be in \[0, 1\]"):
        up.run_stage(2, x)


def test_multiscale_fusion_gets_the_encoder_features_as_an_argument():
    """No side channel: the module keeps no features between calls; decoding gets them explicitly."""
    torch.manual_seed(0)
    model = build_ma_sam(**TINY, decoder="multiscale").eval()
    a, b = torch.randn(1, 1, 64, 64, 5), torch.randn(1, 1, 64, 64, 5)
    with torch.no_grad():
        ya = model(a)
        model(b)
        torch.testing.assert_close(model(a), ya, rtol=0, atol=0)
        x = torch.randn(5, 32, 4, 4)
        with pytest.raises(TypeError):
            model.upscaling(x)
        with pytest.raises(ValueError, match="stages 3, 2 and 1"):
            model.upscaling(x, features=[])
    assert not hasattr(model.upscaling, "features")


# ---------------------------------------------------------------------------- composition and builder
def test_builder_returns_masam_with_the_same_parameters_as_the_flat_constructor_had():
    """Keys and counts of ``TINY`` as the former flat ``MASAM(**TINY)`` made them (old model.pt files load)."""
    torch.manual_seed(0)
    model = build_ma_sam(**TINY)
    assert type(model) is MASAM
    params = dict(model.named_parameters())
    assert len(model.state_dict()) == 274 and len(params) == 273
    assert sum(p.numel() for p in params.values()) == 368_589
    assert sum(p.numel() for p in params.values() if p.requires_grad) == 101_916
    parts = {k.split(".")[0] for k in model.state_dict()}
    assert parts == {"sam", "adapters_before", "adapters_after", "upscaling", "hypernetworks"}
    assert model.decoder_type == "progressive" and model.stage_blocks == ()


def test_masam_composes_from_hand_built_parts_like_the_builder():
    """SAM's own decoder and no adapters: the parts are plain SAM, and one seed gives the builder's network."""
    from shared_nets.peft import Adapter3D

    settings = dict(variant="tiny", img_size=64, num_classes=4, use_3d_adapters=False, decoder="sam", finetune="frozen")
    torch.manual_seed(0)
    built = build_ma_sam(**settings).eval()
    torch.manual_seed(0)
    sam = build_sam("tiny", img_size=64, num_multimask_outputs=4, use_sdpa=True)
    composed = MASAM(sam, None, None, None, None, img_size=64, num_classes=4, finetune="frozen").eval()
    assert composed.decoder_type == "sam" and composed.adapters_before is None
    a, b = built.state_dict(), composed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {n: p.requires_grad for n, p in built.named_parameters()} == {
        n: p.requires_grad for n, p in composed.named_parameters()
    }
    x = torch.randn(1, 1, 64, 64, 5)
    with torch.no_grad():
        assert torch.equal(built(x), composed(x))
    # adapters: one per encoder block, or a clear error
    widths = [blk.norm1.normalized_shape[0] for blk in sam.image_encoder.blocks]
    with pytest.raises(ValueError, match=r"adapters_before must hold one adapter per encoder block"):
        MASAM(sam, torch.nn.ModuleList([Adapter3D(widths[0], 8)]), None, None, None, img_size=64, num_classes=4)
    with pytest.raises(ValueError, match="upscaling and hypernetworks must be given together"):
        MASAM(sam, None, None, torch.nn.Identity(), None, img_size=64, num_classes=4)
