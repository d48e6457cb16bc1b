"""Fold PEFT deltas into the base weights, and export a plain ``segment_anything`` state dict."""

from __future__ import annotations

import torch
from torch import nn

from .base import PeftLayer
from .fact import FacTFactors

__all__ = ["merge_peft", "unmerge_peft", "export_merged_state_dict", "find_unmergeable"]


def _peft_layers(model: nn.Module) -> list[tuple[str, PeftLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PeftLayer)]


def merge_peft(model: nn.Module, safe_merge: bool = False) -> int:
    """Merge every unmerged :class:`PeftLayer` in ``model`` (LoRA, FacT, SVD), in place.

    Args:
        model: any module containing PEFT layers.
        safe_merge: check each merged weight is finite before writing it (``ValueError`` otherwise;
            layers merged before the failing one stay merged).

    Returns:
        The number of layers merged by this call.
    """
    merged = 0
    for _, layer in _peft_layers(model):
        if not layer.merged:
            layer.merge(safe_merge=safe_merge)
            merged += 1
    return merged


def unmerge_peft(model: nn.Module) -> int:
    """Unmerge every merged :class:`PeftLayer` in ``model``, in place.

    Returns:
        The number of layers unmerged by this call.
    """
    unmerged = 0
    for _, layer in _peft_layers(model):
        if layer.merged:
            layer.unmerge()
            unmerged += 1
    return unmerged


def find_unmergeable(model: nn.Module) -> list[str]:
    """Names of the submodules whose effect cannot be folded into base weights.

    These are modules whose class sets ``peft_unmergeable = True`` (our adapters do; method
    networks may mark their own additions the same way).
    """
    return [name for name, m in model.named_modules() if getattr(type(m), "peft_unmergeable", False)]


@torch.no_grad()
def export_merged_state_dict(model: nn.Module, drop_unmergeable: bool = False) -> dict[str, torch.Tensor]:
    """A state dict of ``model`` with every PEFT wrapper folded into its base layer's plain keys.

    Each ``<path>.base_layer.<x>`` becomes ``<path>.<x>`` with ``<path>.weight`` = base + delta,
    the PEFT parameters and buffers (``lora_*``, ``fact_cores``, SVD ``U``/``S``/``Vh``/``scale``/
    ``shift``) and the shared ``fact_factors`` are dropped. A SAM adapted with LoRA, FacT or SVD
    thus exports to a state dict that stock ``segment_anything`` classes (e.g.
    ``shared_nets.sam.build_sam``) load with ``strict=True`` and that computes the same outputs.
    The model itself is not modified (merged or not, it stays as it was).

    Args:
        model: the adapted model.
        drop_unmergeable: drop the keys of modules that cannot be folded (see
            :func:`find_unmergeable`, e.g. adapters) instead of raising.

    Returns:
        ``{name: tensor}``; folded weights are new tensors, other entries are the usual
        ``state_dict`` references.

    Raises:
        ValueError: if ``model`` has unmergeable modules and ``drop_unmergeable`` is False.
    """
    unmergeable = find_unmergeable(model)
    if unmergeable and not drop_unmergeable:
        shown = ", ".join(unmergeable[:8]) + (f", ... ({len(unmergeable)} in all)" if len(unmergeable) > 8 else "")
        raise ValueError(
            f"model has modules that cannot be folded into SAM's weights: {shown}; "
            "pass drop_unmergeable=True to export without them."
        )
    layers = _peft_layers(model)
    prefixes = {(name + "." if name else ""): layer for name, layer in layers}
    dropped = [n + "." if n else "" for n in unmergeable]
    dropped += [n + "." if n else "" for n, m in model.named_modules() if isinstance(m, FacTFactors)]

    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if any(key.startswith(p) for p in dropped):
            continue
        # The innermost PEFT layer owning this key, if any (PEFT layers do not nest, but be exact).
        owner = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) :]
        if not rest.startswith("base_layer."):
            continue  # a PEFT parameter or buffer
        rest = rest[len("base_layer.") :]
        out[owner + rest] = prefixes[owner].merged_weight() if rest == "weight" else value
    return out
