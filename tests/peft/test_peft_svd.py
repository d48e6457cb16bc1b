"""S-SAM singular-value tuning: exact SVD, identity at init, W' formula, ReLU clamp, merge parity, ViT-B counts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from shared_nets.peft import (
    PeftLayer,
    SVDConv2d,
    SVDLinear,
    freeze_except,
    inject_lora,
    inject_svd,
    merge_peft,
    unmerge_peft,
)
from shared_nets.sam import build_image_encoder


def _paper_weight(layer: SVDLinear | SVDConv2d) -> torch.Tensor:
    """W' = U · diag(ReLU(a ⊙ Σ + b)) · Vᵀ, straight from the paper's formula."""
    sv = F.relu(layer.scale * layer.S + layer.shift)
    return (layer.U @ torch.diag(sv) @ layer.Vh).reshape(layer.weight.shape)


@pytest.mark.parametrize(
    "make", [lambda: nn.Linear(12, 20), lambda: nn.Linear(20, 12), lambda: nn.Conv2d(6, 5, 3, padding=1, bias=False)]
)
def test_decomposition_and_identity_at_init(make):
    torch.manual_seed(0)
    base = make()
    layer = SVDLinear(base) if isinstance(base, nn.Linear) else SVDConv2d(base)
    k = min(base.weight.shape[0], base.weight[0].numel())
    assert layer.S.shape == layer.scale.shape == layer.shift.shape == (k,)
    assert layer.U.dtype == layer.S.dtype == layer.Vh.dtype == torch.float32
    assert torch.all(layer.scale == 1) and torch.all(layer.shift == 0)
    torch.testing.assert_close(_paper_weight(layer), base.weight, atol=1e-5, rtol=0)
    x = torch.randn(2, 6, 8, 8) if isinstance(base, nn.Conv2d) else torch.randn(3, base.in_features)
    assert torch.equal(layer(x), base(x))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["scale", "shift"]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_adapted_weight_follows_paper_formula_and_merges(kind, perturb):
    torch.manual_seed(0)
    base = nn.Linear(16, 24) if kind == "linear" else nn.Conv2d(8, 4, 3, padding=1)
    original = base.weight.detach().clone()
    layer = SVDLinear(base) if kind == "linear" else SVDConv2d(base)
    perturb(layer, std=0.5)
    x = torch.randn(2, 16) if kind == "linear" else torch.randn(2, 8, 6, 6)
    functional = F.linear if kind == "linear" else (lambda x, w, b: F.conv2d(x, w, b, padding=1))
    with torch.no_grad():
        expected = functional(x, _paper_weight(layer), base.bias)
        out = layer(x)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        layer.merge(safe_merge=True)
        torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original, atol=1e-6, rtol=0)


def test_relu_clamps_singular_values():
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(8, 8))
    with torch.no_grad():
        layer.shift.fill_(-1e3)  # every a·σ + b < 0, so W' = 0 and only the bias is left
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), layer.bias.expand(4, 8), atol=1e-5, rtol=0)


def test_encoder_identity_gradients_and_merge(tiny_sam, images, perturb):
    enc = tiny_sam.image_encoder
    reference = copy.deepcopy(enc)
    layers = inject_svd(enc)
    assert len(layers) == 4 * 4 + 2
    assert isinstance(enc.neck[0], SVDConv2d) and isinstance(enc.neck[2], SVDConv2d)
    assert isinstance(enc.blocks[3].mlp.lin2, SVDLinear)
    with torch.no_grad():
        torch.testing.assert_close(enc(images), reference(images), atol=1e-5, rtol=1e-5)
    n = freeze_except(enc, ["*.scale", "*.shift"])
    assert n == 2 * (4 * 4 * 64 + 2 * 32)
    enc.train()
    enc(images).square().mean().backward()
    for name, p in enc.named_parameters():
        assert (p.grad is not None) == name.endswith((".scale", ".shift")), name
    enc.eval()
    enc.zero_grad()
    perturb(enc, std=0.1)
    with torch.no_grad():
        unmerged = enc(images)
        assert not torch.allclose(unmerged, reference(images), atol=1e-3)
        assert merge_peft(enc) == len(layers)
        torch.testing.assert_close(enc(images), unmerged, atol=1e-5, rtol=1e-5)
        unmerge_peft(enc)
        torch.testing.assert_close(enc(images), unmerged, atol=1e-5, rtol=1e-5)


def test_vit_b_trainable_counts_without_running_it():
    # A ViT-B-shaped encoder on the meta device: no memory, no compute, SVD shapes only.
    with torch.device("meta"):
        enc = build_image_encoder("vit_b", img_size=256)
        inject_svd(enc)
    blocks = sum(p.numel() for n, p in enc.blocks.named_parameters() if n.endswith((".scale", ".shift")))
    neck = sum(p.numel() for n, p in enc.neck.named_parameters() if n.endswith((".scale", ".shift")))
    assert blocks == 73_728
    assert neck == 1_024
    assert freeze_except(enc, ["*.scale", "*.shift"]) == 73_728 + 1_024


def test_include_subset_and_errors(tiny_sam):
    enc = tiny_sam.image_encoder
    with pytest.raises(ValueError, match="not a submodule"):
        inject_svd(enc, include=("attn.qkv", "attn.nope"))
    with pytest.raises(ValueError, match="Linear or nn.Conv2d"):
        inject_svd(enc, include=("mlp",))
    with pytest.raises(ValueError, match="include"):
        inject_svd(enc, include=())
    assert not any(isinstance(m, PeftLayer) for m in enc.modules())  # failures changed nothing
    inject_lora(enc, r=2)
    with pytest.raises(ValueError, match="already wrapped"):
        inject_svd(enc)
    layers = inject_svd(enc, include=("attn.proj",))
    assert len(layers) == 4 and isinstance(enc.neck[0], nn.Conv2d)
    with pytest.raises(ValueError, match="ImageEncoderViT"):
        inject_svd(nn.Sequential(nn.Linear(2, 2)))
