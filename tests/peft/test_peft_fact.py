"""FacT-TT: shared factors (registered once), per-block cores, identity at init, gradients, merge parity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shared_nets.peft import FacTFactors, FacTQKV, freeze_except, inject_fact, merge_peft, unmerge_peft

E, DEPTH, R = 64, 4, 8  # tiny SAM width / depth, rank used here


def test_identity_at_init_on_tiny_encoder(tiny_sam, images):
    reference = copy.deepcopy(tiny_sam.image_encoder)
    factors = inject_fact(tiny_sam.image_encoder, rank=R)
    assert tiny_sam.image_encoder.fact_factors is factors
    assert factors.U.shape == (E, R) and factors.V.shape == (R, E)
    assert factors.U.abs().sum() > 0 and factors.V.abs().sum() == 0
    with torch.no_grad():
        assert torch.equal(tiny_sam.image_encoder(images), reference(images))


def test_shared_factors_appear_once(tiny_sam):
    enc = tiny_sam.image_encoder
    factors = inject_fact(enc, rank=R)
    names = [n for n, _ in enc.named_parameters()]
    assert [n for n in names if "fact_factors" in n] == ["fact_factors.U", "fact_factors.V"]
    assert sorted(n for n in names if "fact_cores" in n) == sorted(
        f"blocks.{i}.attn.qkv.fact_cores.{t}" for i in range(DEPTH) for t in "qv"
    )
    keys = list(enc.state_dict())
    assert sum(k.endswith(".U") or k == "U" for k in keys) == 1 and sum(k.endswith(".V") or k == "V" for k in keys) == 1
    assert all(b.attn.qkv.factors is factors for b in enc.blocks)
    trainable = freeze_except(enc, ["fact_factors.*", "*.fact_cores.*"])
    assert trainable == 2 * E * R + DEPTH * 2 * R * R


def test_copies_and_moves_keep_the_sharing(tiny_sam):
    enc = tiny_sam.image_encoder
    inject_fact(enc, rank=R)
    clone = copy.deepcopy(enc)
    assert all(b.attn.qkv.factors is clone.fact_factors for b in clone.blocks)
    assert clone.fact_factors is not enc.fact_factors
    enc.double()
    assert enc.blocks[1].attn.qkv.factors.U.dtype == torch.float64


def test_state_dict_round_trip(tiny_sam, images, perturb):
    enc = tiny_sam.image_encoder
    inject_fact(enc, rank=R)
    perturb(enc)
    fresh = copy.deepcopy(enc)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(enc.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), enc(images))


def test_gradients_reach_all_factors_after_one_step(tiny_sam, images):
    enc = tiny_sam.image_encoder.train()
    factors = inject_fact(enc, rank=R, dropout=0.0)
    freeze_except(enc, ["fact_factors.*", "*.fact_cores.*"])
    enc(images).square().mean().backward()
    for name, p in enc.named_parameters():
        assert (p.grad is not None) == ("fact_" in name), name
    # V = 0: only V moves on the first step ...
    core = enc.blocks[0].attn.qkv.fact_cores["q"]
    assert factors.V.grad.abs().sum() > 0
    assert factors.U.grad.abs().sum() == 0 and core.grad.abs().sum() == 0
    torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=1.0).step()
    enc.zero_grad()
    enc(images).square().mean().backward()
    # ... and U and the cores train from the second step on.
    assert factors.U.grad.abs().sum() > 0 and core.grad.abs().sum() > 0


def test_delta_formula_and_target_rows(perturb):
    torch.manual_seed(0)
    factors = FacTFactors(8, 3)
    layer = FacTQKV(nn.Linear(8, 24), factors, 3, targets=("q", "v"), dropout=0.0, scale=0.5)
    perturb(layer)
    with torch.no_grad():
        factors.V.normal_()
    delta = layer.get_delta_weight()
    expected_q = 0.5 * (factors.U @ layer.fact_cores["q"] @ factors.V).T
    torch.testing.assert_close(delta[:8], expected_q)
    assert delta[8:16].abs().sum() == 0 and delta[16:].abs().sum() > 0
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(
        layer(x), nn.functional.linear(x, layer.weight + delta, layer.bias), atol=1e-5, rtol=1e-5
    )


def test_merge_unmerge_parity_on_encoder(tiny_sam, images, perturb):
    enc = tiny_sam.image_encoder
    reference = copy.deepcopy(enc)
    inject_fact(enc, rank=R)
    perturb(enc)
    original = enc.blocks[0].attn.qkv.weight.detach().clone()
    with torch.no_grad():
        unmerged = enc(images)
        assert not torch.allclose(unmerged, reference(images), atol=1e-3)  # the perturbation matters
        assert merge_peft(enc, safe_merge=True) == DEPTH
        torch.testing.assert_close(enc(images), unmerged, atol=1e-5, rtol=1e-5)
        assert unmerge_peft(enc) == DEPTH
        torch.testing.assert_close(enc.blocks[0].attn.qkv.weight, original, atol=1e-6, rtol=0)
        torch.testing.assert_close(enc(images), unmerged, atol=1e-5, rtol=1e-5)


def test_bad_arguments(tiny_sam):
    factors = FacTFactors(64, 4)
    qkv = tiny_sam.image_encoder.blocks[0].attn.qkv
    with pytest.raises(ValueError, match="rank must equal"):
        FacTQKV(qkv, factors, 8)
    with pytest.raises(ValueError, match="factors.dim"):
        FacTQKV(nn.Linear(32, 96), factors, 4)
    with pytest.raises(ValueError, match="factors must be"):
        FacTQKV(qkv, nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="rank"):
        inject_fact(tiny_sam.image_encoder, rank=0)
    inject_fact(tiny_sam.image_encoder, rank=4)
    with pytest.raises(ValueError, match="once"):
        inject_fact(tiny_sam.image_encoder, rank=4)
