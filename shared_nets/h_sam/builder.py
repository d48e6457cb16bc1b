"""Thin typed builder of :class:`~shared_nets.h_sam.network.HSAM`: SAM, stage-2 decoder, LoRA, in that order.

Composition as in ``segment_anything``'s ``build_sam.py`` (parts built, then ``Sam(image_encoder,
prompt_encoder, mask_decoder)``) and MONAI's ``vista3d132`` factory: this function builds the parts,
the network only composes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from shared_nets.peft import LoRAQKV, apply_peft, log_peft_build, resolve_peft
from shared_nets.sam import build_sam, get_variant

from .decoder import MASK_ATTENTION_MODES, HSAMStage2Decoder
from .network import ENSEMBLE_MODES, HSAM

__all__ = ["build_h_sam"]


def build_h_sam(
    variant: str = "vit_b",
    checkpoint: str | os.PathLike | None = None,
    img_size: int = 512,
    num_classes: int = 8,
    in_channels: int = 1,
    patch_size: int = 16,
    peft: str | None = None,
    finetune: str | None = None,
    lora_rank: int = 4,
    fact_rank: int = 32,
    adapter_ratio: float = 0.25,
    use_stage2: bool = True,
    mask_attention: str = "learnable",
    use_cmattn: bool = True,
    use_hierarchical_pixel_decoder: bool = True,
    ensemble: str = "probability",
    released_cmattn: bool = False,
    released_attention_order: bool = False,
    embedding_noise: float = 0.0,
    decoder2_dropout: float = 0.2,
    cmattn_noise_var: Sequence[float] | None = None,
    cmattn_noise_max_var: float = 0.1,
    cmattn_num_heads: int | None = None,
    pos_embed_mode: str = "bicubic",
    gradient_checkpointing: bool = False,
    use_sdpa: bool = True,
) -> HSAM:
    """Build H-SAM (sec. 3): SAM with one mask token per class, the mask-guided stage-2 decoder, LoRA on q and v.

    Every ablation of the paper is an argument: mask attention (Tables 4, 5), CMAttn and the
    hierarchical pixel decoder (Table 4), backbone and image size (Table 1), LoRA rank.

    Args:
        variant: SAM backbone, ``vit_b`` | ``vit_l`` | ``vit_h`` | ``lite`` | ``tiny``. At ``lite``
            (LiteMedSAM's TinyViT, embedding stride 4) LoRA goes on q and v of all 10 attention blocks
            (TinyViT's per-head qkv layout) and stage 1 already predicts at full resolution.
        checkpoint: official SAM ``.pth`` (loaded strictly before LoRA is injected), or None.
        img_size: in-plane input size (paper: 512 few-shot, 224 fully supervised); inputs must
            already have this size.
        num_classes: foreground classes; outputs ``num_classes + 1`` channels (0 = background).
        in_channels: image channels, 1 (grey, repeated to 3) or 3 (RGB).
        patch_size: ViT patch size (16 for checkpoints; 8 gives ``tiny`` a finer token grid).
        peft: how the image encoder is tuned, one of :data:`shared_nets.peft.PEFT_METHODS`; None is
            the paper's ``"lora"`` (sec. 3.1). Both decoders are always trained; the prompt
            encoder's default (no-mask) embedding too.
        finetune: old name of ``peft`` (kept as an alias; a different ``peft`` raises).
        lora_rank: LoRA rank on q and v of every encoder block (paper 4; released code 5).
        fact_rank: FacT rank for ``peft="fact"``.
        adapter_ratio: bottleneck width / block width for ``peft="adapter"``
            (:func:`shared_nets.peft.inject_adapters`).
        use_stage2: False gives the SAMed baseline (Table 4 first row): stage 1 only.
        mask_attention: stage-2 cross-attention, ``learnable`` (paper eq. 3), ``binary``
            (Mask2Former's, Table 5) or ``none`` (Table 4).
        use_cmattn: CMAttn (sec. 3.2; Table 4).
        use_hierarchical_pixel_decoder: full-resolution skip-connected pixel decoder (sec. 3.4;
            Table 4); without it stage 2 predicts at H/4 like SAM.
        ensemble: one of :data:`ENSEMBLE_MODES`.
        released_cmattn: reproduce the released CMAttn, which reduces to ``E + E`` (a no-op).
        released_attention_order: both decoders' blocks run cross-attention before
            self-attention as the released code does (SAM and the paper: self-attention first).
        embedding_noise: released training adds Gaussian noise of std
            ``embedding_noise · (max - min)`` of the image embedding before stage 2 (released 0.2;
            not in the paper, default 0).
        decoder2_dropout: dropout on stage 2's token→image attention output (released 0.2).
        cmattn_noise_var: per-class CMAttn noise variances (``num_classes + 1`` values, computed
            offline, e.g. by :func:`shared_nets.h_sam.decoder.class_balanced_noise_var`);
            None estimates them per batch from the label.
        cmattn_noise_max_var: variance of the rarest class for the per-batch estimate.
        cmattn_num_heads: CMAttn heads; None: the largest divisor of ``h*w`` up to 8 (as released).
        pos_embed_mode: position-embedding resizing of the checkpoint, ``bicubic`` | ``avgpool``.
        gradient_checkpointing: recompute the image-encoder blocks in the backward pass instead of
            keeping their activations (training memory; same outputs and gradients).
        use_sdpa: compute the image encoder's attention with ``scaled_dot_product_attention``
            (:func:`shared_nets.sam.enable_sdpa`; same weights and outputs within 1e-4, no
            ``N x N`` softmax matrices kept). False runs ``segment_anything``'s stock attention.

    Returns:
        the composed :class:`~shared_nets.h_sam.network.HSAM`.
    """
    if not isinstance(use_sdpa, bool):
        raise ValueError(f"use_sdpa must be true or false, got {use_sdpa!r}.")
    v = get_variant(variant)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer (foreground classes), got {num_classes!r}.")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels!r}.")
    peft = resolve_peft(peft, "lora", finetune=finetune)
    if peft == "lora" and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}.")
    if mask_attention not in MASK_ATTENTION_MODES:
        raise ValueError(f"mask_attention must be one of {MASK_ATTENTION_MODES}, got {mask_attention!r}.")
    if ensemble not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble must be one of {ENSEMBLE_MODES}, got {ensemble!r}.")
    if not use_stage2 and ensemble != "stage1":
        ensemble = "stage1"
    if isinstance(embedding_noise, bool) or not isinstance(embedding_noise, (int, float)) or not embedding_noise >= 0:
        raise ValueError(f"embedding_noise must be a number >= 0, got {embedding_noise!r}.")
    if (
        isinstance(decoder2_dropout, bool)
        or not isinstance(decoder2_dropout, (int, float))
        or not 0 <= decoder2_dropout < 1
    ):
        raise ValueError(f"decoder2_dropout must be a number in [0, 1), got {decoder2_dropout!r}.")
    if (
        isinstance(patch_size, bool)
        or not isinstance(patch_size, int)
        or patch_size < 8
        or patch_size & (patch_size - 1)
    ):
        raise ValueError(
            f"patch_size must be a power of two >= 8 (stage 1 predicts at patch/4 of the input and stage 2 "
            f"upsamples from there to full size), got {patch_size!r}."
        )
    stride = v.embedding_stride if v.encoder == "tiny_vit" else patch_size  # lite: S/4 tokens whatever patch_size

    # sec. 3.1: SAM built and its checkpoint loaded first; SAMed-style one mask token per class
    sam = build_sam(
        v,
        checkpoint,
        img_size,
        patch_size,
        num_multimask_outputs=num_classes,
        pos_embed_mode=pos_embed_mode,
        use_sdpa=use_sdpa,
    )
    grid = (img_size // stride, img_size // stride)
    mask_decoder2 = (
        HSAMStage2Decoder(
            transformer_dim=v.prompt_embed_dim,
            num_tokens=num_classes + 1,
            grid=grid,
            patch_size=stride,
            depth=v.decoder_depth,
            num_heads=v.decoder_num_heads,
            mlp_dim=v.decoder_mlp_dim,
            mask_attention=mask_attention,
            use_cmattn=use_cmattn,
            use_hierarchical_pixel_decoder=use_hierarchical_pixel_decoder,
            cross_first=released_attention_order,
            dropout=float(decoder2_dropout),
            cmattn_num_heads=cmattn_num_heads,
            cmattn_mlp_dim=v.decoder_mlp_dim,
            cmattn_noise_var=cmattn_noise_var,
            cmattn_noise_max_var=cmattn_noise_max_var,
            released_cmattn=released_cmattn,
        )
        if use_stage2
        else None
    )
    # sec. 3.1: LoRA on q and v (SAMed), or another peft setting, injected after the checkpoint is loaded
    apply_peft(sam.image_encoder, peft, lora_rank=lora_rank, fact_rank=fact_rank, adapter_ratio=adapter_ratio)
    lora_layers = [m for m in sam.image_encoder.modules() if isinstance(m, LoRAQKV)]
    net = HSAM(
        sam,
        mask_decoder2,
        lora_layers,
        variant=v.name,
        img_size=img_size,
        num_classes=num_classes,
        in_channels=in_channels,
        patch_size=stride,
        finetune=peft,
        ensemble=ensemble,
        released_attention_order=released_attention_order,
        embedding_noise=embedding_noise,
        gradient_checkpointing=gradient_checkpointing,
    )
    log_peft_build(net, "H-SAM", peft)
    return net
