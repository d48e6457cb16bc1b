"""Thin typed builder of :class:`~shared_nets.ma_sam.network.MASAM` from the paper's settings.

Builds SAM (:func:`shared_nets.sam.build_sam`, official weights loaded strictly into plain SAM first),
injects FacT, builds the 3D adapters and the decoder parts, and composes them, the way
``segment_anything``'s ``build_sam.py`` composes ``Sam(image_encoder, prompt_encoder, mask_decoder)``.
"""

from __future__ import annotations

import copy
import os

from torch import nn

from shared_nets.peft import Adapter3D, apply_peft, log_peft_build, resolve_peft
from shared_nets.sam import build_sam, get_variant
from shared_nets.sam.encoder_blocks import block_width

from .blocks import MultiScaleFusion, ProgressiveUpsampling
from .network import ADAPTER_POSITIONS, DECODERS, MASAM

__all__ = ["build_ma_sam"]


def _hypernetworks_with_width(decoder: nn.Module, out_dim: int) -> nn.ModuleList:
    """Copies of the pretrained hypernetwork MLPs whose last layer outputs ``out_dim`` (new, trainable)."""
    mlps = nn.ModuleList()
    for mlp in decoder.output_hypernetworks_mlps:
        new = copy.deepcopy(mlp)
        last = new.layers[-1]
        new.layers[-1] = nn.Linear(last.in_features, out_dim).to(last.weight)
        mlps.append(new)
    return mlps


def build_ma_sam(
    variant: str = "vit_b",
    checkpoint: str | os.PathLike | None = None,
    img_size: int = 512,
    num_classes: int = 13,
    num_slices: int = 5,
    in_channels: int = 1,
    use_box_prompt: bool = False,
    peft: str | None = None,
    finetune: str | None = None,
    fact_rank: int = 32,
    fact_dropout: float = 0.1,
    fact_scale: float = 1.0,
    lora_rank: int = 4,
    adapter_ratio: float = 0.25,
    use_3d_adapters: bool = True,
    adapter_position: str = "both",
    adapter_dim: int | None = None,
    adapter_kernel: tuple[int, int, int] = (3, 1, 1),
    decoder: str = "progressive",
    patch_size: int = 16,
    gradient_checkpointing: bool = False,
    use_sdpa: bool = True,
) -> MASAM:
    """Build an MA-SAM network: ``[B, C, H, W, N]`` slice stacks → ``[B, num_classes + 1, H, W, N]`` logits.

    Every choice the paper's ablations vary is an argument, so each ablation is a config change:
    FacT rank (Table 10), backbone (Table 7), 3D-adapter position (Table 8), decoder (Table 6),
    SAM weights / full fine-tuning / FacT / 3D adapters (Table 9).

    Args:
        variant: SAM backbone, ``vit_b`` / ``vit_l`` / ``vit_h`` / ``lite`` / ``tiny``. At ``lite``
            (LiteMedSAM's TinyViT) FacT goes on q/v of its 10 attention blocks (one shared U/V pair
            per stage width), each block gets 3D adapters of its own width (before attention, and
            after attention = before TinyViT's local convolution and MLP), and the progressive
            decoder needs no extra up-sampling stage (embedding stride 4).
        checkpoint: official SAM checkpoint (None: random init, Table 9 row 1).
        img_size: in-plane input size (paper 512); inputs must already have this size.
        num_classes: foreground classes; outputs ``num_classes + 1`` channels (0 = background).
        num_slices: adjacent slices per input stack (paper 5).
        in_channels: image channels (1 for CT/MRI, 3 for RGB video frames).
        use_box_prompt: one extra guidance channel holding a 3D box (paper's tumour setting,
            Table 4); each slice that the box crosses gets its 2D box prompt.
        peft: how the image encoder is tuned, one of :data:`shared_nets.peft.PEFT_METHODS`; None is
            the paper's ``"fact"`` (FacT on q, v; encoder frozen otherwise). ``"full"``: whole encoder
            trainable; ``"frozen"``: decoder only. The mask decoder, the prompt encoder and the 3D
            adapters (``use_3d_adapters``) are always trained.
        finetune: old name of ``peft`` (kept as an alias; a different ``peft`` raises).
        fact_rank: FacT rank ``r`` (paper 32).
        fact_dropout: dropout on the FacT branch (official code 0.1).
        fact_scale: FacT scale ``s`` (paper 1).
        lora_rank: LoRA rank for ``peft="lora"``.
        adapter_ratio: bottleneck width / block width for ``peft="adapter"``
            (:func:`shared_nets.peft.inject_adapters`; not the 3D adapters' ``adapter_dim``).
        use_3d_adapters: add the 3D adapters.
        adapter_position: ``"both"`` (paper), ``"before"`` or ``"after"`` attention.
        adapter_dim: adapter width ``c``; None → ``min(384, E/2)`` (384 for ViT-B as in the code).
        adapter_kernel: Conv3d kernel over (slices, h, w).
        decoder: ``"progressive"`` (paper), ``"sam"`` (SAM's H/4 decoder, bilinear to H) or
            ``"multiscale"`` (U-shaped skips).
        patch_size: ViT patch size (16; tiny demos may use 8 without a checkpoint).
        gradient_checkpointing: recompute encoder blocks in backward to save memory.
        use_sdpa: compute the image encoder's attention with ``scaled_dot_product_attention``
            (:func:`shared_nets.sam.enable_sdpa`; same weights and outputs within 1e-4, no
            ``N x N`` softmax matrices kept). False runs ``segment_anything``'s stock attention.

    Returns:
        The composed :class:`MASAM`. Parts are created (and random numbers drawn) in a fixed order:
        SAM, FacT, adapters before, adapters after, up-sampling, hypernetworks, so one seed gives one network.
    """
    if not isinstance(use_sdpa, bool):
        raise ValueError(f"use_sdpa must be true or false, got {use_sdpa!r}.")
    peft = resolve_peft(peft, "fact", finetune=finetune)
    if adapter_position not in ADAPTER_POSITIONS:
        raise ValueError(f"adapter_position must be one of {ADAPTER_POSITIONS}, got {adapter_position!r}.")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer (foreground classes), got {num_classes!r}.")
    if not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"num_slices must be a positive integer, got {num_slices!r}.")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels!r}.")

    # official weights load strictly into plain SAM first; PEFT is injected after (sec. 3.2)
    sam = build_sam(
        variant,
        checkpoint,
        img_size=img_size,
        patch_size=patch_size,
        num_multimask_outputs=num_classes,
        use_sdpa=use_sdpa,
    )
    v = get_variant(variant)
    if v.encoder == "tiny_vit":
        if decoder == "multiscale":
            raise ValueError(
                "decoder='multiscale' needs a plain ViT (four equal stages of one width); variant 'lite' "
                "(TinyViT, stages of widths 128/160/320 on two grids) supports 'progressive' or 'sam'."
            )
        patch_size = v.embedding_stride  # LiteMedSAM: S/4 tokens whatever patch_size says
    encoder = sam.image_encoder
    widths = [block_width(b) for b in encoder.blocks]
    embed_dim = widths[-1]
    apply_peft(
        encoder,
        peft,
        lora_rank=lora_rank,
        fact_rank=fact_rank,
        fact_dropout=fact_dropout,
        fact_scale=fact_scale,
        adapter_ratio=adapter_ratio,
    )

    # 3D adapters before and/or after attention in every block (sec. 3.3, Table 8); at lite
    # each TinyViT block gets adapters of its own stage's width
    def adapters(on: bool) -> nn.ModuleList | None:
        if not (use_3d_adapters and on):
            return None
        return nn.ModuleList(
            Adapter3D(w, adapter_dim or min(384, w // 2), kernel_size=tuple(adapter_kernel)) for w in widths
        )

    adapters_before = adapters(adapter_position in ("both", "before"))
    adapters_after = adapters(adapter_position in ("both", "after"))

    # decoder (sec. 3.4, Table 6)
    mask_decoder = sam.mask_decoder
    tdim = mask_decoder.transformer_dim
    upscaling: ProgressiveUpsampling | MultiScaleFusion | None = None
    hypernetworks: nn.ModuleList | None = None
    if decoder != "sam":
        if decoder == "progressive":
            upscaling = ProgressiveUpsampling(mask_decoder.output_upscaling, tdim, patch_size)
        else:
            if patch_size != 16:
                raise ValueError(f"decoder='multiscale' needs patch_size 16, got {patch_size}.")
            upscaling = MultiScaleFusion(mask_decoder.output_upscaling, embed_dim, tdim)
        hypernetworks = _hypernetworks_with_width(mask_decoder, upscaling.out_channels)
        # these replace the SAM originals; drop the originals so they are not dead parameters
        del mask_decoder.output_hypernetworks_mlps
        mask_decoder.output_upscaling = nn.Identity()

    net = MASAM(
        sam,
        adapters_before,
        adapters_after,
        upscaling,
        hypernetworks,
        img_size=img_size,
        num_classes=num_classes,
        num_slices=num_slices,
        in_channels=in_channels,
        use_box_prompt=use_box_prompt,
        finetune=peft,
        gradient_checkpointing=gradient_checkpointing,
    )
    log_peft_build(net, "MA-SAM", peft)
    return net
