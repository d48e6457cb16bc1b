"""LoRA layers: identity at init, q/k/v slicing, scaling, merge parity, gradients, argument checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shared_nets.peft import LoRALinear, LoRAQKV, PeftLayer, freeze_except, inject_lora, merge_peft, unmerge_peft


def test_identity_at_init_on_tiny_encoder(tiny_sam, images):
    reference = copy.deepcopy(tiny_sam.image_encoder)
    layers = inject_lora(tiny_sam.image_encoder, r=4)
    assert len(layers) == 4 and all(isinstance(b.attn.qkv, LoRAQKV) for b in tiny_sam.image_encoder.blocks)
    with torch.no_grad():
        assert torch.equal(tiny_sam.image_encoder(images), reference(images))


def test_wrapped_layer_stays_reachable():
    base = nn.Linear(8, 24)
    layer = LoRAQKV(base, r=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (8, 24)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    with pytest.raises(AttributeError):
        layer.not_an_attribute  # noqa: B018
    with pytest.raises(ValueError, match="already a PEFT layer"):
        LoRALinear(layer, r=2)


@pytest.mark.parametrize("targets", [("q",), ("k",), ("v",), ("q", "v"), ("q", "k", "v")])
def test_delta_touches_only_target_slices(targets, perturb):
    torch.manual_seed(0)
    layer = LoRAQKV(nn.Linear(8, 24), r=2, targets=targets)
    perturb(layer)
    delta = layer.get_delta_weight()
    assert delta.shape == (24, 8)
    for i, t in enumerate("qkv"):
        rows = delta[i * 8 : (i + 1) * 8]
        assert bool(rows.abs().sum() > 0) == (t in targets)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight + delta, layer.bias))


def test_scaling_alpha_over_r(perturb):
    torch.manual_seed(0)
    a = LoRALinear(nn.Linear(6, 7), r=3)
    perturb(a)
    b = copy.deepcopy(a)
    b.alpha, b.scaling = 6.0, 2.0
    assert a.scaling == 1.0
    torch.testing.assert_close(b.get_delta_weight(), 2 * a.get_delta_weight())
    assert LoRALinear(nn.Linear(6, 7), r=3, alpha=12).scaling == 4.0


@pytest.mark.parametrize("cls", ["linear", "qkv"])
def test_merge_unmerge_parity(cls, perturb):
    torch.manual_seed(0)
    base = nn.Linear(8, 24)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=3, dropout=0.1) if cls == "linear" else LoRAQKV(base, r=3, dropout=0.1)
    assert perturb(layer) > 0
    layer.eval()
    x = torch.randn(4, 3, 8)
    unmerged = layer(x)
    assert not torch.allclose(unmerged, base(x))
    layer.merge(safe_merge=True)
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_encoder_merge_parity_and_double_merge_warns(tiny_sam, images, perturb):
    enc = tiny_sam.image_encoder
    inject_lora(enc, r=4, targets=("q", "k", "v"))
    perturb(enc)
    with torch.no_grad():
        unmerged = enc(images)
        assert merge_peft(enc) == 4
        torch.testing.assert_close(enc(images), unmerged, atol=1e-5, rtol=1e-5)
        with pytest.warns(UserWarning, match="already merged"):
            enc.blocks[0].attn.qkv.merge()
        assert unmerge_peft(enc) == 4
        torch.testing.assert_close(enc(images), unmerged, atol=1e-5, rtol=1e-5)


def test_only_trainable_parameters_get_gradients(tiny_sam, images):
    enc = tiny_sam.image_encoder
    enc.train()
    inject_lora(enc, r=4)
    n = freeze_except(tiny_sam, ["*.lora_*"])
    assert n == 4 * 2 * (4 * 64 + 64 * 4)
    enc(images).square().mean().backward()
    for name, p in tiny_sam.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # B starts at zero, so B gets a non-zero gradient and A a zero one on the first step.
    qkv = enc.blocks[0].attn.qkv
    assert qkv.lora_B["q"].weight.grad.abs().sum() > 0
    assert qkv.lora_A["q"].weight.grad.abs().sum() == 0


def test_inject_selected_blocks(tiny_sam):
    layers = inject_lora(tiny_sam.image_encoder, r=2, blocks=[0, -1])
    kinds = [isinstance(b.attn.qkv, PeftLayer) for b in tiny_sam.image_encoder.blocks]
    assert kinds == [True, False, False, True] and len(layers) == 2


def test_inject_into_sam_finds_image_encoder(tiny_sam):
    inject_lora(tiny_sam, r=2)
    assert isinstance(tiny_sam.image_encoder.blocks[2].attn.qkv, LoRAQKV)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r must be"),
        ({"r": 2, "targets": ("x",)}, "targets"),
        ({"r": 2, "targets": ("q", "q")}, "targets"),
        ({"r": 2, "targets": ()}, "targets"),
        ({"r": 2, "alpha": -1}, "alpha"),
        ({"r": 2, "dropout": 1.0}, "dropout"),
        ({"r": 2, "blocks": [4]}, "blocks"),
    ],
)
def test_bad_arguments(tiny_sam, kwargs, match):
    with pytest.raises(ValueError, match=match):
        inject_lora(tiny_sam.image_encoder, **kwargs)
    assert not any(isinstance(m, PeftLayer) for m in tiny_sam.modules())


def test_double_injection_and_wrong_layers(tiny_sam):
    inject_lora(tiny_sam.image_encoder, r=2)
    with pytest.raises(ValueError, match="already wrapped"):
        inject_lora(tiny_sam.image_encoder, r=2)
    with pytest.raises(ValueError, match="ImageEncoderViT"):
        inject_lora(nn.Linear(2, 2), r=2)
    with pytest.raises(ValueError, match="fused qkv"):
        LoRAQKV(nn.Linear(4, 8), r=2)
    with pytest.raises(ValueError, match="nn.Linear"):
        LoRALinear(nn.Conv2d(2, 2, 1), r=2)


@pytest.mark.parametrize("inject", ["lora", "fact"])
def test_tinyvit_per_head_qkv_rows(inject):
    """LiteMedSAM's TinyViT lays qkv out per head: LoRA/FacT on q, v touch exactly those rows, and the
    merged weight computes what the adapted forward does."""
    from shared_nets.peft import inject_fact
    from shared_nets.sam.tiny_vit import TinyViTEncoder

    torch.manual_seed(0)
    enc = TinyViTEncoder(img_size=32, embed_dims=(8, 16, 20, 40), num_heads=(1, 2, 2, 4), out_chans=16).eval()
    if inject == "lora":
        layers = inject_lora(enc, r=2)
    else:
        inject_fact(enc, rank=2, dropout=0.0)
        layers = [b.attn.qkv for b in enc.blocks]
    assert len(layers) == len(enc.blocks) == 10
    with torch.no_grad():
        for p in (p for n, p in enc.named_parameters() if "lora_B" in n or n.endswith(".V")):
            p.normal_()  # the zero-initialised factors
    block = enc.blocks[2]  # second stage, 20 wide, 2 heads of 10
    delta = block.attn.qkv.get_delta_weight()
    rows = delta.abs().sum(1).nonzero().flatten()
    expected = torch.cat([block.attn.qkv_slices("q"), block.attn.qkv_slices("v")]).sort().values
    assert torch.equal(rows, expected)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        adapted = enc(x)
        merge_peft(enc)
        merged = enc(x)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
