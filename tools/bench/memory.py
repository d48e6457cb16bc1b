"""Real-size training memory with each switch, estimated with fake tensors (CPU-feasible)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared_nets.distributed import fsdp_units

from .inputs import _value, bundle_parser, network_case


def _kept_activation_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the fake tensors autograd keeps for the backward pass while ``fn()`` runs (parameters excluded)."""
    from torch._subclasses.fake_tensor import FakeTensor

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, FakeTensor):
            saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def train_memory_estimate(bundle_root: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Training memory of a bundle's real-size network with each switch (batch 1), without a GPU.

    The network is built from ``train.json`` (random weights); the forward runs on fake tensors
    (no memory, no compute) and the tensors autograd keeps for the backward pass are summed, with
    and without gradient checkpointing and bf16 autocast (standing in for CUDA AMP). Weights,
    gradients and AdamW state (two moments) of the trainable parameters are added. The real peak
    also holds the backward's transient buffers (one block's activations when checkpointing).

    Returns:
        ``{"config", "state_gb", "<switch>": {"activations_gb", "total_gb"}}`` for switch in
        none / grad-ckpt / AMP / both.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    root = Path(bundle_root)
    ov = {"bundle_root": str(root), "device": "$torch.device('cpu')", "sam_checkpoint": None, **(overrides or {})}
    parser = bundle_parser(root, ["train.json"], ov)
    case = network_case(parser)
    net = parser.get_parsed_content("network_def").train()
    name = type(net).__name__
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    state = params + 3 * trainable  # weights, gradients, AdamW moments
    out: dict[str, Any] = {"network": name, "state_gb": state / 2**30}
    units = [sum(p.numel() * p.element_size() for p in u.parameters()) for u in fsdp_units(net)]
    if units:  # FSDP (use_fsdp): the largest unit gathered at a time, and the root unit (gathered throughout)
        out["fsdp_unit_gb"], out["fsdp_root_gb"] = max(units) / 2**30, (params - sum(units)) / 2**30
    own = case.estimate_training_memory(net, parser, state)
    if own is not None:
        out.update(own)
        return out
    if "num_slices" not in parser or "img_size" not in parser:
        return {"network": name, "error": "no img_size/num_slices in train.json"}
    size, depth = int(parser.get_parsed_content("img_size")), int(parser.get_parsed_content("num_slices"))
    out["config"] = f"{_value(parser, 'variant')}@{size}, {depth} slices, batch 1"
    real_x = case.memory_estimate_input(net, size, depth)
    for label, ckpt, amp in (
        ("none", False, False),
        ("grad-ckpt", True, False),
        ("AMP", False, True),
        ("both", True, True),
    ):
        case.set_gradient_checkpointing(net, ckpt)
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.zeros_like(real_x)
            act = _kept_activation_bytes(partial(_autocast_forward, net, x, amp))
        out[label] = {"activations_gb": act / 2**30, "total_gb": (act + state) / 2**30}
    return out


def _autocast_forward(net: nn.Module, x: torch.Tensor, amp: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        net(x)


def fsdp_memory_estimate(
    bundle_root: str | os.PathLike, overrides: dict[str, Any] | None = None, gpus: Sequence[int] = (1, 2, 4, 8)
) -> dict[str, Any]:
    """Per-GPU training memory (GB, batch 1 per GPU) of ``multi_gpu_train.json`` with DDP and with ``use_fsdp``,
    for each GPU count, from :func:`train_memory_estimate`.

    Data parallel either way: every GPU keeps its own batch's activations. DDP keeps the whole state
    (weights, gradients, AdamW moments) on every GPU; FSDP keeps 1/N of it, plus the root unit's weights
    (gathered for the whole step) and two attention/MLP units (the one running and the one prefetched).
    Communication buffers and the allocator's slack come on top.

    Returns:
        ``{"config", "<switch>": {"ddp": gb, "fsdp": {N: gb}}}`` for switch in none / grad-ckpt / AMP / both.
    """
    est = train_memory_estimate(bundle_root, overrides)
    out: dict[str, Any] = {"config": est.get("config"), "network": est.get("network")}
    state, root, unit = est["state_gb"], est.get("fsdp_root_gb", 0.0), est.get("fsdp_unit_gb", 0.0)
    for label in ("none", "grad-ckpt", "AMP", "both"):
        act = est[label]["activations_gb"]
        out[label] = {
            "ddp": act + state,
            "fsdp": {n: act + state / n + (root + 2 * unit if n > 1 else 0.0) for n in gpus},
        }
    return out
