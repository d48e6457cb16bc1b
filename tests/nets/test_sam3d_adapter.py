"""shared_nets.sam3d_adapter.network: shapes, the published trainable-parameter counts, parity with SAM's
attention, identity at init, gradients, prompts and the errors for bad input."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention as SamAttention

from shared_nets.peft import trainable_parameter_report
from shared_nets.sam import build_sam, get_variant
from shared_nets.sam3d_adapter import build_sam3d_adapter
from shared_nets.sam3d_adapter.encoder import (
    Block3D,
    Neck3D,
    SpatialAdapter3D,
    VolumeTokenizer,
    WindowAttention3D,
    shifted_window_regions,
    window_partition_3d,
    window_unpartition_3d,
)
from shared_nets.sam3d_adapter.heads import MultiLevelDecoder3D, PromptEncoder3D
from shared_nets.sam3d_adapter.network import SAM3DAdapter

# tiny SAM, 32^3 patch resized to 64^3 -> a 4^3 token grid, 2^3 windows (shifted on even blocks)
TINY = dict(variant="tiny", img_size=32, sam_input_size=64, window_size=2)
S = 32


def _n(module: torch.nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _guided(batch: int = 2, clicks=((0, (10, 12, 14)),), negatives=(), size=(S, S, S), channels: int = 1):
    torch.manual_seed(1)
    x = torch.zeros(batch, channels + 2, *size)
    x[:, :channels] = torch.randn(batch, channels, *size)
    for b in range(batch):
        for c, (i, j, k) in clicks:
            x[b, channels + c, i, j, k] = 1
        for i, j, k in negatives:
            x[b, channels + 1, i, j, k] = 1
    return x


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_sam3d_adapter(**TINY)


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "kwargs, channels, size",
    [
        ({}, 1, (S, S, S)),
        ({"in_channels": 3}, 3, (S, S, S)),
        ({"prompt_layer": "official"}, 1, (S, S, S)),
        ({"prompt_encoder": "positional_encoding"}, 1, (S, S, S)),
        ({"prompt_levels": [1, 2, 3, 4], "use_point_labels": True}, 1, (S, S, S)),
        ({"use_multi_level": False, "num_classes": 3}, 1, (S, S, S)),
        ({"img_size": [S, S, 16]}, 1, (S, S, 16)),  # non-cubic patch the tokeniser can take
        ({"patch_size": 8}, 1, (S, S, S)),  # finer grid for CPU demos: 8^3 tokens
    ],
)
def test_prompted_shapes(kwargs, channels, size):
    net = build_sam3d_adapter(**{**TINY, **kwargs})
    x = _guided(2, clicks=((0, (3, 4, 5)),), negatives=[(20, 20, 10)], size=size, channels=channels)
    y = net(x)
    assert y.shape == (2, kwargs.get("num_classes", 2), *size)
    assert torch.isfinite(y).all()


def test_automatic_mode_takes_the_image_only():
    net = build_sam3d_adapter(**TINY, prompt_encoder="none")
    assert len(net.prompt_encoders) == 0 and net.expected_channels == 1
    assert net(torch.randn(1, 1, S, S, S)).shape == (1, 2, S, S, S)


def test_token_grid_follows_the_official_geometry():
    """A 128^3 patch at 512 gives 32^3 tokens (ViT-B default); a 256^3 automatic patch too."""
    assert SAM3DAdapter._token_grid((128, 128, 128), 512, 8) == ((32, 32, 32), (512, 512, 512))
    assert SAM3DAdapter._token_grid((256, 256, 256), 512, 8) == ((32, 32, 32), (512, 512, 512))
    assert SAM3DAdapter._token_grid((128, 128, 64), 512, 8) == ((32, 32, 16), (512, 512, 256))
    assert SAM3DAdapter._token_grid((32, 32, 32), 64, 4, 8) == ((8, 8, 8), (64, 64, 64))


# ---------------------------------------------------------------------------- composition from parts


def _parts(levels=(1, 2, 3, 4), prompt_levels=(4,), zero_init=True):
    """TINY's parts built by hand around a tiny SAM, in the builder's order (SAM, tokenizer, blocks with
    their adapters, necks, prompt encoders, decoder)."""
    v = get_variant("tiny")
    enc = build_sam(v, None, img_size=128).image_encoder  # SAM at twice sam_input_size
    grid, resized = SAM3DAdapter._token_grid((S, S, S), 64, 2)
    tokenizer = VolumeTokenizer(enc.patch_embed, enc.pos_embed, grid, resized)
    dim, out = v.encoder_embed_dim, v.prompt_embed_dim
    blocks = [
        Block3D(b, grid, 2, shift=1 if i % 2 == 0 else 0, adapter=SpatialAdapter3D(dim, dim // 2, zero_init=zero_init))
        for i, b in enumerate(enc.blocks)
    ]
    necks = {k: Neck3D(dim, out) for k in levels}
    prompts = {k: PromptEncoder3D(out, v.decoder_num_heads, v.decoder_mlp_dim) for k in prompt_levels}
    decoder = MultiLevelDecoder3D(out, out // 2, 2, num_levels=len(levels))
    return tokenizer, blocks, necks, decoder, prompts


def test_network_composed_from_parts_equals_the_builder():
    """The builder only builds the parts and composes them: the same seed gives the same weights, trainable
    set and output as parts built by hand in the same order."""
    torch.manual_seed(0)
    built = build_sam3d_adapter(**TINY, adapter_zero_init=False)
    assert type(built) is SAM3DAdapter
    torch.manual_seed(0)
    composed = SAM3DAdapter(*_parts(zero_init=False), img_size=S, variant="tiny")
    assert all(p.requires_grad for p in composed.parameters())  # the constructor freezes nothing
    composed.set_trainable()
    a, b = built.state_dict(), composed.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [(n, p.requires_grad) for n, p in built.named_parameters()] == [
        (n, p.requires_grad) for n, p in composed.named_parameters()
    ]
    x = _guided(1, negatives=[(1, 2, 3)])
    with torch.no_grad():
        assert torch.equal(built(x), composed(x))
    assert composed.decoded_levels == [1, 2, 3, 4] and composed.prompt_levels == [4] and composed.taps == [1, 2, 3, 4]
    assert composed.prompt_mode == "visual_sampler" and composed.num_classes == 2 and composed.grid == (4, 4, 4)


def test_automatic_network_from_parts():
    """No prompt encoders: automatic mode, image channels only; the bottleneck alone can be decoded."""
    net = SAM3DAdapter(*_parts(levels=(4,), prompt_levels=())[:4], img_size=S)
    assert not net.prompted and net.prompt_mode == "none" and net.decoded_levels == [4]
    assert net(torch.randn(1, 1, S, S, S)).shape == (1, 2, S, S, S)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(img_size=[S, S, S // 2]), "the tokenizer was built for"),
        (dict(necks={1: None, 4: None}), "one per decoder level"),
        (dict(necks={k: None for k in (0, 1, 2, 3)}), "distinct levels 1-4"),
        (dict(prompts={5: None}), "must be among the necks' levels"),
        (dict(blocks=3), "at least 4 blocks"),
        (dict(in_channels=2), "in_channels"),
        (dict(no_positive="skip"), "no_positive must be one of"),
    ],
)
def test_parts_that_do_not_fit_are_refused(change, match):
    tokenizer, blocks, necks, decoder, prompts = _parts()
    necks = change.get("necks", necks)
    blocks = blocks[: change["blocks"]] if "blocks" in change else blocks
    extra = {k: v for k, v in change.items() if k in ("in_channels", "no_positive")}
    with pytest.raises(ValueError, match=match):
        SAM3DAdapter(
            tokenizer,
            blocks,
            necks,
            decoder,
            change.get("prompts", prompts),
            img_size=change.get("img_size", S),
            **extra,
        )


# ---------------------------------------------------------------------------- parameter counts


def _meta(**kwargs) -> SAM3DAdapter:
    with torch.device("meta"):
        return build_sam3d_adapter(variant="vit_b", **kwargs)


def test_vit_b_trainable_parameters_match_the_paper():
    """Poster: 25.46M tuned; the official model's forward-pass modules hold exactly 25,462,400."""
    net = _meta()
    rows = {r.name: r.trainable for r in trainable_parameter_report(net).rows}
    assert rows["tokenizer"] + rows["blocks"] + rows["necks"] == 15_209_984  # image encoder (poster: 15.21M)
    assert rows["prompt_encoders"] == 3_164_160
    assert rows["decoder"] == 7_088_256
    assert trainable_parameter_report(net).trainable == 25_462_400
    # per block: norms 3,072 + adapter 601,728; depth tables 27x64 (windowed) or 127x64 (global)
    assert _n(net.blocks[0]) == 3_072 + 601_728 + 27 * 64
    assert _n(net.blocks[2]) == 3_072 + 601_728 + 127 * 64


def test_vit_b_other_modes_counts():
    assert trainable_parameter_report(_meta(prompt_encoder="none")).trainable == 22_298_240  # poster: ~22.3M
    # the released prompt layer never calls its tokens-to-image attention: we do not build it
    assert trainable_parameter_report(_meta(prompt_layer="official")).trainable == 25_462_400 - 2 * 131_712
    full = trainable_parameter_report(_meta(full_finetune=True))
    assert full.trainable == full.total


# ---------------------------------------------------------------------------- building blocks


def test_window_partition_roundtrip_and_shift_regions():
    x = torch.randn(2, 4, 4, 6, 5)
    w = window_partition_3d(x, 2)
    assert w.shape == (2 * 2 * 2 * 3, 8, 5)
    assert torch.equal(window_unpartition_3d(w, 2, (4, 4, 6)), x)
    ids = shifted_window_regions((4, 4, 4), 2, 1)
    assert ids.shape == (8, 8)
    assert ids[0].unique().numel() == 1  # interior window: one region
    assert ids[-1].unique().numel() == 8  # corner window: tokens wrapped from 8 octants


def test_window_attention_with_one_slice_equals_sams_2d_attention():
    """With depth 1 the depth term is constant per query: softmax-invariant, so SAM's 2D attention."""
    torch.manual_seed(0)
    sam_attn = SamAttention(16, num_heads=2, use_rel_pos=True, input_size=(4, 4))
    with torch.no_grad():
        sam_attn.rel_pos_h.normal_()
        sam_attn.rel_pos_w.normal_()
    attn3d = WindowAttention3D(sam_attn)
    assert attn3d.qkv is sam_attn.qkv and attn3d.rel_pos_h is sam_attn.rel_pos_h
    assert torch.allclose(attn3d.rel_pos_d, 0.5 * (sam_attn.rel_pos_h + sam_attn.rel_pos_w))
    x = torch.randn(3, 4, 4, 16)
    assert torch.allclose(attn3d(x[:, :, :, None]).squeeze(3), sam_attn(x), atol=1e-5)


def test_adapter_identity_at_init_and_trains():
    torch.manual_seed(0)
    ad = SpatialAdapter3D(8, 4)
    x = torch.randn(1, 3, 3, 3, 8, requires_grad=True)
    y = ad(x)
    assert torch.equal(y, x)
    y.square().sum().backward()
    assert ad.up.weight.grad.abs().sum() > 0  # gradient reaches the zero-initialised projection
    official = SpatialAdapter3D(8, 4, final_relu=True, zero_init=False)
    assert not torch.equal(official(x), x)
    with pytest.raises(ValueError, match="final_relu"):
        SpatialAdapter3D(8, 4, final_relu=True, zero_init=True)


def test_blocks_start_as_the_frozen_sam_block(tiny):
    """Zero-initialised adapters: each block is exactly SAM's block run on 3D windows."""
    blk = tiny.blocks[1]  # unshifted
    x = torch.randn(1, *tiny.grid, 64)
    with torch.no_grad():
        assert torch.equal(blk.adapter(x), x)


def test_tokenizer_starts_from_sams_slice_embedding():
    """``slice_embed_init="mean"``: a volume of identical slices gives SAM's 2D patch tokens + position."""
    net = build_sam3d_adapter(**TINY)
    sl = torch.randn(1, 3, S, S)
    vol = sl[..., None].expand(-1, -1, -1, -1, S)
    with torch.no_grad():
        tok = net.tokenizer(vol)
        ref = net.tokenizer.patch_embed(torch.nn.functional.interpolate(sl, size=(64, 64), mode="bilinear"))
        pos = torch.nn.functional.avg_pool2d(net.tokenizer.pos_embed.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert tok.shape == (1, 4, 4, 4, 64)
    assert torch.allclose(tok, (ref + pos)[:, :, :, None].expand_as(tok), atol=1e-4)


# ---------------------------------------------------------------------------- checkpoint, freezing, gradients


def test_sam_checkpoint_loads_before_the_3d_parts(tmp_path):
    torch.manual_seed(0)
    sam = build_sam("tiny", img_size=256)
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    net = build_sam3d_adapter(**TINY, checkpoint=str(path))
    sd = sam.state_dict()
    assert torch.equal(net.blocks[0].attn.qkv.weight, sd["image_encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(net.tokenizer.patch_embed.proj.weight, sd["image_encoder.patch_embed.proj.weight"])
    h, w = sd["image_encoder.blocks.0.attn.rel_pos_h"], sd["image_encoder.blocks.0.attn.rel_pos_w"]
    assert torch.allclose(net.blocks[0].attn.rel_pos_d, 0.5 * (h + w))
    with pytest.raises(ValueError, match="does not exist"):
        build_sam3d_adapter(**TINY, checkpoint=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("prompt_layer", ["two_way", "official"])
def test_gradients_reach_exactly_the_trainable_parameters(prompt_layer):
    torch.manual_seed(0)
    net = build_sam3d_adapter(**TINY, prompt_layer=prompt_layer, adapter_zero_init=False)
    net(_guided(1, negatives=[(1, 2, 3)])).square().mean().backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert "blocks.0.attn.qkv.weight" in frozen and "tokenizer.pos_embed" in frozen
    assert "blocks.0.attn.rel_pos_h" in frozen and "blocks.0.attn.rel_pos_d" not in frozen


def test_full_finetune_trains_everything():
    net = build_sam3d_adapter(**TINY, full_finetune=True)
    assert all(p.requires_grad for p in net.parameters())
    net(_guided(1)).mean().backward()
    assert net.tokenizer.patch_embed.proj.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_result():
    torch.manual_seed(0)
    a = build_sam3d_adapter(**TINY, adapter_zero_init=False)
    b = build_sam3d_adapter(**TINY, adapter_zero_init=False, use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = _guided(1)
    ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, atol=1e-5)
    ya.sum().backward()
    yb.sum().backward()
    ga, gb = a.blocks[0].adapter.down.weight.grad, b.blocks[0].adapter.down.weight.grad
    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- prompts


def test_clicks_change_the_output(tiny):
    with torch.no_grad():
        y1 = tiny(_guided(1, clicks=((0, (4, 4, 4)),)))
        y2 = tiny(_guided(1, clicks=((0, (28, 28, 28)),)))
    assert not torch.allclose(y1, y2)


def test_visual_sampler_ignores_click_labels_by_default(tiny):
    """The method samples features at every click; the label does not enter (official behaviour)."""
    pos_neg = _guided(1, clicks=((0, (4, 4, 4)), (1, (20, 21, 22))))
    pos_pos = _guided(1, clicks=((0, (4, 4, 4)), (0, (20, 21, 22))))
    with torch.no_grad():
        assert torch.allclose(tiny(pos_neg), tiny(pos_pos), atol=1e-5)


def test_forward_points_matches_guidance_channels(tiny):
    x = _guided(1, clicks=((0, (7, 8, 9)),))
    coords = torch.tensor([[[7.0, 8.0, 9.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, -1]])
    with torch.no_grad():
        assert torch.allclose(tiny(x), tiny.forward_points(x[:, :1], coords, labels), atol=1e-6)


def test_image_embedding_cache_reused_for_new_clicks():
    net = build_sam3d_adapter(**TINY, cache_image_embedding=True).eval()
    calls = []
    net.tokenizer.register_forward_hook(lambda *a: calls.append(1))
    x1 = _guided(1, clicks=((0, (4, 4, 4)),))
    x2 = x1.clone()
    x2[:, 1:] = 0
    x2[0, 1, 20, 20, 20] = 1
    with torch.no_grad():
        y2_cached = (net(x1), net(x2))[1]
    assert len(calls) == 1
    net.cache_image_embedding = False
    with torch.no_grad():
        assert torch.allclose(net(x2), y2_cached, atol=1e-5)  # the cached decoder part sums in another order
    assert len(calls) == 2


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"img_size": [32, 16, 32]}, "H == W"),
        ({"img_size": [32, 32, 12]}, "depth D"),
        ({"img_size": 0}, "positive integers"),
        ({"sam_input_size": 60}, "sam_input_size must be a positive multiple of 32"),
        ({"variant": "vit_x"}, "variant must be one of"),
        ({"in_channels": 2}, "in_channels"),
        ({"prompt_encoder": "box"}, "prompt_encoder must be one of"),
        ({"prompt_layer": "one_way"}, "prompt_layer must be one of"),
        ({"prompt_levels": [0]}, "prompt_levels"),
        ({"prompt_levels": [2], "use_multi_level": False}, "level 4 only"),
        ({"depth_embed_init": "random"}, "depth_embed_init"),
        ({"num_classes": 0}, "num_classes"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": 8, "checkpoint": "sam.pth"}, "patch_size 16"),
    ],
)
def test_bad_builder_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_sam3d_adapter(**{**TINY, **kwargs})


def test_bad_inputs_give_clear_errors(tiny):
    with pytest.raises(ValueError, match="5D tensor"):
        tiny(torch.zeros(1, 3, S, S))
    with pytest.raises(ValueError, match="expected 3 .*positive clicks"):
        tiny(torch.zeros(1, 1, S, S, S))
    with pytest.raises(ValueError, match="built for img_size"):
        tiny(torch.zeros(1, 3, 64, 64, 64))
    with pytest.raises(ValueError, match="no positive click"):
        tiny(_guided(1, clicks=((1, (4, 4, 4)),)))
    with pytest.raises(ValueError, match="no positive click"):
        tiny(torch.zeros(1, 3, S, S, S))
    with pytest.raises(ValueError, match="outside the patch"):
        tiny.forward_points(torch.zeros(1, 1, S, S, S), torch.tensor([[[4.0, 4.0, 40.0]]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="pass coords"):
        tiny.forward_points(torch.zeros(1, 1, S, S, S))


def test_negative_only_window_is_background_when_asked():
    """Sliding windows may catch only negative clicks: ``no_positive="background"`` answers background there."""
    net = build_sam3d_adapter(**TINY, no_positive="background")
    x = _guided(2, clicks=((0, (4, 4, 4)),))
    x[1, 1:] = 0
    x[1, 2, 20, 20, 20] = 1  # item 1: a negative click only
    with torch.no_grad():
        y = net(x)
        ref = net(x[:1])
    assert torch.allclose(y[:1], ref, atol=1e-6)
    assert (y[1].argmax(0) == 0).all()
    with pytest.raises(ValueError, match="no positive click"):
        net(torch.zeros(1, 3, S, S, S))  # no click at all


# ---------------------------------------------------------------------------- data recipes


def test_require_positive_clicks():
    from shared_nets.sam3d_adapter.transforms import RequirePositiveClicksd

    t = RequirePositiveClicksd()
    assert t({"foreground": [[1, 2, 3]], "background": []})["foreground"] == [[1, 2, 3]]
    for bad in ({"foreground": []}, {"background": [[1, 2, 3]]}, {"foreground": [0, 0, 0, 4, 4, 4]}):
        with pytest.raises(ValueError, match="no positive click"):
            t(bad)


def test_negative_only_patch_runs_when_asked():
    """``no_positive="run"``: a tumour-free training crop is segmented from its other clicks (official training)."""
    torch.manual_seed(0)
    net = build_sam3d_adapter(**TINY, no_positive="run", adapter_zero_init=False)
    x = _guided(1, clicks=((1, (4, 4, 4)),))
    y = net(x)
    assert y.shape == (1, 2, S, S, S)
    y.mean().backward()
    assert net.prompt_encoders["4"].global_queries.grad is not None
    with pytest.raises(ValueError, match="no positive click"):
        net(torch.zeros(1, 3, S, S, S))


def test_memory_estimate_shows_what_checkpointing_saves():
    from shared_nets.sam3d_adapter.bench import training_step_memory

    kw = dict(variant="tiny", img_size=S, sam_input_size=64, window_size=2, amp=False, device="cpu")
    plain = training_step_memory(use_checkpoint=False, **kw)
    ckpt = training_step_memory(use_checkpoint=True, **kw)
    assert not plain["measured"] and plain["activation_bytes"] > ckpt["activation_bytes"] > 0
    net = build_sam3d_adapter(**TINY)
    assert plain["parameter_bytes"] == 4 * sum(p.numel() for p in net.parameters())
    assert plain["optimizer_bytes"] == 2 * plain["gradient_bytes"] == 8 * _n(net)
