"""The method networks and bundles use the SDPA attention by default, with the same outputs as stock SAM.

``segment_anything``'s image-encoder attention keeps ``N x N`` logits, rel-pos and softmax maps
per slice and head (4096 x 4096 at a 1024 px global block); :class:`shared_nets.sam.SdpaAttention`
computes the same function with ``scaled_dot_product_attention``. Every network that builds a SAM
encoder takes ``use_sdpa`` (default True); ``use_sdpa=False`` gives the stock path back.
3DSAM-adapter replaces SAM's attention with its own 3D window attention, which always runs on
``scaled_dot_product_attention``: it has no switch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from segment_anything.modeling.image_encoder import Attention

from shared_nets.h_sam import build_h_sam
from shared_nets.ma_sam import build_ma_sam
from shared_nets.med_sa import build_med_sa
from shared_nets.s_sam import build_s_sam
from shared_nets.sam import SdpaAttention, is_sdpa_enabled

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def _medsa_input() -> torch.Tensor:
    """``[1, 1 + 3, 32, 32, 2]``: a grey 2-slice chunk with one positive click per slice."""
    x = torch.zeros(1, 4, 32, 32, 2)
    x[:, 0] = torch.randn(1, 32, 32, 2, generator=torch.Generator().manual_seed(1))
    x[0, 1, 10, 12, :] = 1
    return x


# network class, tiny constructor arguments, input
CASES = {
    "ma_sam": (build_ma_sam, dict(variant="tiny", img_size=64, num_classes=3), lambda: torch.randn(1, 1, 64, 64, 5)),
    "med_sa": (build_med_sa, dict(variant="tiny", img_size=32, patch_size=8, max_points=4, max_depth=4), _medsa_input),
    "s_sam": (
        build_s_sam,
        dict(variant="tiny", img_size=64, class_names=["liver", "spleen"]),
        lambda: torch.randn(1, 1, 64, 64, 2),
    ),
    "s_sam_official": (
        build_s_sam,
        dict(variant="tiny", img_size=64, class_names=["liver", "spleen"], mode="official"),  # no rel-pos
        lambda: torch.randn(1, 1, 64, 64, 2),
    ),
    "h_sam": (build_h_sam, dict(variant="tiny", img_size=64, num_classes=3), lambda: torch.randn(1, 1, 64, 64, 1)),
}


def _randomise_rel_pos_(net: torch.nn.Module) -> None:
    """Rel-pos tables start at zero in SAM: give them values so the comparison covers that term."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("case", list(CASES))
def test_network_defaults_to_sdpa_and_equals_stock(case):
    cls, kwargs, make_input = CASES[case]
    torch.manual_seed(0)
    lean = cls(**kwargs)
    stock = cls(**kwargs, use_sdpa=False)
    attn = [m for m in lean.modules() if isinstance(m, Attention)]
    assert attn and all(type(m) is SdpaAttention for m in attn), "default network must use SdpaAttention"
    assert not is_sdpa_enabled(stock) and any(type(m) is Attention for m in stock.modules())
    _randomise_rel_pos_(lean)
    assert lean.state_dict().keys() == stock.state_dict().keys()
    stock.load_state_dict(lean.state_dict())
    lean.eval(), stock.eval()
    torch.manual_seed(2)
    x = make_input()
    with torch.no_grad():
        y, y_ref = lean(x), stock(x)
    scale = max(1.0, y_ref.abs().max().item())
    assert (y - y_ref).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("case", ["ma_sam", "med_sa"])
def test_sdpa_gradients_equal_stock(case):
    cls, kwargs, make_input = CASES[case]
    torch.manual_seed(0)
    lean = cls(**kwargs)
    _randomise_rel_pos_(lean)
    stock = cls(**kwargs, use_sdpa=False)
    stock.load_state_dict(lean.state_dict())
    torch.manual_seed(2)
    x = make_input()
    grads = []
    for net in (lean, stock):
        net.train()
        torch.manual_seed(3)  # same dropout masks
        net(x).square().mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        scale = max(1.0, grads[1][name].abs().max().item())
        assert (g - grads[1][name]).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("cls", [build_ma_sam, build_med_sa, build_s_sam, build_h_sam])
def test_use_sdpa_must_be_bool(cls):
    with pytest.raises(ValueError, match="use_sdpa must be true or false"):
        cls(variant="tiny", img_size=64, use_sdpa="yes")


@pytest.mark.parametrize("bundle", ["ma_sam", "med_sa", "s_sam", "h_sam"])
@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_bundle_configs_default_to_sdpa_with_a_switch(bundle, config):
    def network(**overrides):
        parser = ConfigParser()
        parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in (config, "demo.json")])
        parser.read_meta(str(BUNDLES / bundle / "configs" / "metadata.json"))
        parser.update({"bundle_root": str(BUNDLES / bundle), **overrides})
        parser.get_parsed_content("imports", default=None)
        return parser.get_parsed_content("network_def")

    assert is_sdpa_enabled(network())
    assert not is_sdpa_enabled(network(use_sdpa=False))
