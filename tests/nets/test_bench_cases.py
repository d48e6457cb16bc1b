"""Each method's BENCH_CASE (shared_nets/<method>/bench.py): found from its bundle's network target, and its hooks
feed and switch the real network as the benchmark needs (prompt channels, training forward, checkpointing,
memory-estimate input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared_nets.interface import BenchCase, bench_case

REPO = Path(__file__).resolve().parents[2]
METHODS = ["ma_sam", "med_sa", "s_sam", "h_sam", "sam3d_adapter"]


def _target(bundle: str) -> str:
    return json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text())["network_def"]["_target_"]


@pytest.mark.parametrize("bundle", METHODS)
def test_bundle_target_finds_its_method_case(bundle):
    import importlib

    case = bench_case(_target(bundle))
    assert case is importlib.import_module(f"shared_nets.{bundle}.bench").BENCH_CASE
    assert isinstance(case, BenchCase)


class _Net(torch.nn.Module):
    def __init__(self, **attrs) -> None:
        super().__init__()
        self.__dict__.update(attrs)


def test_prompt_channels_and_geometry():
    case = {m: bench_case(_target(m)) for m in METHODS}
    assert case["ma_sam"].prompt_channels(_Net(use_box_prompt=False)) == ()
    assert case["ma_sam"].prompt_channels(_Net(use_box_prompt=True)) == ("roi",)
    assert case["med_sa"].prompt_channels(_Net()) == ("foreground", "background", "roi")
    assert case["sam3d_adapter"].prompt_channels(_Net(prompted=True)) == ("foreground", "background")
    assert case["sam3d_adapter"].prompt_channels(_Net(prompted=False)) == ()
    assert case["s_sam"].prompt_channels(_Net()) == case["h_sam"].prompt_channels(_Net()) == ()
    assert [m for m in METHODS if not case[m].slice_based] == ["sam3d_adapter"]
    assert [m for m in METHODS if case[m].prompted] == ["med_sa", "sam3d_adapter"]
    assert {m: case[m].memory_target for m in METHODS if case[m].memory_target is not None} == {
        "ma_sam": {"variant": "vit_b", "img_size": 512, "num_slices": 5},
        "sam3d_adapter": {},
    }
    from shared_nets.med_sa.network import MEDSA_OFFICIAL_CODE_SETTINGS

    assert case["med_sa"].reprompt_settings == {"official code": dict(MEDSA_OFFICIAL_CODE_SETTINGS)}
    assert [m for m in METHODS if case[m].reprompt_settings] == ["med_sa"]
    assert [m for m in METHODS if case[m].report_note] == ["med_sa", "sam3d_adapter"]


def test_h_sam_trains_with_the_label():
    """H-SAM's stage-2 attention reads the label in training: its case calls the core with it."""
    from shared_nets.h_sam import build_h_sam

    torch.manual_seed(0)
    net = build_h_sam(variant="tiny", img_size=32, patch_size=8, num_classes=3, finetune="lora").train()
    wrapped = torch.nn.Sequential(net)
    x, y = torch.randn(1, 1, 32, 32, 2), torch.randint(0, 4, (1, 1, 32, 32, 2)).float()
    seen = []
    net.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("label")), with_kwargs=True)
    bench_case(_target("h_sam")).train_forward(wrapped, net, x, y)
    assert seen[0] is y
    seen.clear()
    BenchCase().train_forward(wrapped, net, x, y)  # the default: the network as configured, image only
    assert seen == [None]


def test_gradient_checkpointing_switches():
    from shared_nets.med_sa import build_med_sa
    from shared_nets.sam3d_adapter import build_sam3d_adapter

    medsa = build_med_sa(variant="tiny", img_size=32, patch_size=8, max_points=4, max_depth=2)
    before = [type(b) for b in medsa.image_encoder.blocks]
    case = bench_case(_target("med_sa"))
    case.set_gradient_checkpointing(medsa, True)  # a per-block class swap, not an attribute
    assert [type(b) for b in medsa.image_encoder.blocks] != before
    case.set_gradient_checkpointing(medsa, False)
    assert [type(b) for b in medsa.image_encoder.blocks] == before
    sam3d = build_sam3d_adapter("tiny", img_size=32, sam_input_size=64, window_size=2)
    bench_case(_target("sam3d_adapter")).set_gradient_checkpointing(sam3d, True)
    assert sam3d.use_checkpoint is True
    net = _Net(gradient_checkpointing=False)
    bench_case(_target("ma_sam")).set_gradient_checkpointing(net, True)
    assert net.gradient_checkpointing is True


def test_med_sa_memory_input_replays_decoded_prompts():
    """Med-SA's prompts are decoded once from real guidance (one centre click per slice) and replayed, so the
    forward can be traced on fake tensors; the input has the image and three guidance channels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from shared_nets.med_sa import build_med_sa

    net = build_med_sa(variant="tiny", img_size=32, patch_size=8, max_points=4, max_depth=2).train()
    x = bench_case(_target("med_sa")).memory_estimate_input(net, 32, 2)
    assert x.shape == (1, net.in_channels + 3, 32, 32, 2) and net.automatic is True
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = net(torch.zeros_like(x))
    assert out.shape[-3:] == (32, 32, 2)
    assert BenchCase().memory_estimate_input(net, 16, 3).shape == (1, 1, 16, 16, 3)
