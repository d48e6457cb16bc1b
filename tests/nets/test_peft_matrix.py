"""Every network × every ``peft`` setting at tiny size: builds, trains a step, infers, merges.

* 5 networks × 6 settings: one AdamW step has a finite loss and gradients on exactly the trainable
  parameters (and on none of the frozen ones), then an eval forward is finite; the trainable count
  orders as ``frozen < paper setting < full``.
* Each mergeable setting with the method's unmergeable extras switched off: the merged export
  (:func:`shared_nets.peft.export_merged_state_dict`) loads strictly into stock ``segment_anything``
  SAM of the same tiny shape and its image encoder gives the network's encoder output (PEFT
  parameters perturbed first, so the check is not trivial). 3DSAM-adapter has no stock SAM
  counterpart (its tokenizer, necks and decoder are 3D): its export loads into the same network
  built with ``peft="frozen"`` and gives the same output.
* Old keys stay aliases; a contradicting ``peft`` is refused naming both keys.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
import torch
from segment_anything.modeling import Sam

from shared_nets.h_sam import build_h_sam
from shared_nets.interface import bench_case
from shared_nets.ma_sam import build_ma_sam
from shared_nets.med_sa import build_med_sa
from shared_nets.peft import PEFT_METHODS, export_merged_state_dict, find_unmergeable
from shared_nets.s_sam import build_s_sam
from shared_nets.sam import build_sam, get_variant
from shared_nets.sam3d_adapter import build_sam3d_adapter
from tests.peft.conftest import _perturb
from tools.bench.inputs import _with_guidance

S = 32
BUILD: dict[str, Any] = {
    "h_sam": lambda **kw: build_h_sam("tiny", img_size=S, patch_size=8, num_classes=2, **kw),
    "ma_sam": lambda **kw: build_ma_sam("tiny", img_size=S, patch_size=8, num_classes=2, num_slices=2, **kw),
    "med_sa": lambda **kw: build_med_sa("tiny", img_size=S, patch_size=8, **kw),
    "s_sam": lambda **kw: build_s_sam("tiny", img_size=S, patch_size=8, class_names=["liver", "spleen"], **kw),
    "sam3d_adapter": lambda **kw: build_sam3d_adapter("tiny", img_size=S, sam_input_size=64, patch_size=8, **kw),
}
TARGET = {m: f"shared_nets.{m}.build_{m}" for m in BUILD}
PAPER = {"h_sam": "lora", "ma_sam": "fact", "med_sa": "adapter", "s_sam": "svd", "sam3d_adapter": "adapter"}
DEPTH = {"h_sam": 1, "ma_sam": 2, "med_sa": 1, "s_sam": 1, "sam3d_adapter": S}
#: the method's unmergeable (or non-SAM) extras off, so the rest is stock SAM
STOCK_EXTRAS_OFF: dict[str, dict[str, Any]] = {
    "h_sam": {"use_stage2": False},
    "ma_sam": {"use_3d_adapters": False, "decoder": "sam"},
    "med_sa": {"decoder_adapters": False},
    "s_sam": {},
}
MERGEABLE = ("lora", "fact", "svd", "full", "frozen")


def _build(bundle: str, **kw: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILD[bundle](**kw)


def _batch(bundle: str, net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    d = DEPTH[bundle]
    image = torch.rand(1, S, S, d, generator=g)
    label = torch.zeros(S, S, d, dtype=torch.long)
    label[8:20, 10:22] = 1
    case = bench_case(TARGET[bundle])
    x = _with_guidance(image, label.bool(), case.prompt_channels(net))[None]
    return x.float(), label[None, None].float()


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, (list, tuple)):
        return sum(_loss(o) for o in out)
    return out.float().sigmoid().mean()


def _trainable(net: torch.nn.Module) -> set[str]:
    return {n for n, p in net.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def paper_counts() -> dict[str, int]:
    """Trainable parameters of each network at its paper setting (``peft`` left at None)."""
    return {b: sum(p.numel() for p in _build(b).parameters() if p.requires_grad) for b in BUILD}


@pytest.mark.parametrize("peft", PEFT_METHODS)
@pytest.mark.parametrize("bundle", list(BUILD))
def test_builds_trains_a_step_and_infers(bundle, peft, paper_counts):
    net = _build(bundle, peft=peft)
    assert net.peft == peft
    trainable = _trainable(net)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert n_train > 0
    if peft == "frozen":
        assert n_train < paper_counts[bundle]
    if peft == "full":
        assert n_train > paper_counts[bundle]
    if peft == PAPER[bundle]:
        assert n_train == paper_counts[bundle]  # None and the paper's value build the same network
    x, y = _batch(bundle, net)
    case = bench_case(TARGET[bundle])
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss = _loss(case.train_forward(net, net, x, y))
    assert torch.isfinite(loss)
    loss.backward()
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
    assert with_grad == trainable, (sorted(trainable - with_grad)[:5], sorted(with_grad - trainable)[:5])
    opt.step()
    frozen_changed = [n for n, p in net.named_parameters() if n not in trainable and not torch.equal(p, before[n])]
    assert not frozen_changed
    net.eval()
    with torch.no_grad():
        out = net(x)
    out = out[-1] if isinstance(out, (list, tuple)) else out
    assert torch.isfinite(out).all()


def _stock_sam(bundle: str, net: torch.nn.Module) -> Sam:
    v = get_variant("tiny")
    kwargs: dict[str, Any] = {"num_multimask_outputs": 2} if bundle in ("h_sam", "ma_sam") else {}
    if bundle == "s_sam":  # S-SAM (paper mode) attends globally in every block, as its official code
        v = dataclasses.replace(v, global_attn_indexes=tuple(range(v.encoder_depth)))
    torch.manual_seed(123)
    stock = build_sam(v, None, img_size=S, patch_size=8, use_sdpa=False, **kwargs).eval()
    assert type(stock) is Sam
    return stock


def _encoder(bundle: str, net: torch.nn.Module) -> torch.nn.Module:
    return net.sam.image_encoder if bundle in ("ma_sam", "s_sam") else net.image_encoder


@pytest.mark.parametrize("peft", MERGEABLE)
@pytest.mark.parametrize("bundle", list(STOCK_EXTRAS_OFF))
def test_merged_export_loads_into_stock_sam(bundle, peft):
    net = _build(bundle, peft=peft, **STOCK_EXTRAS_OFF[bundle]).eval()
    assert not find_unmergeable(net)
    if peft in ("lora", "fact", "svd"):
        assert _perturb(net) > 0
    images = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = _encoder(bundle, net)(images)
    state = export_merged_state_dict(net)
    if bundle in ("ma_sam", "s_sam"):  # SAM lives under `sam.`; S-SAM's TAL is its own module
        state = {k[4:]: v for k, v in state.items() if k.startswith("sam.")}
    stock = _stock_sam(bundle, net)
    stock.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stock.image_encoder(images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("peft", ("lora", "fact", "svd"))
def test_sam3d_adapter_merged_export_loads_into_its_frozen_network(peft):
    net = _build("sam3d_adapter", peft=peft).eval()
    assert not find_unmergeable(net)
    assert _perturb(net) > 0
    x, _ = _batch("sam3d_adapter", net)
    with torch.no_grad():
        expected = net(x)
    plain = _build("sam3d_adapter", peft="frozen").eval()
    plain.load_state_dict(export_merged_state_dict(net), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "bundle, alias, value, peft",
    [
        ("h_sam", "finetune", "full", "full"),
        ("ma_sam", "finetune", "frozen", "frozen"),
        ("med_sa", "full_finetune", True, "full"),
        ("s_sam", "full_finetune", True, "full"),
        ("sam3d_adapter", "full_finetune", True, "full"),
    ],
)
def test_old_keys_are_aliases_and_contradictions_are_refused(bundle, alias, value, peft):
    assert _build(bundle, **{alias: value}).peft == peft
    with pytest.raises(ValueError, match=rf"peft='lora' contradicts {alias}="):
        _build(bundle, peft="lora", **{alias: value})


@pytest.mark.parametrize("bundle", list(BUILD))
def test_builders_log_their_trainable_parameters(bundle, caplog):
    with caplog.at_level(logging.INFO, logger="shared_nets.peft"):
        net = _build(bundle, peft="fact")
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert f"(peft=fact): {trainable} of {sum(p.numel() for p in net.parameters())} parameters trainable" in caplog.text
