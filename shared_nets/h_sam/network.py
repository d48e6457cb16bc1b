"""H-SAM: LoRA-adapted SAM with a two-stage hierarchical mask decoder (Cheng et al., CVPR 2024).

Prompt-free multi-class 2D segmentation on the 5D bundle contract: ``(B, C, H, W, D)`` slices
(``D`` is looped as batch) to ``(B, K, H, W, D)`` class logits. Where the released code
(Cccccczh404/H-SAM) differs from the paper, the paper is the default and a flag gives the
released behaviour (see ``bundles/h_sam/docs/README.md``); the switches are arguments of
:func:`~shared_nets.h_sam.build_h_sam`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

from shared_nets.peft import PEFT_METHODS, freeze_except, peft_globs
from shared_nets.sam import enable_gradient_checkpointing
from shared_nets.sam.slices import check_input, slices_to_volume, to_rgb, upsample_to, volume_to_slices

from .decoder import HSAMStage2Decoder, decode_stage1

__all__ = ["HSAM", "ENSEMBLE_MODES", "FINETUNE_MODES", "check_forward_args"]

#: The image encoder's ``peft`` settings (:data:`shared_nets.peft.PEFT_METHODS`): ``lora`` on q, v (paper),
#: ``fact``, ``svd``, ``adapter``, ``full`` (demos training ``tiny`` from scratch) or ``frozen`` (decoders only).
FINETUNE_MODES = PEFT_METHODS

#: How the two stages are combined at inference: ``probability`` (paper sec. 3.4: mean of the two
#: softmaxes; returned as its log so that softmax gives the mean back), ``logit`` (released
#: test script: mean of the logits), ``stage2`` / ``stage1`` (one stage only).
ENSEMBLE_MODES = ("probability", "logit", "stage2", "stage1")


def check_forward_args(
    num_classes: object, in_channels: object, finetune: object, ensemble: object, embedding_noise: object
) -> None:
    """Validate the plain values :class:`HSAM` reads (``ValueError`` naming the argument)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer (foreground classes), got {num_classes!r}.")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels!r}.")
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {finetune!r}.")
    if ensemble not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble must be one of {ENSEMBLE_MODES}, got {ensemble!r}.")
    if isinstance(embedding_noise, bool) or not isinstance(embedding_noise, (int, float)) or not embedding_noise >= 0:
        raise ValueError(f"embedding_noise must be a number >= 0, got {embedding_noise!r}.")


class HSAM(nn.Module):
    """H-SAM (sec. 3): SAMed-style LoRA encoder, SAM's decoder as stage 1, mask-guided stage 2.

    Forward: ``x [B, in_channels, H, W, D]`` with ``H = W = img_size``; every axial slice is
    segmented independently (grey images are repeated to SAM's 3 channels).

    * eval mode: logits ``[B, num_classes + 1, H, W, D]`` combining the two stages (``ensemble``);
    * train mode: the list ``[stage-1 logits [B, K, H/4, W/4, D], stage-2 logits [B, K, H, W, D]]``
      (``K = num_classes + 1``) for ``monai.losses.DeepSupervisionLoss``: stage 1 is supervised at
      H/4 and stage 2 at full resolution (sec. 3.4 "Deep Supervision"). Without ``mask_decoder2``
      (the SAMed baseline) one ``[B, K, H, W, D]`` tensor.

    The network is composed from built parts and builds and injects nothing:
    :func:`~shared_nets.h_sam.build_h_sam` builds SAM (checkpoint loaded first), the stage-2 decoder and the
    LoRA layers and passes them here; every ablation of the paper is an argument of that builder.

    Args:
        sam: SAM (``segment_anything``'s ``Sam``) with one mask token per class
            (``num_multimask_outputs = num_classes``) and, for ``finetune="lora"``, LoRA already injected in its
            image encoder. Its image encoder, prompt encoder and mask decoder (stage 1) become this module's.
        mask_decoder2: the stage-2 decoder (:class:`~shared_nets.h_sam.decoder.HSAMStage2Decoder`), or None for
            the SAMed baseline (stage 1 only; ``ensemble`` then is ``stage1``).
        lora_layers: the LoRA layers injected in ``sam``'s image encoder (kept for inspection; not registered
            twice).
        variant: name of the SAM backbone (recorded).
        img_size: in-plane input size; inputs must already have this size.
        num_classes: foreground classes; outputs ``num_classes + 1`` channels (0 = background).
        in_channels: image channels, 1 (grey, repeated to 3) or 3 (RGB).
        patch_size: stride of the image encoder's token grid (the ViT patch size; 4 for ``lite``).
        finetune: one of :data:`FINETUNE_MODES`; sets which parameters train (:meth:`_set_trainable`).
        ensemble: one of :data:`ENSEMBLE_MODES`.
        released_attention_order: stage 1's blocks run cross-attention before self-attention (released code);
            stage 2's order is set when ``mask_decoder2`` is built.
        embedding_noise: training noise of std ``embedding_noise · (max - min)`` on the image embedding before
            stage 2 (released 0.2; not in the paper).
        gradient_checkpointing: recompute the image-encoder blocks in the backward pass instead of
            keeping their activations (training memory; same outputs and gradients).
    """

    def __init__(
        self,
        sam: Sam,
        mask_decoder2: HSAMStage2Decoder | None,
        lora_layers: Sequence[nn.Module] = (),
        variant: str = "vit_b",
        img_size: int = 512,
        num_classes: int = 8,
        in_channels: int = 1,
        patch_size: int = 16,
        finetune: str = "lora",
        ensemble: str = "probability",
        released_attention_order: bool = False,
        embedding_noise: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_forward_args(num_classes, in_channels, finetune, ensemble, embedding_noise)
        use_stage2 = mask_decoder2 is not None
        if not use_stage2 and ensemble != "stage1":
            ensemble = "stage1"
        self.variant = variant
        self.img_size, self.patch_size, self.in_channels = img_size, patch_size, in_channels
        self.num_classes, self.finetune = num_classes, finetune
        self.peft = finetune  # the uniform name of the setting across the five networks
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.use_stage2, self.ensemble = use_stage2, ensemble
        self.cross_first = released_attention_order
        self.embedding_noise = float(embedding_noise)
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.mask_decoder2 = mask_decoder2
        self.lora_layers = list(lora_layers)
        self._set_trainable()
        if not isinstance(gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {gradient_checkpointing!r}.")
        self.gradient_checkpointing = gradient_checkpointing
        enable_gradient_checkpointing(self.image_encoder.blocks, gradient_checkpointing)

    def _set_trainable(self) -> None:
        """Encoder frozen except LoRA; prompt encoder frozen except its default embedding (sec. 3.1).

        Parameters the prompt-free forward never uses stay frozen in every mode (the prompt
        encoder's point/box/mask embeddings, stage 1's IoU head), so DDP sees no unused
        trainable parameters. The released code leaves them trainable (they get no gradients).
        """
        patterns = ["prompt_encoder.no_mask_embed.*", "mask_decoder.*"]
        patterns += ["mask_decoder2.*"] if self.mask_decoder2 is not None else []
        patterns += peft_globs(self.finetune, "image_encoder.")
        freeze_except(self, patterns)
        self.mask_decoder.iou_prediction_head.requires_grad_(False)

    # ------------------------------------------------------------------------------------------
    def _check_label(self, x: torch.Tensor, label: torch.Tensor) -> None:
        if (
            not isinstance(label, torch.Tensor)
            or label.ndim != 5
            or label.shape[1] != 1
            or label.shape[0] != x.shape[0]
            or label.shape[2:] != x.shape[2:]
        ):
            shape = tuple(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__
            raise ValueError(f"HSAM: label must be [B, 1, H, W, D] matching the image {tuple(x.shape)}, got {shape}.")
        lo, hi = float(label.min()), float(label.max())
        if lo < 0 or hi > self.num_classes or not torch.equal(label, label.round()):
            raise ValueError(
                f"HSAM: label values must be integers in [0, {self.num_classes}] (num_classes={self.num_classes} "
                f"foreground classes + background), got values in [{lo:g}, {hi:g}]."
            )

    def forward_stages(
        self, x: torch.Tensor, label: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both stages' logits on slices.

        Args:
            x: ``[B, in_channels, H, W, D]``.
            label: ``[B, 1, H, W, D]`` ground truth, used in training by CMAttn's noise.

        Returns:
            ``(stage-1 logits [B*D, K, 4h, 4w], stage-2 logits [B*D, K, H, W] or None)`` with
            ``h = H / patch_size``.
        """
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"HSAM: input must be a tensor [B, C, H, W, D], got {type(x).__name__}.")
        check_input(x, self.in_channels, self.img_size, name="HSAM")
        if label is not None:
            self._check_label(x, label)
        emb = self.image_encoder(to_rgb(volume_to_slices(x)))
        pe = self.prompt_encoder.get_dense_pe()
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *self.grid)
        logits1, mask_feature, up1 = decode_stage1(self.mask_decoder, emb, pe, dense, self.cross_first)
        if self.mask_decoder2 is None:
            return logits1, None
        # sec. 3.3: the stage-1 probability map resized to the token grid (area: mean of probabilities)
        probs1 = F.adaptive_avg_pool2d(logits1.softmax(1), self.grid)
        if self.training and self.embedding_noise > 0:
            emb = emb + torch.randn_like(emb) * self.embedding_noise * (emb.max() - emb.min()).detach()
        grid_label = None
        if self.training and label is not None:
            lab = F.interpolate(volume_to_slices(label.float()), size=self.grid, mode="nearest-exact")
            grid_label = lab.flatten(1).long()
        logits2 = self.mask_decoder2(emb, pe, dense, probs1, mask_feature, up1, grid_label)
        return logits1, logits2

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Segment every axial slice of ``x [B, in_channels, H, W, D]``.

        Args:
            x: image with ``H = W = img_size``.
            label: optional ground truth ``[B, 1, H, W, D]`` (training: CMAttn's class-balanced noise).

        Returns:
            eval: ``[B, K, H, W, D]`` logits (``ensemble``); train: ``[stage-1 [B, K, H/4, W/4, D],
            stage-2 [B, K, H, W, D]]``, or one ``[B, K, H, W, D]`` tensor for the SAMed baseline.
        """
        logits1, logits2 = self.forward_stages(x, label)
        depth = x.shape[4]
        size = (self.img_size, self.img_size)
        if self.training:
            if logits2 is None:
                return slices_to_volume(upsample_to(logits1, size), depth)
            return [slices_to_volume(logits1, depth), slices_to_volume(logits2, depth)]
        up1 = upsample_to(logits1, size)
        if self.ensemble == "stage1" or logits2 is None:
            out = up1
        else:
            up2 = upsample_to(logits2, size)
            if self.ensemble == "stage2":
                out = up2
            elif self.ensemble == "logit":
                out = (up1 + up2) / 2
            else:
                # sec. 3.4: mean of the two stages' probabilities, returned as log-probabilities
                out = torch.logaddexp(up1.log_softmax(1), up2.log_softmax(1)) - math.log(2.0)
        return slices_to_volume(out, depth)
