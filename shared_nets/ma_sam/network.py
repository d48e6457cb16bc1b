"""MA-SAM: modality-agnostic SAM adaptation for volumetric data.

Paper: Chen et al., "MA-SAM: Modality-agnostic SAM Adaptation for 3D Medical Image Segmentation"
(arXiv 2309.08842); official code cchen-cc/MA-SAM.


SAM's image encoder with FacT weight increments on q and v (sec. 3.2) and two 3D adapters per
block (sec. 3.3), a SAMed-style multi-class mask decoder with progressive up-sampling to full
resolution (sec. 3.4). Input is a stack of ``N`` adjacent slices (5 in the paper); all slices
are predicted.
"""

from __future__ import annotations

import copy
import functools
import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from shared_nets.peft import Adapter3D, inject_fact
from shared_nets.prompts import decode_boxes_2d
from shared_nets.sam import build_sam, get_variant
from shared_nets.sam.decoding import decode_masks
from shared_nets.sam.encoder_blocks import block_width, run_encoder
from shared_nets.sam.slices import check_input, slices_to_volume, to_rgb, upsample_to, volume_to_slices

from .blocks import MultiScaleFusion, ProgressiveUpsampling, attention_residual, mlp_residual

__all__ = ["MASAM", "MultiScaleFusion"]

FINETUNE_MODES = ("fact", "full", "frozen")
ADAPTER_POSITIONS = ("both", "before", "after")
DECODERS = ("progressive", "sam", "multiscale")


def _hypernetworks_with_width(decoder: nn.Module, out_dim: int) -> nn.ModuleList:
    """Copies of the pretrained hypernetwork MLPs whose last layer outputs ``out_dim`` (new, trainable)."""
    mlps = nn.ModuleList()
    for mlp in decoder.output_hypernetworks_mlps:
        new = copy.deepcopy(mlp)
        last = new.layers[-1]
        new.layers[-1] = nn.Linear(last.in_features, out_dim).to(last.weight)
        mlps.append(new)
    return mlps


class MASAM(nn.Module):
    """MA-SAM network: ``[B, C, H, W, N]`` slice stacks → ``[B, num_classes + 1, H, W, N]`` logits.

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
        finetune: ``"fact"`` (FacT on q, v; encoder frozen otherwise), ``"full"`` (whole
            encoder trainable) or ``"frozen"`` (encoder frozen, decoder only). The mask decoder,
            the prompt encoder and 3D adapters are always trained.
        fact_rank: FacT rank ``r`` (paper 32).
        fact_dropout: dropout on the FacT branch (official code 0.1).
        fact_scale: FacT scale ``s`` (paper 1).
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
    """

    def __init__(
        self,
        variant: str = "vit_b",
        checkpoint: str | os.PathLike | None = None,
        img_size: int = 512,
        num_classes: int = 13,
        num_slices: int = 5,
        in_channels: int = 1,
        use_box_prompt: bool = False,
        finetune: str = "fact",
        fact_rank: int = 32,
        fact_dropout: float = 0.1,
        fact_scale: float = 1.0,
        use_3d_adapters: bool = True,
        adapter_position: str = "both",
        adapter_dim: int | None = None,
        adapter_kernel: tuple[int, int, int] = (3, 1, 1),
        decoder: str = "progressive",
        patch_size: int = 16,
        gradient_checkpointing: bool = False,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(use_sdpa, bool):
            raise ValueError(f"use_sdpa must be true or false, got {use_sdpa!r}.")
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {finetune!r}.")
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

        self.img_size, self.num_slices, self.in_channels = img_size, num_slices, in_channels
        self.num_classes, self.use_box_prompt, self.decoder_type = num_classes, use_box_prompt, decoder
        self.finetune, self.gradient_checkpointing = finetune, gradient_checkpointing

        # official weights load strictly into plain SAM first; PEFT is injected after (sec. 3.2)
        self.sam = build_sam(
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
        encoder = self.sam.image_encoder
        widths = [block_width(b) for b in encoder.blocks]
        embed_dim = widths[-1]
        if finetune == "fact":
            inject_fact(encoder, rank=fact_rank, targets=("q", "v"), dropout=fact_dropout, scale=fact_scale)

        # 3D adapters before and/or after attention in every block (sec. 3.3, Table 8); at lite
        # each TinyViT block gets adapters of its own stage's width
        def adapters(on: bool) -> nn.ModuleList | None:
            if not (use_3d_adapters and on):
                return None
            return nn.ModuleList(
                Adapter3D(w, adapter_dim or min(384, w // 2), kernel_size=tuple(adapter_kernel)) for w in widths
            )

        self.adapters_before = adapters(adapter_position in ("both", "before"))
        self.adapters_after = adapters(adapter_position in ("both", "after"))

        # decoder (sec. 3.4, Table 6)
        mask_decoder = self.sam.mask_decoder
        tdim = mask_decoder.transformer_dim
        self.stage_blocks: tuple[int, ...] = ()
        if decoder == "sam":
            self.upscaling, self.hypernetworks = None, None
        else:
            if decoder == "progressive":
                self.upscaling = ProgressiveUpsampling(mask_decoder.output_upscaling, tdim, patch_size)
            else:
                if patch_size != 16:
                    raise ValueError(f"decoder='multiscale' needs patch_size 16, got {patch_size}.")
                self.upscaling = MultiScaleFusion(mask_decoder.output_upscaling, embed_dim, tdim)
                q = len(widths) // 4
                self.stage_blocks = (3 * q - 1, 2 * q - 1, q - 1)  # stages 3, 2, 1
            self.hypernetworks = _hypernetworks_with_width(mask_decoder, self.upscaling.out_channels)
            # these replace the SAM originals; drop the originals so they are not dead parameters
            del mask_decoder.output_hypernetworks_mlps
            mask_decoder.output_upscaling = nn.Identity()

        self._set_trainable()

    # -- parameters -------------------------------------------------------------------------
    def _set_trainable(self) -> None:
        encoder = self.sam.image_encoder
        for p in encoder.parameters():
            p.requires_grad = self.finetune == "full"
        if self.finetune == "fact":
            for name, p in encoder.named_parameters():
                if "fact_" in name:
                    p.requires_grad = True
        # parts this model never uses stay frozen (no IoU loss; no clicks or mask prompts), so
        # every trainable parameter gets a gradient (DDP requires it) and the optimizer skips them
        unused = [
            self.sam.mask_decoder.iou_prediction_head,
            self.sam.prompt_encoder.mask_downscaling,
            self.sam.prompt_encoder.point_embeddings[0],
            self.sam.prompt_encoder.point_embeddings[1],
        ]
        if not self.use_box_prompt:
            unused += [
                self.sam.prompt_encoder.point_embeddings[2],
                self.sam.prompt_encoder.point_embeddings[3],
                self.sam.prompt_encoder.not_a_point_embed,
            ]
        for module in unused:
            module.requires_grad_(False)

    # -- forward -----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image encoder over slices ``[B*N, 3, H, W]`` → embeddings ``[B*N, C, h, w]`` and stage features."""
        stages: dict[int, torch.Tensor] = {}

        def step(i: int, blk: nn.Module, t: torch.Tensor) -> torch.Tensor:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                t = grad_checkpoint(self._block, i, t, use_reentrant=False)
            else:
                t = self._block(i, t)
            if i in self.stage_blocks:
                stages[i] = t
            return t

        embeddings = run_encoder(self.sam.image_encoder, x, step)
        return embeddings, [stages[i] for i in self.stage_blocks]

    def _block(self, i: int, t: torch.Tensor) -> torch.Tensor:
        blk = self.sam.image_encoder.blocks[i]
        if self.adapters_before is not None:
            t = self.adapters_before[i](t, self.num_slices)
        t = attention_residual(blk, t)
        if self.adapters_after is not None:
            t = self.adapters_after[i](t, self.num_slices)
        return mlp_residual(blk, t)

    def prompt_embeddings(self, box: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse/dense prompt embeddings: none (automatic) or one 2D box per slice."""
        pe = self.sam.prompt_encoder
        sparse, dense = pe(points=None, boxes=None, masks=None)  # [1, 0, C], [1, C, h, w]
        if box is None:
            return sparse, dense
        boxes, valid = decode_boxes_2d(box)  # [B*N, 4] in the input frame (= SAM's frame)
        # SAM's public forward with boxes only: the box-corner tokens [B*N, 2, C] (its dense output is the same
        # no-mask embedding as above)
        tokens = pe(points=None, boxes=boxes.to(dense.dtype), masks=None)[0]
        empty = pe.not_a_point_embed.weight.expand(2, -1)  # slices the box does not cross
        tokens = torch.where(valid[:, None, None], tokens, empty)
        return tokens, dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: ``[B, in_channels (+1 box), H, W, N]`` with ``H = W = img_size`` and ``N = num_slices``.

        Returns:
            logits ``[B, num_classes + 1, H, W, N]``.
        """
        channels = self.in_channels + int(self.use_box_prompt)
        check_input(x, channels, self.img_size, self.num_slices, name="MASAM")
        image = to_rgb(volume_to_slices(x[:, : self.in_channels]))  # [B*N, 3, H, W]
        box = x[:, self.in_channels :] if self.use_box_prompt else None  # [B, 1, H, W, N]

        embeddings, feats = self.encode(image)
        sparse, dense = self.prompt_embeddings(box, embeddings.shape[0])
        upscaling = self.upscaling
        if isinstance(upscaling, MultiScaleFusion):
            upscaling = functools.partial(upscaling, features=feats)
        masks, _ = decode_masks(
            self.sam.mask_decoder,
            embeddings,
            self.sam.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            upscaling=upscaling,
            hypernetworks=self.hypernetworks,
        )
        masks = upsample_to(masks, (self.img_size, self.img_size))
        return slices_to_volume(masks, self.num_slices)
