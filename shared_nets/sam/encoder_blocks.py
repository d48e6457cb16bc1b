"""Running a SAM image encoder (ViT or LiteMedSAM's TinyViT) block by block, so a method can wrap each block."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .tiny_vit import TinyViTBlock, TinyViTEncoder

__all__ = ["block_width", "run_encoder"]


def block_width(block: nn.Module) -> int:
    """Token width of a SAM ViT ``Block`` (``norm1``) or a TinyViT block (its attention's ``norm``)."""
    norm = block.attn.norm if isinstance(block, TinyViTBlock) else block.norm1
    return int(norm.normalized_shape[0])


def run_encoder(
    encoder: nn.Module, images: torch.Tensor, block_fn: Callable[[int, nn.Module, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """An image encoder's forward pass with each block replaced by ``block_fn(i, block, tokens)``.

    SAM's ViT: patch embedding (+ position embedding), blocks, neck. LiteMedSAM's TinyViT:
    patch embedding, the convolutional stage, then per attention stage its blocks and patch
    merging, neck; ``i`` counts attention blocks over all stages (``encoder.blocks`` order), whose
    token grids and widths change between stages. Tokens are ``[B, h, w, C]`` in both.

    Args:
        encoder: ``ImageEncoderViT`` or :class:`~shared_nets.sam.tiny_vit.TinyViTEncoder`.
        images: ``[B, 3, S, S]``.
        block_fn: runs block ``i`` (e.g. with adapters around it); ``lambda i, b, t: b(t)`` is the encoder.

    Returns:
        The neck output ``[B, C', h, w]``.
    """
    if isinstance(encoder, TinyViTEncoder):
        t = encoder.layers[0](encoder.patch_embed(images))
        i = 0
        for layer in encoder.layers[1:]:
            for blk in layer.blocks:
                t = block_fn(i, blk, t)
                i += 1
            if layer.downsample is not None:
                t = layer.downsample(t.permute(0, 3, 1, 2).contiguous())
        return encoder.neck(t.permute(0, 3, 1, 2).contiguous())
    t = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        t = t + encoder.pos_embed
    for i, blk in enumerate(encoder.blocks):
        t = block_fn(i, blk, t)
    return encoder.neck(t.permute(0, 3, 1, 2))
