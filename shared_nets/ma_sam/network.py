"""MA-SAM: modality-agnostic SAM adaptation for volumetric data.

Paper: Chen et al., "MA-SAM: Modality-agnostic SAM Adaptation for 3D Medical Image Segmentation"
(arXiv 2309.08842); official code cchen-cc/MA-SAM.


SAM's image encoder with FacT weight increments on q and v (sec. 3.2) and two 3D adapters per
block (sec. 3.3), a SAMed-style multi-class mask decoder with progressive up-sampling to full
resolution (sec. 3.4). Input is a stack of ``N`` adjacent slices (5 in the paper); all slices
are predicted.
"""

from __future__ import annotations

import functools
from fnmatch import fnmatchcase

import torch
from segment_anything.modeling import Sam
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from shared_nets.peft import PEFT_METHODS, peft_globs
from shared_nets.prompts import decode_boxes_2d
from shared_nets.sam.decoding import decode_masks
from shared_nets.sam.encoder_blocks import run_encoder
from shared_nets.sam.slices import check_input, slices_to_volume, to_rgb, upsample_to, volume_to_slices

from .blocks import MultiScaleFusion, ProgressiveUpsampling, attention_residual, mlp_residual

__all__ = ["MASAM", "MultiScaleFusion"]

#: The image encoder's ``peft`` settings (:data:`shared_nets.peft.PEFT_METHODS`; paper: ``fact``).
FINETUNE_MODES = PEFT_METHODS
ADAPTER_POSITIONS = ("both", "before", "after")
DECODERS = ("progressive", "sam", "multiscale")


class MASAM(nn.Module):
    """MA-SAM network: ``[B, C, H, W, N]`` slice stacks → ``[B, num_classes + 1, H, W, N]`` logits.

    Composed from built parts (:func:`shared_nets.ma_sam.build_ma_sam` builds them from the paper's
    settings, one argument per ablation). The constructor builds and injects nothing; it only sets
    which parameters train for ``finetune``.

    Args:
        sam: SAM with FacT already injected into the image encoder's q/v when ``finetune="fact"``
            (sec. 3.2). With ``upscaling`` given, its mask decoder must have no
            ``output_hypernetworks_mlps`` and an ``nn.Identity`` ``output_upscaling`` (both replaced).
        adapters_before: one 3D adapter per encoder block applied before attention (sec. 3.3), or None.
        adapters_after: one 3D adapter per encoder block applied after attention, or None.
        upscaling: the decoder's up-sampling: :class:`ProgressiveUpsampling` (paper, sec. 3.4),
            :class:`MultiScaleFusion` (U-shaped skips from encoder stages 1-3), or None for SAM's own
            ``output_upscaling`` (H/4, bilinear to H).
        hypernetworks: one MLP per mask token whose output width is ``upscaling.out_channels``
            (None together with ``upscaling``).
        img_size: in-plane input size; inputs must already have this size.
        num_classes: foreground classes; outputs ``num_classes + 1`` channels (0 = background).
        num_slices: adjacent slices per input stack (paper 5).
        in_channels: image channels (1 for CT/MRI, 3 for RGB video frames).
        use_box_prompt: one extra guidance channel holding a 3D box (Table 4).
        finetune: ``"fact"`` (only the encoder's ``fact_`` parameters train), ``"full"`` (whole
            encoder trainable) or ``"frozen"`` (encoder frozen). The mask decoder, the prompt encoder's
            used parts and the 3D adapters always train.
        gradient_checkpointing: recompute encoder blocks in backward to save memory.
    """

    def __init__(
        self,
        sam: Sam,
        adapters_before: nn.ModuleList | None,
        adapters_after: nn.ModuleList | None,
        upscaling: ProgressiveUpsampling | MultiScaleFusion | None,
        hypernetworks: nn.ModuleList | None,
        img_size: int,
        num_classes: int,
        num_slices: int = 5,
        in_channels: int = 1,
        use_box_prompt: bool = False,
        finetune: str = "fact",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {finetune!r}.")
        if (upscaling is None) != (hypernetworks is None):
            raise ValueError("upscaling and hypernetworks must be given together (or both None for SAM's decoder).")
        n_blocks = len(sam.image_encoder.blocks)
        for name, adapters in (("adapters_before", adapters_before), ("adapters_after", adapters_after)):
            if adapters is not None and len(adapters) != n_blocks:
                raise ValueError(f"{name} must hold one adapter per encoder block ({n_blocks}), got {len(adapters)}.")
        self.img_size, self.num_slices, self.in_channels = img_size, num_slices, in_channels
        decoder = "progressive"
        if upscaling is None:
            decoder = "sam"
        elif isinstance(upscaling, MultiScaleFusion):
            decoder = "multiscale"
        self.num_classes, self.use_box_prompt, self.decoder_type = num_classes, use_box_prompt, decoder
        self.finetune, self.gradient_checkpointing = finetune, gradient_checkpointing
        self.peft = finetune  # the uniform name of the setting across the five networks
        self.sam = sam
        self.adapters_before = adapters_before
        self.adapters_after = adapters_after
        # encoder blocks whose outputs feed the multi-scale decoder: the last of stages 3, 2, 1
        self.stage_blocks: tuple[int, ...] = ()
        if decoder == "multiscale":
            q = n_blocks // 4
            self.stage_blocks = (3 * q - 1, 2 * q - 1, q - 1)
        self.upscaling, self.hypernetworks = upscaling, hypernetworks
        self._set_trainable()

    # -- parameters -------------------------------------------------------------------------
    def _set_trainable(self) -> None:
        encoder = self.sam.image_encoder
        globs = peft_globs(self.finetune)
        for name, p in encoder.named_parameters():
            p.requires_grad = any(fnmatchcase(name, g) for g in globs)
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
