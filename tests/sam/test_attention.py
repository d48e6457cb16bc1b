"""SDPA attention switch: same numbers, gradients and state dict as segment_anything's Attention."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, add_decomposed_rel_pos
from torch import nn

from shared_nets.peft import LoRAQKV, inject_lora
from shared_nets.sam import (
    SdpaAttention,
    build_sam,
    decomposed_rel_pos_bias,
    enable_sdpa,
    is_sdpa_enabled,
)

MODES = ["bias", "fold"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on 2 shared cores, 2 threads run these small ops several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter (rel-pos tables start at zero) a random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    """Equal within ``tol`` relative to the reference's magnitude (absolute for O(1) values)."""
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= tol * scale


def _forward_backward(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad, _grads(module)


# dim, heads, grid of the call, rel-pos table size: tiny windows, ViT-B windows and global
# grid, Med-SA's depth branch (5 x 1 tokens through a 4 x 4 window's tables: interpolated)
ATTN_CASES = {
    "tiny_window": (64, 2, (4, 4), (4, 4)),
    "vit_b_window": (768, 12, (14, 14), (14, 14)),
    "vit_b_global": (768, 12, (16, 16), (16, 16)),
    "non_square_interpolated": (64, 2, (5, 1), (4, 4)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_equals_stock_forward_and_gradients(case, mode):
    dim, heads, grid, table = ATTN_CASES[case]
    stock = _randomise_(Attention(dim, heads, use_rel_pos=True, input_size=table))
    ours = enable_sdpa(copy.deepcopy(stock), rel_pos_mode=mode)
    assert type(ours) is SdpaAttention
    torch.manual_seed(1)
    x = torch.randn(2, *grid, dim)
    g = torch.randn(2, *grid, dim)
    y0, gx0, gp0 = _forward_backward(stock, x, g)
    y1, gx1, gp1 = _forward_backward(ours, x, g)
    assert y1.shape == (2, *grid, dim)
    _assert_close(y1, y0)
    _assert_close(gx1, gx0)
    assert gp1.keys() == gp0.keys() and {"rel_pos_h", "rel_pos_w", "qkv.weight"} <= gp0.keys()
    for name in gp0:
        _assert_close(gp1[name], gp0[name])


@pytest.mark.parametrize("mode", MODES)
def test_attention_without_rel_pos(mode):
    stock = _randomise_(Attention(64, 4, use_rel_pos=False))
    ours = enable_sdpa(copy.deepcopy(stock), rel_pos_mode=mode)
    x = torch.randn(3, 4, 4, 64)
    _assert_close(ours(x), stock(x))


def test_bias_equals_segment_anything_rel_pos_terms():
    torch.manual_seed(0)
    b, heads, (h, w), c = 2, 3, (5, 4), 8
    q = torch.randn(b, heads, h * w, c)
    rel_h, rel_w = torch.randn(2 * h - 1, c), torch.randn(2 * w - 1, c)
    zeros = torch.zeros(b * heads, h * w, h * w)
    expected = add_decomposed_rel_pos(zeros, q.reshape(b * heads, h * w, c), rel_h, rel_w, (h, w), (h, w))
    bias = decomposed_rel_pos_bias(q, rel_h, rel_w, (h, w))
    assert bias.shape == (b, heads, h * w, h * w)
    torch.testing.assert_close(bias.reshape(b * heads, h * w, h * w), expected, rtol=1e-5, atol=1e-5)


def _vit_b_shaped_encoder(img_size: int = 256) -> ImageEncoderViT:
    """ViT-B widths (768, 12 heads, 14-token windows) with 2 blocks at a small input: one
    windowed block (16 x 16 grid padded to 28 x 28) and one global block."""
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=768,
        depth=2,
        num_heads=12,
        mlp_ratio=4,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=(1,),
    )


ENCODERS = {
    "tiny_64": (lambda: build_sam("tiny", img_size=64).image_encoder, 64),
    "vit_b_shaped_256": (_vit_b_shaped_encoder, 256),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_parity_state_dict_and_switch_back(name, mode):
    make, size = ENCODERS[name]
    torch.manual_seed(0)
    stock = _randomise_(make()).eval()
    for p in stock.parameters():  # keep activations O(1) through the blocks
        p.data.mul_(0.5)
    ours = copy.deepcopy(stock)
    keys_before = {k: v.clone() for k, v in ours.state_dict().items()}
    enable_sdpa(ours, rel_pos_mode=mode)
    n_attn = sum(isinstance(m, Attention) for m in stock.modules())
    assert sum(type(m) is SdpaAttention for m in ours.modules()) == n_attn > 0
    # state dict: same keys, same tensors; a stock state dict loads strictly
    after = ours.state_dict()
    assert list(after) == list(keys_before)
    assert all(torch.equal(after[k], keys_before[k]) for k in after)
    ours.load_state_dict(stock.state_dict(), strict=True)

    x = torch.randn(1, 3, size, size)
    g = torch.randn_like(stock(x))
    y0, _, gp0 = _forward_backward(stock, x, g)
    y1, _, gp1 = _forward_backward(ours, x, g)
    _assert_close(y1, y0)
    for k in gp0:
        _assert_close(gp1[k], gp0[k])

    enable_sdpa(ours, enabled=False)
    assert not is_sdpa_enabled(ours)
    assert all(type(m) is Attention for m in ours.modules() if isinstance(m, Attention))
    with torch.no_grad():
        assert torch.equal(ours(x), stock(x))  # stock code again: bit-identical


def test_build_sam_switch_defaults_off():
    assert not is_sdpa_enabled(build_sam("tiny", img_size=32))
    sam = build_sam("tiny", img_size=32, use_sdpa=True)
    assert is_sdpa_enabled(sam.image_encoder)
    # the decoder's attention is a different class and stays stock
    assert all(type(m).__name__ != "SdpaAttention" for m in sam.mask_decoder.modules())
    with pytest.raises(ValueError, match="enabled must be True or False"):
        build_sam("tiny", img_size=32, use_sdpa="yes")


@pytest.mark.parametrize("mode", MODES)
def test_peft_wrapped_qkv_still_used(mode):
    torch.manual_seed(0)
    stock = _randomise_(build_sam("tiny", img_size=64).image_encoder)
    layers = inject_lora(stock, r=2)
    with torch.no_grad():
        for layer in layers:  # non-zero B so the LoRA branch changes the output
            for p in layer.lora_B.parameters():
                p.normal_(0, 0.5)
    ours = enable_sdpa(copy.deepcopy(stock), rel_pos_mode=mode)
    assert all(isinstance(b.attn.qkv, LoRAQKV) for b in ours.blocks)
    x = torch.randn(2, 3, 64, 64)
    g = torch.randn_like(stock(x))
    y0, _, gp0 = _forward_backward(stock, x, g)
    y1, _, gp1 = _forward_backward(ours, x, g)
    _assert_close(y1, y0)
    lora = [k for k in gp0 if "lora_" in k]
    assert lora and all(gp1[k].abs().sum() > 0 for k in lora)
    for k in lora:
        _assert_close(gp1[k], gp0[k])


def test_other_attention_subclasses_are_left_alone():
    class Custom(Attention):
        def forward(self, x):
            return x * 0

    model = nn.Sequential(Custom(8, 2), Attention(8, 2))
    enable_sdpa(model)
    assert type(model[0]) is Custom and type(model[1]) is SdpaAttention


def test_bfloat16_autocast_runs_close_to_stock():
    stock = _randomise_(Attention(64, 2, use_rel_pos=True, input_size=(4, 4)))
    ours = enable_sdpa(copy.deepcopy(stock))
    x = torch.randn(2, 4, 4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0, y1 = stock(x), ours(x)
    assert y1.dtype == y0.dtype == torch.bfloat16
    assert (y1.float() - y0.float()).abs().max().item() < 5e-2 * max(1.0, y0.float().abs().max().item())


def test_bad_arguments():
    attn = Attention(8, 2)
    with pytest.raises(ValueError, match="module must be a torch.nn.Module"):
        enable_sdpa("attention")
    with pytest.raises(ValueError, match="enabled must be True or False"):
        enable_sdpa(attn, enabled=1)
    with pytest.raises(ValueError, match="rel_pos_mode must be one of"):
        enable_sdpa(attn, rel_pos_mode="flash")
    attn = Attention(8, 2, use_rel_pos=True, input_size=(2, 2))
    enable_sdpa(attn)
    attn.rel_pos_mode = "other"
    with pytest.raises(ValueError, match="rel_pos_mode must be one of"):
        attn(torch.randn(1, 2, 2, 8))
