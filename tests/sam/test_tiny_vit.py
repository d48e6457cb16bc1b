"""TinyViT encoder's inference path (folded BatchNorm, in-place GELU, channels-last, fused SDPA kernel).

Random weights with non-trivial BatchNorm statistics; the plain modules (``Conv2d`` then ``BatchNorm2d``,
GELU out of place, autograd recording) are the reference. Parity with the published model is in
``test_lite.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import profile

from shared_nets.sam.tiny_vit import ConvBN, TinyViTEncoder, WindowAttention


def _randomise_batchnorm(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


@pytest.fixture(scope="module")
def encoder() -> TinyViTEncoder:
    torch.manual_seed(0)
    enc = TinyViTEncoder(img_size=64)
    _randomise_batchnorm(enc)
    with torch.no_grad():  # the published biases are far from zero; random ones make the offsets matter
        for blk in enc.blocks:
            blk.attn.attention_biases.normal_(0, 1)
    return enc.eval()


def test_inference_path_matches_the_plain_modules(encoder, monkeypatch):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fast = encoder(x)
    monkeypatch.setattr(ConvBN, "forward", nn.Sequential.forward)  # Conv2d then BatchNorm2d
    with torch.enable_grad():  # GELU out of place, as when training
        plain = encoder(x).detach()
    assert fast.shape == (2, 256, 16, 16) and fast.is_contiguous()
    assert (fast - plain).abs().max().item() < 1e-5 * max(1.0, plain.abs().max().item())


def test_inference_leaves_the_input_untouched(encoder):
    x = torch.rand(1, 3, 64, 64)
    before = x.clone()
    with torch.no_grad():
        encoder(x)
    assert torch.equal(x, before)


def test_eval_batchnorm_folding_gives_batchnorm_gradients():
    torch.manual_seed(0)
    cb = ConvBN(8, 16, kernel_size=3)
    _randomise_batchnorm(cb)
    cb.eval()
    x = torch.randn(2, 8, 12, 12, requires_grad=True)

    def grads(forward) -> list[torch.Tensor]:
        cb.zero_grad(set_to_none=True)
        x.grad = None
        out = forward(cb, x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [out.detach(), x.grad, cb.c.weight.grad, cb.bn.weight.grad, cb.bn.bias.grad]

    for a, b in zip(grads(ConvBN.forward), grads(nn.Sequential.forward)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert cb.bn.running_mean.grad is None  # running statistics stay buffers


def test_window_attention_runs_the_fused_sdpa_kernel():
    # a 3-D additive mask makes torch's CPU dispatch fall back to the unfused math kernel
    attn = WindowAttention(32, 2, 7).eval()
    with torch.inference_mode(), profile() as prof:
        attn(torch.randn(4, 49, 32))
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
