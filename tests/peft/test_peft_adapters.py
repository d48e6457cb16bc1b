"""Bottleneck adapter and MA-SAM 3D adapter: zero-init identity, slice mixing only where the kernel reaches, checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared_nets.peft import Adapter3D, BottleneckAdapter


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_bottleneck_zero_init(act):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 5, 16)
    assert torch.equal(BottleneckAdapter(16, 4, act=act)(x), x)
    assert torch.equal(BottleneckAdapter(16, 4, act=act, skip=False, scale=0.5)(x), torch.zeros_like(x))
    adapter = BottleneckAdapter(16, 4, act=act, zero_init=False)
    assert not torch.allclose(adapter(x), x)


def test_bottleneck_formula_and_scale():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(8, 3, act="relu", skip=True, scale=0.5, zero_init=False)
    x = torch.randn(4, 8)
    branch = adapter.up(torch.relu(adapter.down(x)))
    torch.testing.assert_close(adapter(x), x + 0.5 * branch)
    adapter.skip = False
    torch.testing.assert_close(adapter(x), 0.5 * branch)


def test_bottleneck_bad_arguments():
    with pytest.raises(ValueError, match="act"):
        BottleneckAdapter(8, 2, act="tanh")
    with pytest.raises(ValueError, match="hidden_dim"):
        BottleneckAdapter(8, 0)
    with pytest.raises(ValueError, match="dim"):
        BottleneckAdapter(8, 2)(torch.zeros(3, 7))


def _adapter3d(kernel_size=(3, 1, 1)) -> Adapter3D:
    torch.manual_seed(0)
    adapter = Adapter3D(16, 8, kernel_size=kernel_size)
    with torch.no_grad():
        nn.init.normal_(adapter.up.weight)  # make the adapter do something
    return adapter


def test_adapter3d_identity_at_init_and_shapes():
    torch.manual_seed(0)
    adapter = Adapter3D(16, 8)
    x = torch.randn(2 * 5, 3, 4, 16)
    assert torch.equal(adapter(x, num_slices=5), x)
    assert adapter.down.bias is None and adapter.up.bias is None and adapter.conv.bias is not None
    assert _adapter3d()(x, num_slices=5).shape == x.shape


def test_adapter3d_mixes_neighbouring_slices_only():
    adapter = _adapter3d()
    n = 4
    x = torch.randn(2 * n, 3, 3, 16)
    y = x.clone()
    y[0] += torch.randn(3, 3, 16)  # change slice 0 of volume 0
    with torch.no_grad():
        diff = (adapter(y, num_slices=n) - adapter(x, num_slices=n)).abs().flatten(1).amax(1)
    assert diff[0] > 0 and diff[1] > 0  # slice 0 and its neighbour slice 1 change
    assert torch.all(diff[2:] == 0)  # kernel 3 reaches one slice; volume 1 (rows 4..7) is independent
    z = x.clone()
    z[n - 1] += 1.0  # last slice of volume 0 must not leak into the first slice of volume 1
    with torch.no_grad():
        diff = (adapter(z, num_slices=n) - adapter(x, num_slices=n)).abs().flatten(1).amax(1)
    assert diff[n - 2] > 0 and diff[n] == 0


def test_adapter3d_pointwise_kernel_does_not_mix():
    adapter = _adapter3d(kernel_size=1)
    x = torch.randn(3, 2, 2, 16)
    y = x.clone()
    y[0] += 1.0
    with torch.no_grad():
        diff = (adapter(y, num_slices=3) - adapter(x, num_slices=3)).abs().flatten(1).amax(1)
    assert diff[0] > 0 and torch.all(diff[1:] == 0)


def test_adapter3d_bad_arguments():
    adapter = Adapter3D(16, 8)
    with pytest.raises(ValueError, match="divisible by num_slices"):
        adapter(torch.zeros(7, 2, 2, 16), num_slices=5)
    with pytest.raises(ValueError, match="num_slices"):
        adapter(torch.zeros(5, 2, 2, 16), num_slices=0)
    with pytest.raises(ValueError, match="B\\*N, h, w, 16"):
        adapter(torch.zeros(5, 2, 16), num_slices=5)
    with pytest.raises(ValueError, match="kernel_size"):
        Adapter3D(16, 8, kernel_size=(2, 1, 1))
    with pytest.raises(ValueError, match="act"):
        Adapter3D(16, 8, act="swish")
