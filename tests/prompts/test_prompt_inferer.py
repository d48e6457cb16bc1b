"""PromptRegionInferer: evaluates only windows around the prompts, background elsewhere."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer

from shared_nets.prompts import PromptRegionInferer, prompt_region


def _position_image(shape) -> torch.Tensor:
    """Image channel whose value encodes the voxel position: i * 10000 + j * 100 + k."""
    i, j, k = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    return (i * 10000 + j * 100 + k).float()


class RecordingNet(torch.nn.Module):
    """Records the (start, end) voxel of every window it sees and how much guidance it held."""

    def __init__(self, out_channels: int = 2):
        super().__init__()
        self.windows: list[tuple[tuple[int, ...], tuple[int, ...], float]] = []
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w in x:
            pos = w[0].double()
            lo, hi = int(pos.min()), int(pos.max())
            start = (lo // 10000, (lo // 100) % 100, lo % 100)
            end = (hi // 10000 + 1, (hi // 100) % 100 + 1, hi % 100 + 1)
            self.windows.append((start, end, float(w[1:].abs().sum())))
        out = torch.full((x.shape[0], self.out_channels, *x.shape[2:]), 5.0)
        out[:, 0] = -5.0
        return out


def _inputs(shape, clicks=(), box=None, batch=1) -> torch.Tensor:
    x = torch.zeros(batch, 3, *shape)
    x[:, 0] = _position_image(shape)
    for c in clicks:
        x[:, 1, c[0], c[1], c[2]] = 1.0
    if box is not None:
        x[:, 2, box[0] : box[3], box[1] : box[4], box[2] : box[5]] = 1.0
    return x


def test_single_click_runs_one_window_background_elsewhere():
    x = _inputs((40, 40, 20), clicks=[(10, 10, 5)])
    net = RecordingNet()
    inferer = PromptRegionInferer(roi_size=16, margin=4, overlap=0.25, num_image_channels=1, mode="constant")
    out = inferer(x, net)
    assert out.shape == (1, 2, 40, 40, 20)
    assert len(net.windows) == 1 and net.windows[0][2] == 1.0
    start, end, _ = net.windows[0]
    assert start == (3, 3, 0) and end == (19, 19, 16)  # 16^3 centred on the click, clamped at k = 0
    inside = out[0, :, 3:19, 3:19, 0:16]
    assert (inside[0] == -5).all() and (inside[1] == 5).all()
    assert out[0, 0].sum() == 10.0 * (40 * 40 * 20 - 16**3) - 5.0 * 16**3
    assert (out[0, 0, 30:, 30:] == 10.0).all() and (out[0, 1, 30:, 30:] == -10.0).all()
    assert inferer.last_windows_run == 1 and inferer.last_windows_skipped == 0


@pytest.mark.parametrize("sw_batch_size", [1, 4])
def test_prompt_free_windows_never_reach_the_network(sw_batch_size):
    x = _inputs((48, 48, 24), clicks=[(1, 1, 1), (46, 45, 22)])  # region = the whole volume: 4 x 4 x 3 windows
    net = RecordingNet()
    inferer = PromptRegionInferer(
        roi_size=(12, 12, 8), margin=2, overlap=0.0, sw_batch_size=sw_batch_size, mode="constant"
    )
    out = inferer(x, net)
    assert len(net.windows) == 2 == inferer.last_windows_run
    assert all(g > 0 for _, _, g in net.windows)
    assert inferer.last_windows_skipped == 4 * 4 * 3 - 2
    # the two clicked windows hold the network's output, everything else is background
    for start, end, _ in net.windows:
        sl = tuple(slice(a, b) for a, b in zip(start, end))
        assert (out[0, 1][sl] == 5.0).all()
    assert (out[0, 0] == -5.0).sum() == 2 * 12 * 12 * 8
    assert (out[0, 0, 20:28, 20:28, 10:14] == 10.0).all()


def test_parity_with_sliding_window_when_prompts_everywhere():
    shape = (20, 18, 10)
    x = _inputs(shape, box=(0, 0, 0, 20, 18, 10))
    x[:, 0] = torch.rand(shape)

    def net(w):
        return torch.cat([-w[:, :1] * 2, w[:, :1] + w[:, 2:3]], dim=1)

    ours = PromptRegionInferer(roi_size=(8, 8, 4), overlap=0.5, mode="gaussian")(x, net)
    ref = SlidingWindowInferer(roi_size=(8, 8, 4), overlap=0.5, mode="gaussian")(x, net)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_batch_items_and_meta():
    x = _inputs((24, 24, 12), batch=2)
    x[0, 1, 3, 3, 3] = 1.0
    x[1, 2, 18:22, 18:22, 8:12] = 1.0
    x = MetaTensor(x, affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    net = RecordingNet()
    out = PromptRegionInferer(roi_size=8, margin=0, overlap=0.0)(x, net)
    assert out.shape == (2, 2, 24, 24, 12)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, x.affine)
    assert (out[0, 1, 0:8, 0:8, 0:8] == 5.0).all() and (out[0, 1, 16:, 16:, 8:] == -10.0).all()
    assert (out[1, 1, 16:24, 16:24, 4:12] == 5.0).all() and (out[1, 1, :8, :8, :4] == -10.0).all()


def test_no_prompt_raises_or_falls_back():
    x = _inputs((16, 16, 8))
    net = RecordingNet()
    with pytest.raises(ValueError, match="no prompt in the guidance channels"):
        PromptRegionInferer(roi_size=8)(x, net)
    assert net.windows == []
    inferer = PromptRegionInferer(roi_size=8, overlap=0.0, allow_no_prompt=True)
    out = inferer(x, net)
    assert len(net.windows) == 2 * 2 * 1 == inferer.last_windows_run
    assert (out[:, 1] == 5.0).all()


def test_softmax_style_background_values_and_errors():
    x = _inputs((16, 16, 8), clicks=[(1, 1, 1)])
    out = PromptRegionInferer(roi_size=4, margin=0, background_logit=1.0, foreground_logit=0.0)(x, RecordingNet())
    assert out[0, 0, 10, 10, 5] == 1.0 and out[0, 1, 10, 10, 5] == 0.0
    with pytest.raises(ValueError, match="out_channels=2"):
        PromptRegionInferer(roi_size=4)(x, RecordingNet(out_channels=3))
    with pytest.raises(ValueError, match="num_image_channels"):
        PromptRegionInferer(roi_size=4, num_image_channels=3)(x, RecordingNet())
    with pytest.raises(ValueError, match="roi_size"):
        PromptRegionInferer(roi_size=(4, 4))
    with pytest.raises(ValueError, match="mode"):
        PromptRegionInferer(roi_size=4, mode="mean")


def test_prompt_region_geometry():
    occ = torch.zeros(30, 30, 6, dtype=torch.bool)
    occ[10:12, 20, 2] = True
    start, end = prompt_region(occ, roi_size=(8, 8, 8), margin=(3, 3, 3))
    assert start == (7, 17, 0) and end == (15, 25, 6)  # margin; grown to roi on j; whole axis on k
    occ[:] = False
    occ[29, 0, 5] = True
    assert prompt_region(occ, (8, 8, 8), (0, 0, 0)) == ((22, 0, 0), (30, 8, 6))
    assert prompt_region(torch.zeros(4, 4, 4, dtype=torch.bool), (2, 2, 2), (0, 0, 0)) is None
