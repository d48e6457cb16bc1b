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


# ---------------------------------------------------------------- lazy decomposition
@pytest.fixture()
def svd_calls(monkeypatch):
    """Count ``torch.linalg.svd`` calls (the decomposition a wrapped layer pays for)."""
    calls = []
    real = torch.linalg.svd

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    return calls


def _reference_factors(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The eager decomposition (float64 SVD of ``[out, rest]`` stored as float32)."""
    u, s, vh = torch.linalg.svd(weight.detach().reshape(weight.shape[0], -1).double(), full_matrices=False)
    return u.float(), s.float(), vh.float()


def test_wrapping_decomposes_nothing_until_needed(svd_calls):
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    layer = SVDLinear(base)
    assert svd_calls == [] and layer.svd_pending
    assert layer.scale.shape == layer.shift.shape == (12,) and layer.rank == 12
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), base(x))  # forward decomposes once
    assert len(svd_calls) == 1 and not layer.svd_pending
    layer(x), layer.get_delta_weight(), layer.state_dict()
    assert len(svd_calls) == 1
    n = len(svd_calls)
    for u, ref in zip((layer.U, layer.S, layer.Vh), _reference_factors(base.weight)):
        assert torch.equal(u, ref)
    assert len(svd_calls) == n + 1  # the reference only


def test_weights_loaded_after_wrapping_are_the_ones_decomposed():
    """A SAM checkpoint loaded after construction: the factors belong to the loaded weights."""
    torch.manual_seed(0)
    layer = SVDConv2d(nn.Conv2d(6, 5, 3, padding=1))
    trained = nn.Conv2d(6, 5, 3, padding=1)
    # through the wrapper's state dict (base weight, no factors), non-strict
    result = layer.load_state_dict({"base_layer.weight": trained.weight, "base_layer.bias": trained.bias}, strict=False)
    assert set(result.missing_keys) == {"U", "S", "Vh", "scale", "shift"}
    for got, ref in zip((layer.U, layer.S, layer.Vh), _reference_factors(trained.weight)):
        assert torch.equal(got, ref)
    # loading a base weight without factors after the factors exist marks them stale
    other = nn.Conv2d(6, 5, 3, padding=1)
    layer.load_state_dict({"base_layer.weight": other.weight}, strict=False)
    assert layer.svd_pending
    torch.testing.assert_close(_paper_weight(layer), other.weight, atol=1e-5, rtol=0)
    # in-place changes need reset_svd
    with torch.no_grad():
        layer.base_layer.weight.copy_(trained.weight)
    layer.reset_svd()
    torch.testing.assert_close(_paper_weight(layer), trained.weight, atol=1e-5, rtol=0)


def test_state_dict_with_factors_loads_them_exactly(svd_calls, perturb):
    torch.manual_seed(0)
    src = SVDLinear(nn.Linear(16, 24))
    perturb(src, std=0.5)
    state = copy.deepcopy(src.state_dict())
    n = len(svd_calls)
    torch.manual_seed(1)  # other random base weights
    dst = SVDLinear(nn.Linear(16, 24))
    dst.load_state_dict(state)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    assert len(svd_calls) == n and not dst.svd_pending
    for name in ("U", "S", "Vh"):
        assert torch.equal(getattr(dst, name), getattr(src, name))


def test_merge_of_a_pending_layer_decomposes_the_unmerged_weight():
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    original = base.weight.detach().clone()
    layer = SVDLinear(base)
    with torch.no_grad():
        layer.shift.fill_(0.1)
    layer.merge()
    _, s, _ = _reference_factors(original)
    torch.testing.assert_close(layer.S, s)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, atol=1e-5, rtol=0)
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        layer.reset_svd()
