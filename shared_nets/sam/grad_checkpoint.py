"""Gradient checkpointing of image-encoder blocks as a switch on built modules.

:func:`enable_gradient_checkpointing` swaps each block's class for a subclass whose ``forward``
runs the block under ``torch.utils.checkpoint.checkpoint`` (non-reentrant) while training with
autograd on: its activations are recomputed in the backward pass instead of being kept. Like
:func:`shared_nets.sam.enable_sdpa` it adds no parameters and keeps ``state_dict`` keys, PEFT
wrappers inside the block and checkpoints unchanged; in eval mode or without autograd the block
runs its own forward. Outputs and gradients equal the plain forward's (tested).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["enable_gradient_checkpointing", "is_gradient_checkpointed"]

_SUBCLASSES: dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    """The checkpointing subclass of ``cls`` (one per class, created once)."""
    if cls not in _SUBCLASSES:
        base_forward = cls.forward

        def forward(self: nn.Module, *args, **kwargs):
            if self.training and torch.is_grad_enabled():
                return checkpoint(base_forward, self, *args, use_reentrant=False, **kwargs)
            return base_forward(self, *args, **kwargs)

        _SUBCLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "_plain_class": cls})
    return _SUBCLASSES[cls]


def enable_gradient_checkpointing(blocks: Iterable[nn.Module], enabled: bool = True) -> int:
    """Switch gradient checkpointing of each module in ``blocks`` on or off, in place.

    Args:
        blocks: the encoder blocks (e.g. ``sam.image_encoder.blocks``), each checkpointed as a whole.
        enabled: True to checkpoint, False to restore the plain forward.

    Returns:
        The number of blocks switched.
    """
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"enable_gradient_checkpointing takes the encoder's blocks (a ModuleList such as image_encoder.blocks), "
            f"got a single {type(blocks).__name__}."
        )
    n = 0
    for blk in blocks:
        plain = getattr(type(blk), "_plain_class", type(blk))
        blk.__class__ = _checkpointed(plain) if enabled else plain
        n += 1
    return n


def is_gradient_checkpointed(blocks: Iterable[nn.Module]) -> bool:
    """Whether every module of ``blocks`` is checkpointed."""
    blocks = list(blocks)
    return bool(blocks) and all(hasattr(type(b), "_plain_class") for b in blocks)
