"""Thin typed builder of :class:`~shared_nets.s_sam.network.SSAM` from the paper's settings.

Builds SAM (:func:`shared_nets.sam.build_sam`, checkpoint loaded strictly first), sets its attention
layout, reads the label-name vectors, builds the Text-Affine Layer, injects the singular-value
re-parameterisation, and composes them, the way ``segment_anything``'s ``build_sam.py`` composes
``Sam(image_encoder, prompt_encoder, mask_decoder)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from shared_nets.peft import apply_peft, inject_svd, log_peft_build, resolve_peft
from shared_nets.sam import build_sam, get_variant

from .network import S_SAM_MODES, SSAM, TAL_TYPES, TextAffineLayer, _check_bool
from .text import TEXT_EMBEDDING_DIM, HashTextEncoder, load_class_embeddings

__all__ = ["build_s_sam"]

# Encoder layers S-SAM re-parameterises (paper section 3, "SVD-based Tuning"; neck convs: code).
_SVD_TARGETS = ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2", "neck")
# The same layers in LiteMedSAM's TinyViT blocks (its MLP's linears are fc1/fc2; the neck has two convs too)
_SVD_TARGETS_TINY_VIT = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "neck")


def build_s_sam(
    variant: str = "vit_b",
    checkpoint: str | os.PathLike | None = None,
    img_size: int = 256,
    class_names: Sequence[str] = ("liver",),
    text_embeddings: str | None = None,
    text_dim: int = TEXT_EMBEDDING_DIM,
    mode: str = "paper",
    tal: str | None = None,
    use_tal: bool = True,
    svd_scale: bool = True,
    svd_shift: bool = True,
    train_pos_embed: bool = True,
    train_norms: bool = True,
    train_decoder_norms: bool | None = None,
    use_rel_pos: bool | None = None,
    global_attention: bool = True,
    peft: str | None = None,
    full_finetune: bool | None = None,
    lora_rank: int = 4,
    fact_rank: int = 32,
    adapter_ratio: float = 0.25,
    resize_input: bool = False,
    pixel_norm: bool = False,
    patch_size: int = 16,
    pos_embed_mode: str = "avgpool",
    gradient_checkpointing: bool = False,
    use_sdpa: bool = True,
) -> SSAM:
    """Build an S-SAM network on the 5D tensor contract ``[B, C, H, W, D] -> [B, K, H, W, D]``.

    ``K = 1 + len(class_names)``: channel 0 is a constant 0 logit (background), channel ``i`` the
    logit of ``class_names[i - 1]``.

    Args:
        variant: SAM backbone, ``vit_b`` (paper), ``vit_l``, ``vit_h``, ``lite`` or ``tiny``. At
            ``lite`` (LiteMedSAM's TinyViT) the singular values of every attention block's qkv, proj,
            fc1 and fc2 and of the neck's two convolutions are tuned; TinyViT has no position
            embedding or relative-position tables (``train_pos_embed``/``use_rel_pos`` do nothing)
            and keeps its windowed attention (``global_attention`` does nothing: its learned biases
            are per window offset).
        checkpoint: official SAM ``.pth`` (loaded first, strictly, position embedding
            average-pooled to the token grid), or None for random initialisation.
        img_size: in-plane input size (256 in the official code); divisible by ``patch_size``.
        class_names: label names to segment, in output-channel order (from the bundle's
            ``channel_def``, background excluded). A subset predicts only those classes.
        text_embeddings: JSON file with the stored label-name embeddings (see
            :mod:`shared_nets.s_sam.text`), or None to use deterministic hash vectors
            (tests; carries no semantics).
        text_dim: text embedding width (512 for CLIP ViT-B/32).
        mode: ``paper`` or ``official``; sets the defaults of ``tal``, ``train_decoder_norms``
            and ``use_rel_pos`` (see :mod:`shared_nets.s_sam.network`).
        tal: ``linear`` or ``linear_relu_bn``; None follows ``mode``.
        use_tal: Table 3 "TAL" switch. False feeds the first prompt-dim entries of the text
            embedding as the token (what the official code does without its TAL).
        svd_scale: Table 3 "Scaling": train ``a`` (else fixed at 1).
        svd_shift: Table 3 "Shifting": train ``b`` (else fixed at 0).
        train_pos_embed: Table 3 "Tuning Pos Embeds".
        train_norms: Table 3 "Tuning Layernorm" (the LayerNorms of the encoder blocks).
        train_decoder_norms: train the mask decoder's LayerNorms; None follows ``mode``.
        use_rel_pos: use SAM's relative position tables in attention; False removes them (the
            official network has none); None follows ``mode``.
        global_attention: global attention in every encoder block (official code); False
            keeps SAM's windowed blocks.
        peft: how the image encoder is tuned, one of :data:`shared_nets.peft.PEFT_METHODS`; None is
            the paper's ``"svd"`` (singular values, ``svd_scale``/``svd_shift``; with both False no
            SVD layers, Table 3). ``"full"`` trains every parameter of SAM that the forward pass uses,
            and the TAL, without the SVD re-parameterisation ("SAM with full finetuning" in Tables 2,
            4, 5; used by the demo, which trains ``tiny`` from scratch). Under every setting but
            ``"full"`` the TAL and the Table-3 switches (``train_pos_embed``, ``train_norms``,
            ``train_decoder_norms``) apply as well.
        full_finetune: old switch, alias of ``peft="full"`` (a different ``peft`` raises).
        lora_rank: LoRA rank for ``peft="lora"``.
        fact_rank: FacT rank for ``peft="fact"``.
        adapter_ratio: bottleneck width / block width for ``peft="adapter"``.
        resize_input: if True, slices whose in-plane size is not ``img_size`` are resized
            bilinearly in and the logits back; if False (default) such input is an error,
            since the bundles resize in pre-processing (and invert after argmax).
        pixel_norm: subtract SAM's pixel mean and divide by its std per RGB channel, for
            input scaled to [0, 255] (what the official code does in its data transforms).
        patch_size: ViT patch size (16 for SAM checkpoints; 8 gives ``tiny`` demos a finer grid).
        pos_embed_mode: resizing of the checkpoint's position embedding: ``avgpool`` (paper)
            or ``bicubic``.
        gradient_checkpointing: recompute the image-encoder blocks in the backward pass instead of
            keeping their activations (training memory; same outputs and gradients).
        use_sdpa: compute the image encoder's attention with ``scaled_dot_product_attention``
            (:func:`shared_nets.sam.enable_sdpa`; same weights and outputs within 1e-4, no
            ``N x N`` softmax matrices kept). False runs ``segment_anything``'s stock attention.

    Returns:
        The composed :class:`SSAM` with S-SAM's trainable set. Parts are created (and random numbers
        drawn) in a fixed order: SAM, text vectors, TAL, SVD layers, so one seed gives one network.
    """
    if not isinstance(use_sdpa, bool):
        raise ValueError(f"use_sdpa must be true or false, got {use_sdpa!r}.")
    if mode not in S_SAM_MODES:
        raise ValueError(f"mode must be one of {S_SAM_MODES}, got {mode!r}.")
    for name, value in (
        ("use_tal", use_tal),
        ("svd_scale", svd_scale),
        ("svd_shift", svd_shift),
        ("train_pos_embed", train_pos_embed),
        ("train_norms", train_norms),
        ("global_attention", global_attention),
        ("resize_input", resize_input),
        ("pixel_norm", pixel_norm),
    ):
        _check_bool(value, name)
    if full_finetune is not None:
        _check_bool(full_finetune, "full_finetune")
    peft = resolve_peft(peft, "svd", full_finetune=full_finetune)
    official = mode == "official"
    tal = tal if tal is not None else ("linear_relu_bn" if official else "linear")
    if tal not in TAL_TYPES:
        raise ValueError(f"tal must be one of {TAL_TYPES} or null, got {tal!r}.")
    if train_decoder_norms is None:
        train_decoder_norms = official
    if use_rel_pos is None:
        use_rel_pos = not official
    _check_bool(train_decoder_norms, "train_decoder_norms")
    _check_bool(use_rel_pos, "use_rel_pos")
    if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not class_names:
        raise ValueError(f"class_names must be a non-empty list of label names, got {class_names!r}.")
    if not all(isinstance(n, str) and n.strip() for n in class_names):
        raise ValueError(f"class_names must hold non-empty strings, got {list(class_names)!r}.")
    if not isinstance(text_dim, int) or text_dim < 1:
        raise ValueError(f"text_dim must be a positive integer, got {text_dim!r}.")

    v = get_variant(variant)
    if global_attention and v.encoder != "tiny_vit":
        # Code: every block attends globally (window_size 0 everywhere); the paper is silent.
        v = dataclasses.replace(v, global_attn_indexes=tuple(range(v.encoder_depth)))
    sam = build_sam(
        v,
        checkpoint=checkpoint,
        img_size=img_size,
        patch_size=patch_size,
        pos_embed_mode=pos_embed_mode,
        use_sdpa=use_sdpa,
    )
    if not use_rel_pos and v.encoder != "tiny_vit":
        # Official-code behaviour (JayParanjape/SVDSAM model.py builds ImageEncoderViT with
        # use_rel_pos=False): the blocks have no relative-position tables at all.
        for blk in sam.image_encoder.blocks:
            blk.attn.use_rel_pos = False
            del blk.attn.rel_pos_h, blk.attn.rel_pos_w

    names = [str(n) for n in class_names]
    prompt_dim = v.prompt_embed_dim
    if not use_tal and text_dim < prompt_dim:
        raise ValueError(
            f"use_tal=false feeds the first {prompt_dim} text entries as the token; text_dim={text_dim} is smaller."
        )
    # Label-name prompts (paper section 3): fixed text vectors.
    if text_embeddings is None:
        text = HashTextEncoder(text_dim)(names)
    else:
        text = load_class_embeddings(os.fspath(text_embeddings), names, dim=text_dim)
    tal_layer = TextAffineLayer(text_dim, prompt_dim, tal) if use_tal else None

    # Singular-value re-parameterisation (eq. 2), injected after the checkpoint is loaded.
    if peft == "svd" and (svd_scale or svd_shift):
        inject_svd(sam.image_encoder, include=_SVD_TARGETS_TINY_VIT if v.encoder == "tiny_vit" else _SVD_TARGETS)
    elif peft in ("lora", "fact", "adapter"):
        apply_peft(sam.image_encoder, peft, lora_rank=lora_rank, fact_rank=fact_rank, adapter_ratio=adapter_ratio)
    net = SSAM(
        sam,
        text,
        names,
        tal_layer,
        img_size=img_size,
        mode=mode,
        full_finetune=peft == "full",
        peft=peft,
        resize_input=resize_input,
        pixel_norm=pixel_norm,
        gradient_checkpointing=gradient_checkpointing,
    )
    net.set_trainable(svd_scale, svd_shift, train_pos_embed, train_norms, train_decoder_norms)
    log_peft_build(net, "S-SAM", peft)
    return net
