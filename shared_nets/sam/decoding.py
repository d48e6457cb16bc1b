"""SAM's mask decoder run with one prompt set per image (row ``n`` with row ``n``), for batches of slices."""

from __future__ import annotations

from collections.abc import Callable

import torch
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import nn

__all__ = ["decode_masks"]


def decode_masks(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    upscaling: Callable[[torch.Tensor], torch.Tensor] | None = None,
    hypernetworks: nn.ModuleList | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a SAM ``MaskDecoder`` with one prompt set per image (row ``n`` with row ``n``).

    ``MaskDecoder.predict_masks`` assumes one image and many prompts and repeats the image
    per prompt row; for a batch of slices each with its own prompt that multiplies the batch.
    This pairs rows instead (sparse/dense with batch 1 broadcast to all images).

    Args:
        decoder: the SAM mask decoder (its transformer, tokens and IoU head are used).
        image_embeddings: ``[N, C, h, w]``.
        image_pe: ``[1, C, h, w]`` dense positional encoding.
        sparse: ``[N or 1, T, C]`` prompt tokens.
        dense: ``[N or 1, C, h, w]`` dense prompt embedding.
        upscaling: replaces ``decoder.output_upscaling``, any callable ``[N, C, h, w] -> [N, C', H', W']``
            (e.g. a method's own full-resolution up-sampling head).
        hypernetworks: replaces ``decoder.output_hypernetworks_mlps`` (matching ``upscaling`` width).

    Returns:
        masks ``[N, num_mask_tokens, H', W']`` and IoU predictions ``[N, num_mask_tokens]``.
    """
    n = image_embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse.expand(n, -1, -1)], dim=1)
    src = image_embeddings + dense
    pos_src = image_pe.expand(n, -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    up = (upscaling or decoder.output_upscaling)(src.transpose(1, 2).reshape(b, c, h, w))
    mlps = hypernetworks or decoder.output_hypernetworks_mlps
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(mlps)], dim=1)
    b, c, h, w = up.shape
    masks = (hyper_in @ up.reshape(b, c, h * w)).reshape(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)
