"""Thin typed builder of :class:`~shared_nets.med_sa.network.MedSA`: SAM, Med-SA's adapters, trainable parameters.

Composition as in ``segment_anything``'s ``build_sam.py`` (parts built, then ``Sam(image_encoder,
prompt_encoder, mask_decoder)``) and MONAI's ``vista3d132`` factory: this function builds the parts,
the network only composes them.
"""

from __future__ import annotations

import os

from torch import nn

from shared_nets.peft import apply_peft, freeze_except, log_peft_build, peft_globs, resolve_peft
from shared_nets.sam import build_sam, get_variant
from shared_nets.sam.encoder_blocks import block_width

from .blocks import PROMPT_FUSIONS, MedSAEncoderBlock, MedSATinyViTBlock, MedSATwoWayTransformer, adapter_width
from .network import PROMPT_SCOPES, MedSA, _check_bool, _check_pos_int

__all__ = ["build_med_sa"]


def build_med_sa(
    variant: str = "vit_h",
    checkpoint: str | os.PathLike | None = None,
    img_size: int = 1024,
    patch_size: int = 16,
    in_channels: int = 1,
    num_classes: int = 2,
    adapter_ratio: float = 0.0625,
    adapter_act: str = "relu",
    adapter_scale: float = 0.5,
    adapter_zero_init: bool = True,
    sd_trans: bool = True,
    depth_adapter: bool = False,
    decoder_adapters: bool = True,
    decoder_adapter_ratio: float = 0.0625,
    hyp_adapter: bool = True,
    prompt_fusion: str = "hyper",
    hyp_layers: int = 3,
    prompt_embed_ratio: float = 0.25,
    max_points: int = 8,
    max_depth: int = 16,
    prompt_scope: str = "slice",
    automatic: bool = False,
    train_mask_decoder: bool = False,
    peft: str | None = None,
    full_finetune: bool | None = None,
    lora_rank: int = 4,
    fact_rank: int = 32,
    embedding_cache: int = 8,
    no_prompt_logit: float = -20.0,
    gradient_checkpointing: bool = False,
    use_sdpa: bool = True,
) -> MedSA:
    """Build Med-SA: SAM (checkpoint loaded first), adapters injected, only the adapters trainable.

    Paper sections: "Med-SA architecture" (adapters, Fig. 1b/d), "SD-Trans" (Fig. 1c),
    "HyP-Adpt" (Eq. 1-2, Fig. 2). :data:`~shared_nets.med_sa.MEDSA_OFFICIAL_CODE_SETTINGS` gives the
    switches that reproduce the official code's model.

    Args:
        variant: SAM backbone ``vit_b`` / ``vit_l`` / ``vit_h`` (paper) / ``lite`` / ``tiny``. At
            ``lite`` every TinyViT attention block gets the space and MLP adapters and the SD-Trans
            depth branch (:class:`~shared_nets.med_sa.blocks.MedSATinyViTBlock`), at its stage's width.
        checkpoint: official SAM ``.pth`` (loaded strictly, rel-pos tables included, before
            the adapters are injected) or None for random initialisation.
        img_size: SAM input side; slices are resized to it inside the network.
        patch_size: ViT patch size (16 for checkpoints; 8 allowed for ``tiny`` demos).
        in_channels: image channels before the 3 guidance channels: 1 (grey, repeated to RGB) or 3.
        num_classes: output channels; must be 2 (background, prompted object).
        adapter_ratio: encoder adapter width / embedding width (paper count: 1/16; code: 1/4).
        adapter_act: ``relu`` (paper) or ``gelu`` (code).
        adapter_scale: ``s`` of the MLP adapters (code: 0.5; the paper does not give it).
        adapter_zero_init: zero-initialise adapter up-projections.
        sd_trans: SD-Trans depth branch for chunks of more than one slice (Table 3 "2D to 3D").
        depth_adapter: third encoder adapter on the depth branch (code; not in the paper).
        decoder_adapters: the three adapters per decoder block (paper; absent from the code).
        decoder_adapter_ratio: decoder adapter width / decoder width.
        hyp_adapter: first decoder adapter prompt-conditioned (True) or plain (False).
        prompt_fusion: how the prompt enters it: ``hyper`` (HyP-Adpt), ``add``, ``concat``
            (the paper's Table 3 alternatives).
        hyp_layers: hyper-prompting layers (paper: 3).
        prompt_embed_ratio: width of the prompt embedding ``e_prompt`` / decoder width.
        max_points: click slots per decoded slice (more clicks raise ``ValueError``).
        max_depth: largest slice chunk ``D`` accepted in one forward.
        prompt_scope: :data:`~shared_nets.med_sa.PROMPT_SCOPES`.
        automatic: allow inputs without any prompt (decoded with SAM's "no prompt" tokens);
            otherwise such an input raises ``ValueError`` naming the guidance channels.
        train_mask_decoder: also train SAM's mask decoder (official code).
        peft: how the image encoder is tuned, one of :data:`shared_nets.peft.PEFT_METHODS`; None is
            the paper's ``"adapter"`` (Med-SA's space and MLP adapters, width ``adapter_ratio``). Other
            settings drop those two adapters and tune the encoder by LoRA/FacT/SVD, fully or not at all;
            SD-Trans, the depth adapter and the decoder adapters keep their own switches. ``"full"``
            trains every parameter (for ``tiny`` demos trained from scratch).
        full_finetune: old switch, alias of ``peft="full"`` (a different ``peft`` raises).
        lora_rank: LoRA rank for ``peft="lora"``.
        fact_rank: FacT rank for ``peft="fact"``.
        embedding_cache: without autograd, keep the embeddings of this many recent images
            (e.g. the windows of one volume) and reuse them when the same image is decoded
            again with new prompts (interactive refinement); 0 disables.
        no_prompt_logit: object logit written for slices without any prompt (non-automatic).
        gradient_checkpointing: recompute the image-encoder blocks in the backward pass instead of
            keeping their activations (training memory; same outputs and gradients).
        use_sdpa: compute the image encoder's attention with ``scaled_dot_product_attention``
            (:func:`shared_nets.sam.enable_sdpa`; same weights and outputs within 1e-4, no
            ``N x N`` softmax matrices kept). False runs ``segment_anything``'s stock attention.

    Returns:
        the composed :class:`~shared_nets.med_sa.network.MedSA`.
    """
    if not isinstance(use_sdpa, bool):
        raise ValueError(f"use_sdpa must be true or false, got {use_sdpa!r}.")
    if in_channels not in (1, 3) or isinstance(in_channels, bool):
        raise ValueError(f"in_channels must be 1 (grey, repeated to RGB) or 3 image channels, got {in_channels!r}.")
    if num_classes != 2 or isinstance(num_classes, bool):
        raise ValueError(
            f"num_classes must be 2 (background and the prompted object; one object per forward), got {num_classes!r}."
        )
    if prompt_fusion not in PROMPT_FUSIONS[:3]:
        raise ValueError(f"prompt_fusion must be one of {PROMPT_FUSIONS[:3]}, got {prompt_fusion!r}.")
    if prompt_scope not in PROMPT_SCOPES:
        raise ValueError(f"prompt_scope must be one of {PROMPT_SCOPES}, got {prompt_scope!r}.")
    for name, value in (
        ("adapter_zero_init", adapter_zero_init),
        ("sd_trans", sd_trans),
        ("depth_adapter", depth_adapter),
        ("decoder_adapters", decoder_adapters),
        ("hyp_adapter", hyp_adapter),
        ("automatic", automatic),
        ("train_mask_decoder", train_mask_decoder),
        ("gradient_checkpointing", gradient_checkpointing),
    ):
        _check_bool(value, name)
    _check_pos_int(max_points, "max_points")
    _check_pos_int(max_depth, "max_depth")
    if isinstance(embedding_cache, bool) or not isinstance(embedding_cache, int) or embedding_cache < 0:
        raise ValueError(
            f"embedding_cache must be a number of cached images >= 0 (0 disables), got {embedding_cache!r}."
        )
    if full_finetune is not None:
        _check_bool(full_finetune, "full_finetune")
    peft = resolve_peft(peft, "adapter", full_finetune=full_finetune)
    encoder_adapters = peft == "adapter"
    v = get_variant(variant)

    # Load SAM (official weights strictly, rel-pos tables included) before injecting adapters.
    sam = build_sam(v, checkpoint=checkpoint, img_size=img_size, patch_size=patch_size, use_sdpa=use_sdpa)
    encoder = sam.image_encoder
    if v.encoder == "tiny_vit":
        # LiteMedSAM: each TinyViT block of every stage, adapters of that stage's width
        for layer in encoder.layers[1:]:
            for j, blk in enumerate(layer.blocks):
                width = adapter_width(block_width(blk), adapter_ratio)
                layer.blocks[j] = MedSATinyViTBlock(
                    blk, width, adapter_act, adapter_scale, adapter_zero_init, sd_trans, depth_adapter, encoder_adapters
                )
    else:
        width = adapter_width(v.encoder_embed_dim, adapter_ratio)
        encoder.blocks = nn.ModuleList(
            MedSAEncoderBlock(
                blk, width, adapter_act, adapter_scale, adapter_zero_init, sd_trans, depth_adapter, encoder_adapters
            )
            for blk in encoder.blocks
        )
    if peft in ("lora", "fact", "svd"):
        apply_peft(encoder, peft, lora_rank=lora_rank, fact_rank=fact_rank)
    if decoder_adapters:
        dim = v.prompt_embed_dim
        sam.mask_decoder.transformer = MedSATwoWayTransformer(
            sam.mask_decoder.transformer,
            num_prompt_tokens=max_points + 2,
            hidden_dim=adapter_width(dim, decoder_adapter_ratio),
            prompt_dim=adapter_width(dim, prompt_embed_ratio),
            fusion=prompt_fusion if hyp_adapter else "none",
            hyp_layers=hyp_layers,
            act=adapter_act,
            scale=adapter_scale,
            zero_init=adapter_zero_init,
        )

    net = MedSA(
        sam,
        img_size=img_size,
        in_channels=in_channels,
        max_points=max_points,
        max_depth=max_depth,
        prompt_scope=prompt_scope,
        automatic=automatic,
        decoder_adapters=decoder_adapters,
        embedding_cache=embedding_cache,
        no_prompt_logit=no_prompt_logit,
        gradient_checkpointing=gradient_checkpointing,
    )
    net.peft = peft  # the uniform name of the setting across the five networks
    if peft == "full":
        for p in net.parameters():
            p.requires_grad_(True)
        # never used (no IoU loss, no mask prompts): frozen, so every trainable parameter gets a gradient
        sam.mask_decoder.iou_prediction_head.requires_grad_(False)
        sam.prompt_encoder.mask_downscaling.requires_grad_(False)
    else:
        # adapters of the ViT blocks, or of TinyViT's blocks inside its stages (the depth adapter included)
        blocks = "image_encoder.layers" if v.encoder == "tiny_vit" else "image_encoder.blocks"
        patterns = [f"{blocks}.*adapter*"] if encoder_adapters or depth_adapter else []
        patterns += peft_globs(peft, "image_encoder.") if peft != "adapter" else []
        if decoder_adapters:
            patterns += ["mask_decoder.transformer.layers.*adapter*"]
            if hyp_adapter:
                patterns += ["mask_decoder.transformer.prompt_reduce.*"]
        if train_mask_decoder:
            patterns += ["mask_decoder.*"]
        freeze_except(net, patterns)
    log_peft_build(net, "Med-SA", peft)
    return net
