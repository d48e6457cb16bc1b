"""shared_nets.h_sam: H-SAM network (shapes, stage coupling, CMAttn, LoRA identity, parameter counts, errors)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from segment_anything.modeling.transformer import Attention, TwoWayTransformer

from shared_nets.h_sam import build_h_sam
from shared_nets.h_sam.decoder import (
    CMAttn,
    MaskGuidedAttention,
    class_balanced_noise_var,
    run_two_way_transformer,
)
from shared_nets.h_sam.loss import HSAMStageWeights, stage_loss, stage_weights
from shared_nets.h_sam.network import HSAM
from shared_nets.peft import LoRAQKV, trainable_parameter_report
from shared_nets.sam import SamCheckpointError, build_sam

S = 64  # tiny at 64 px: a 4x4 token grid


def _tiny(**kw) -> HSAM:
    torch.manual_seed(0)
    kw = {"variant": "tiny", "img_size": S, "num_classes": 3, **kw}
    return build_h_sam(**kw)


@pytest.mark.parametrize(
    "kw, x_shape",
    [
        ({}, (2, 1, S, S, 1)),
        ({}, (1, 1, S, S, 3)),  # D slices looped as batch
        ({"in_channels": 3}, (1, 3, S, S, 1)),
        ({"patch_size": 8}, (1, 1, S, S, 2)),
        ({"img_size": 32}, (1, 1, 32, 32, 1)),
        ({"mask_attention": "binary"}, (2, 1, S, S, 1)),
        ({"mask_attention": "none", "use_cmattn": False}, (2, 1, S, S, 1)),
        ({"use_hierarchical_pixel_decoder": False}, (2, 1, S, S, 1)),
        ({"use_stage2": False}, (2, 1, S, S, 1)),
        (
            {"released_cmattn": True, "released_attention_order": True, "embedding_noise": 0.2, "ensemble": "logit"},
            (2, 1, S, S, 1),
        ),
        ({"ensemble": "stage2", "finetune": "full"}, (1, 1, S, S, 1)),
        ({"finetune": "frozen", "lora_rank": 5}, (1, 1, S, S, 1)),
    ],
)
def test_shapes_eval_and_train(kw, x_shape):
    net = _tiny(**kw)
    size = kw.get("img_size", S)
    b, _, h, w, d = x_shape
    x = torch.randn(x_shape)
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert y.shape == (b, 4, h, w, d)
    assert torch.isfinite(y).all()
    net.train()
    out = net(x, label=torch.randint(0, 4, (b, 1, h, w, d)).float())
    if kw.get("use_stage2", True):
        p = kw.get("patch_size", 16)
        s1, s2 = out
        assert s1.shape == (b, 4, size * 4 // p, size * 4 // p, d)  # H/4 for patch 16
        full = kw.get("use_hierarchical_pixel_decoder", True)
        assert s2.shape == ((b, 4, h, w, d) if full else s1.shape)
    else:
        assert out.shape == (b, 4, h, w, d)


def test_stage2_uses_stage1_probabilities():
    """Changing the stage-1 probabilities changes stage 2 (learnable mask attention)."""
    net = _tiny(use_cmattn=False, decoder2_dropout=0.0).eval()
    x = torch.randn(2, 1, S, S, 1)
    with torch.no_grad():
        emb = net.image_encoder(x[..., 0].expand(-1, 3, -1, -1))
        pe = net.prompt_encoder.get_dense_pe()
        dense = net.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        feat = torch.randn(2, 4, 16)
        up1 = torch.randn(2, 4, 16, 16)
        p_a = torch.rand(2, 4, 4, 4).softmax(1)
        p_b = torch.rand(2, 4, 4, 4).softmax(1)
        dec = net.mask_decoder2
        out_a = dec(emb, pe, dense, p_a, feat, up1)
        out_b = dec(emb, pe, dense, p_b, feat, up1)
        assert out_a.shape == (2, 4, S, S)
        assert not torch.allclose(out_a, out_b, atol=1e-5)
        # and through the skip connection: stage 1's upscaled features reach stage 2
        assert not torch.allclose(out_a, dec(emb, pe, dense, p_a, feat, up1 + 1.0), atol=1e-5)
        # sanity: without mask attention the probabilities are not used
        dec.mask_attention = "none"
        assert torch.allclose(dec(emb, pe, dense, p_a, feat, up1), dec(emb, pe, dense, p_b, feat, up1))


def test_stage1_gradient_flows_through_the_learnable_mask():
    """The probabilistic mask is not thresholded: stage 2's loss reaches stage 1 (sec. 3.3)."""
    net = _tiny(use_cmattn=False, use_hierarchical_pixel_decoder=False)
    net.train()
    _, s2 = net(torch.randn(1, 1, S, S, 1))
    s2.square().mean().backward()
    hyper = net.mask_decoder.output_hypernetworks_mlps[0].layers[-1].weight
    assert hyper.grad is not None and hyper.grad.abs().sum() > 0


def test_cmattn_is_not_a_noop_in_paper_mode_and_is_one_when_released():
    torch.manual_seed(0)
    emb = torch.randn(2, 32, 4, 4)
    f_a, f_b = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    paper = CMAttn(4, (4, 4), mlp_dim=64).eval()
    assert not torch.allclose(paper(emb, f_a), paper(emb, f_b), atol=1e-6)
    assert not torch.allclose(paper(emb, f_a), emb)
    released = CMAttn(4, (4, 4), mlp_dim=64, released=True).eval()
    assert torch.allclose(released(emb, f_a), 2 * emb)
    assert torch.allclose(released(emb, f_b), 2 * emb)


def test_cmattn_noise_only_in_training_with_label_and_class_balanced():
    torch.manual_seed(0)
    emb, feat = torch.randn(1, 32, 4, 4), torch.randn(1, 4, 16)
    label = torch.zeros(1, 16, dtype=torch.long)
    label[0, :2] = 3  # rare class
    m = CMAttn(4, (4, 4), mlp_dim=64, noise_var=[0.0, 0.0, 0.0, 0.5])
    m.train()
    assert torch.equal(m(emb, feat), m(emb, feat))  # no label: deterministic
    assert not torch.equal(m(emb, feat, label), m(emb, feat, label))
    m.eval()
    assert torch.equal(m(emb, feat, label), m(emb, feat))
    # per-voxel std: only where the label is class 3
    std = m._noise_std(label)
    assert std.shape == (1, 1, 16)
    assert torch.allclose(std[0, 0, :2], torch.full((2,), math.sqrt(0.5))) and std[0, 0, 2:].abs().sum() == 0
    # per-batch estimate: inversely proportional to frequency, rarest = max_var
    est = CMAttn(4, (4, 4), mlp_dim=64, noise_max_var=0.2)._noise_std(label).square()
    assert torch.allclose(est[0, 0, :2], torch.full((2,), 0.2))
    assert torch.allclose(est[0, 0, 2:], torch.full((14,), 0.2 * 2 / 14))
    assert class_balanced_noise_var([100, 10, 0, 50], max_var=0.1) == pytest.approx([0.01, 0.1, 0.0, 0.02])


def test_two_way_runner_matches_stock_transformer_and_released_order_differs():
    torch.manual_seed(0)
    t = TwoWayTransformer(depth=2, embedding_dim=32, num_heads=2, mlp_dim=64).eval()
    img, pe, tokens = torch.randn(2, 32, 4, 4), torch.randn(1, 32, 4, 4), torch.randn(2, 5, 32)
    with torch.no_grad():
        ref_q, ref_k = t(img, pe.expand(2, -1, -1, -1), tokens)
        q, k = run_two_way_transformer(t, img, pe, tokens)
        q2, _ = run_two_way_transformer(t, img, pe, tokens, cross_first=True)
    assert torch.allclose(q, ref_q, atol=1e-5) and torch.allclose(k, ref_k, atol=1e-5)
    assert not torch.allclose(q2, ref_q, atol=1e-4)


def test_mask_guided_attention_modes():
    torch.manual_seed(0)
    learn = MaskGuidedAttention(32, 2, mode="learnable")
    plain = Attention(32, 2)
    plain.load_state_dict({k: v for k, v in learn.state_dict().items()})
    q, kv = torch.randn(2, 4, 32), torch.randn(2, 16, 32)
    ones = torch.ones(2, 4, 16)
    assert torch.allclose(learn(q, kv, kv, mask=ones), plain(q, kv, kv), atol=1e-6)  # M = 1: plain attention
    assert torch.allclose(learn(q, kv, kv, mask=ones * 0.0), learn.out_proj.bias.expand(2, 4, 32), atol=1e-6)
    binary = MaskGuidedAttention(32, 2, mode="binary")
    binary.load_state_dict(learn.state_dict())
    probs = torch.rand(2, 4, 16).softmax(1)
    out = binary(q, kv, kv, mask=probs)
    assert torch.isfinite(out).all()  # tokens owning no pixel attend everywhere instead of NaN
    # image -> token direction: every pixel attends to its arg-max class only
    out_it = binary(kv, q, q, mask=probs.transpose(1, 2))
    assert torch.isfinite(out_it).all()


def test_ensemble_modes():
    net = _tiny(decoder2_dropout=0.0).eval()
    x = torch.randn(1, 1, S, S, 2)
    with torch.no_grad():
        l1, l2 = net.forward_stages(x)
        up1 = torch.nn.functional.interpolate(l1, (S, S), mode="bilinear", align_corners=False)
        prob = net(x)
        net.ensemble = "logit"
        logit = net(x)
    from shared_nets.sam.slices import slices_to_volume

    mean_p = slices_to_volume((up1.softmax(1) + l2.softmax(1)) / 2, 2)
    assert torch.allclose(prob.softmax(1), mean_p, atol=1e-5)  # softmax of the output = mean probability
    assert torch.allclose(logit, slices_to_volume((up1 + l2) / 2, 2), atol=1e-5)


def test_lora_zero_init_is_identity_and_gradients_only_where_expected():
    net = _tiny(decoder2_dropout=0.0)
    lora = [m for m in net.modules() if isinstance(m, LoRAQKV)]
    assert len(lora) == 4 and all(m.targets == ("q", "v") and m.r == 4 for m in lora)
    x = torch.randn(1, 1, S, S, 1)
    net.eval()
    with torch.no_grad():
        with_lora = net(x)
        for blk in net.image_encoder.blocks:
            blk.attn.qkv = blk.attn.qkv.base_layer
        without = net(x)
    assert torch.equal(with_lora, without)

    net = _tiny()
    net.train()
    label = torch.randint(0, 4, (2, 1, S, S, 1)).float()
    loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True), weights=[0.8, 0.2])
    loss(net(torch.randn(2, 1, S, S, 1), label=label), label).backward()
    for name, p in net.named_parameters():
        if (
            ".lora_" in name
            or name.startswith(("mask_decoder2.", "prompt_encoder.no_mask_embed"))
            or (name.startswith("mask_decoder.") and "iou_prediction_head" not in name)
        ):
            assert p.requires_grad, name
            assert p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in net.named_parameters() if "lora_B" in n)


def test_full_finetune_trains_the_encoder_without_lora():
    net = _tiny(finetune="full")
    assert not any(isinstance(m, LoRAQKV) for m in net.modules())
    assert all(p.requires_grad for p in net.image_encoder.parameters())
    net.train()
    out = net(torch.randn(1, 1, S, S, 1))
    (out[0].mean() + out[1].mean()).backward()
    unused = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP-safe: no trainable parameter without a gradient


def test_checkpoint_loads_strictly_before_lora(tmp_path):
    torch.manual_seed(1)
    sam = build_sam("tiny", img_size=S)
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    net = _tiny(checkpoint=str(path))
    assert torch.equal(
        net.image_encoder.blocks[0].attn.qkv.base_layer.weight, sam.image_encoder.blocks[0].attn.qkv.weight
    )
    assert torch.equal(
        net.mask_decoder.transformer.layers[0].mlp.lin1.weight, sam.mask_decoder.transformer.layers[0].mlp.lin1.weight
    )
    with pytest.raises(SamCheckpointError, match="missing.pth"):
        _tiny(checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(SamCheckpointError, match="vit_b"):
        build_h_sam("vit_b", checkpoint=str(path), img_size=S)


# ViT-B built on the meta device (no memory, no init cost). Paper Table 6 totals: H-SAM 112.3M,
# SAMed 108.8M; the released code (LoRA r=5; the parameter table in bundles/h_sam/docs/README.md):
# H-SAM 111.3M at 512, 99.1M at 224, SAMed 92.2M.
@pytest.mark.parametrize(
    "img_size, kw, trainable, total",
    [
        (512, {}, 23_681_290, 111_099_999),
        (224, {}, 12_197_758, 98_962_131),
        (512, {"use_stage2": False}, 4_773_760, 92_192_469),
    ],
)
def test_vit_b_parameter_counts(img_size, kw, trainable, total):
    with torch.device("meta"):
        net = build_h_sam("vit_b", img_size=img_size, num_classes=8, lora_rank=4, **kw)
    report = trainable_parameter_report(net)
    print(
        f"\nH-SAM ViT-B {img_size} {kw}: ours {report.total / 1e6:.2f}M total, {report.trainable / 1e6:.2f}M trainable "
        f"(paper Table 6: H-SAM 112.3M, SAMed 108.8M)\n{report}"
    )
    assert (report.trainable, report.total) == (trainable, total)
    # trainable = LoRA (12 blocks x q,v x (A + B)) + default embedding + decoders without stage 1's IoU head
    rows = {r.name: r for r in report.rows}
    assert rows["image_encoder"].trainable == 12 * 2 * 2 * 4 * 768
    assert rows["prompt_encoder"].trainable == 256
    iou_head = sum(p.numel() for p in net.mask_decoder.iou_prediction_head.parameters())
    assert rows["mask_decoder"].trainable == rows["mask_decoder"].total - iou_head
    if "mask_decoder2" in rows:
        assert rows["mask_decoder2"].trainable == rows["mask_decoder2"].total
        # released widths: CMAttn attention width h*w (1024 at 512, 196 at 224) with 8 / 7 heads
        assert net.mask_decoder2.cmattn.self_attn.num_heads == (8 if img_size == 512 else 7)


def test_stage_weight_schedules_and_handler():
    assert stage_weights(0) == pytest.approx([0.8, 0.2])
    assert stage_weights(100) == pytest.approx([0.8 * math.exp(-0.5), 1 - 0.8 * math.exp(-0.5)])
    assert stage_weights(0, "official") == pytest.approx([0.4, 0.6])
    w = stage_weights(299, "official")[1]
    assert w == pytest.approx(0.6 ** (0.99**299)) and w > 0.9
    loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    handler = HSAMStageWeights(loss)
    assert loss.weights == pytest.approx([0.8, 0.2])

    class _Engine:
        class state:
            epoch = 11

    handler(_Engine())
    assert loss.weights == pytest.approx(stage_weights(10))
    with pytest.raises(ValueError, match="schedule"):
        HSAMStageWeights(loss, schedule="cosine")
    with pytest.raises(ValueError, match="DeepSupervisionLoss"):
        HSAMStageWeights(DiceCELoss())


def test_stage_loss_softmax_is_the_released_loss_and_sigmoid_the_papers_bce_dice():
    """softmax: Cccccczh404/H-SAM trainer.py (CrossEntropyLoss + softmax Dice, 0.1 / 0.9);
    sigmoid: the paper's eq. (4), binary cross-entropy + Dice on each channel's sigmoid."""
    import torch.nn.functional as F
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, 1), torch.randint(0, 4, (2, 1, 8, 8, 1))
    onehot = F.one_hot(y[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    soft = stage_loss("softmax", 0.9, 0.1)(x, y)
    ref = 0.9 * DiceLoss(to_onehot_y=True, softmax=True)(x, y) + 0.1 * F.cross_entropy(x, y[:, 0])
    torch.testing.assert_close(soft, ref)
    sig = stage_loss("sigmoid", 0.9, 0.1)(x, y)
    ref = 0.9 * DiceLoss(to_onehot_y=True, sigmoid=True)(x, y) + 0.1 * F.binary_cross_entropy_with_logits(x, onehot)
    torch.testing.assert_close(sig, ref)
    assert (soft - sig).abs() > 1e-3
    with pytest.raises(ValueError, match="loss_type"):
        stage_loss("focal")


@pytest.mark.parametrize("loss_type, kind", [("softmax", "DiceCELoss"), ("sigmoid", "DiceFocalLoss")])
def test_bundle_loss_type_switch(loss_type, kind):
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[2] / "bundles" / "h_sam" / "configs" / "train.json"))
    parser["loss_type"] = loss_type
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, DeepSupervisionLoss) and type(loss.loss).__name__ == kind
    assert loss.weights == pytest.approx([0.8, 0.2])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mask_attention": "soft"}, "mask_attention"),
        ({"ensemble": "max"}, "ensemble"),
        ({"finetune": "partial"}, "finetune"),
        ({"peft": "lora", "finetune": "full"}, "contradicts finetune"),
        ({"num_classes": 0}, "num_classes"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"patch_size": 12}, "patch_size"),
        ({"img_size": 72}, "img_size"),
        ({"in_channels": 2}, "in_channels"),
        ({"cmattn_noise_var": [0.1, 0.1]}, "cmattn_noise_var"),
        ({"cmattn_num_heads": 3}, "cmattn_num_heads"),
        ({"decoder2_dropout": 1.5}, "decoder2_dropout"),
        ({"variant": "vit_x"}, "variant"),
    ],
)
def test_bad_constructor_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kw)


def test_bad_inputs():
    net = _tiny().train()
    with pytest.raises(ValueError, match=r"5D input"):
        net(torch.randn(1, 1, S, S))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.randn(1, 2, S, S, 1))
    with pytest.raises(ValueError, match=f"{S}x{S}"):
        net(torch.randn(1, 1, 48, 48, 1))  # slices the decoder cannot upsample to
    x = torch.randn(1, 1, S, S, 1)
    with pytest.raises(ValueError, match=r"label values must be integers in \[0, 3\]"):
        net(x, label=torch.full((1, 1, S, S, 1), 5.0))
    with pytest.raises(ValueError, match="label must be"):
        net(x, label=torch.zeros(1, 1, S, S, 2))


def test_select_slices_keeps_the_listed_slices_and_names_bad_indices():
    from shared_nets.h_sam.transforms import SelectSlicesd

    sel = SelectSlicesd(keys="image")
    image = torch.arange(4.0).expand(1, 4, 4, 4)
    kept = sel({"image": image, "slices": [3, 1]})
    assert kept["image"][0, 0, 0].tolist() == [3.0, 1.0] and "slices" not in kept
    with pytest.raises(ValueError, match=r"slices.*\[0, 3\]"):
        sel({"image": torch.zeros(1, 4, 4, 4), "slices": [2, 7]})
    assert sel({"image": torch.zeros(1, 4, 4, 4)})["image"].shape == (1, 4, 4, 4)


# ---------------------------------------------------------------- composition: HSAM from built parts
def test_hsam_composes_built_parts():
    """HSAM takes a SAM with LoRA and a stage-2 decoder built elsewhere and builds nothing itself."""
    from shared_nets.h_sam.decoder import HSAMStage2Decoder
    from shared_nets.peft import inject_lora

    torch.manual_seed(0)
    sam = build_sam("tiny", img_size=S, num_multimask_outputs=3)
    stage2 = HSAMStage2Decoder(
        transformer_dim=32, num_tokens=4, grid=(4, 4), patch_size=16, depth=2, num_heads=2, mlp_dim=64
    )
    lora = inject_lora(sam.image_encoder, r=2, targets=("q", "v"))
    n_params = sum(p.numel() for p in sam.parameters()) + sum(p.numel() for p in stage2.parameters())
    net = HSAM(sam, stage2, lora, variant="tiny", img_size=S, num_classes=3)
    assert net.image_encoder is sam.image_encoder and net.mask_decoder2 is stage2
    assert sum(p.numel() for p in net.parameters()) == n_params  # nothing added
    assert not net.image_encoder.patch_embed.proj.weight.requires_grad  # LoRA mode: encoder frozen except LoRA
    assert all(p.requires_grad for n, p in net.named_parameters() if "lora_" in n)
    out = net.eval()(torch.randn(1, 1, S, S, 2))
    assert out.shape == (1, 4, S, S, 2) and torch.isfinite(out).all()
    baseline = HSAM(sam, None, variant="tiny", img_size=S, num_classes=3)
    assert baseline.ensemble == "stage1" and not baseline.use_stage2
    with pytest.raises(ValueError, match="finetune"):
        HSAM(sam, None, finetune="partial")


def test_build_h_sam_returns_the_same_network_as_before():
    """The builder's tiny networks: HSAM, with the keys and trainable counts the flat constructor gave."""
    for kw, keys, trainable, total in (({}, 381, 103117, 369757), ({"use_stage2": False}, 218, 42492, 309132)):
        net = _tiny(**kw)
        rep = trainable_parameter_report(net)
        assert type(net) is HSAM
        assert (len(net.state_dict()), rep.trainable, rep.total) == (keys, trainable, total)
