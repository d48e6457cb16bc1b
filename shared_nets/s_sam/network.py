"""S-SAM: SVD-based fine-tuning of SAM with label-name (text) prompts.

Paper: Paranjape et al., "S-SAM: SVD-based Fine-Tuning of Segment Anything Model for
Medical Image Segmentation" (MICCAI 2024), section 3. Official code: JayParanjape/SVDSAM
(read for facts only; nothing copied).

What the network does (paper section 3, Fig. 1):

* SAM's image encoder with every linear layer of its blocks (``attn.qkv``, ``attn.proj``,
  ``mlp.lin1``, ``mlp.lin2``) and the two neck convolutions re-parameterised from their
  SVD as ``W' = U ReLU(a * S + b) V^T`` (eq. 2), ``a`` init 1 and ``b`` init 0, so it starts
  exactly at SAM (``shared_nets.peft.inject_svd``).
* The absolute position embedding average-pooled from SAM's 64x64 to the input's token grid
  and trainable; the block LayerNorms trainable.
* The class name, encoded once by CLIP (stored vectors, see :mod:`shared_nets.s_sam.text`), mapped by
  the Text-Affine Layer (TAL) into one sparse prompt token for SAM's frozen mask decoder.
* One decoder pass per (image, class); each class gives a sigmoid logit map. The output
  stacks a constant 0 logit for background in front of the class logits, so ``argmax``
  equals "sigmoid > 0.5, overlaps to the most confident class" and the network plugs into
  the same softmax/argmax post-processing as the other bundles.

Paper vs. official code (``mode``):

=====================  ==================================  ====================================
setting                ``mode="paper"`` (default)          ``mode="official"``
=====================  ==================================  ====================================
TAL                    one Linear 512 -> prompt dim        Linear, ReLU, BatchNorm1d
mask-decoder norms     frozen (paper: decoder frozen)      trainable (a side effect of the
                                                           code's name-based freezing order)
relative positions     SAM's tables (resized)              none: the tables are removed
=====================  ==================================  ====================================

Relative positions in the official code: ``model.py`` builds its ``ImageEncoderViT``
(``prompt_adapted_segment_anything/modeling/image_encoder.py``) with the default
``use_rel_pos=False``, so the blocks have no ``rel_pos_h``/``rel_pos_w`` parameters at all and
``load_state_dict(strict=False)`` drops SAM's tables (the ``add_decomposed_rel_pos`` call is
commented out as well). ``use_rel_pos=False`` does the same: the checkpoint is loaded strictly
into plain SAM first, then the tables are deleted from every block (ViT-B at 256: 12 blocks x
2 x 31 x 64 = 47,616 frozen parameters fewer). The paper does not mention relative positions.

Both modes use global attention in every block (code; the paper does not say) and a
256x256 input for ViT-B. Trainable parameters at 256 for ViT-B: 439,552 (paper mode) and
444,672 (official mode); see :meth:`SSAM.trainable_parameter_counts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

from shared_nets.peft import SVDConv2d, SVDLinear, peft_globs
from shared_nets.sam import enable_gradient_checkpointing
from shared_nets.sam.decoding import decode_masks
from shared_nets.sam.slices import slices_to_volume, to_rgb, upsample_to, volume_to_slices
from shared_nets.sam.tiny_vit import TinyViTBlock

from .text import TEXT_EMBEDDING_DIM

__all__ = ["SSAM", "TextAffineLayer", "S_SAM_MODES", "TAL_TYPES"]

S_SAM_MODES = ("paper", "official")
TAL_TYPES = ("linear", "linear_relu_bn")

_SVD_LAYER_TYPES = (SVDLinear, SVDConv2d)


def block_norms(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The two LayerNorms of an encoder block: ViT ``norm1``/``norm2``; TinyViT ``attn.norm``/``mlp.norm``."""
    if isinstance(block, TinyViTBlock):
        return block.attn.norm, block.mlp.norm
    return block.norm1, block.norm2


class TextAffineLayer(nn.Module):
    """Text-Affine Layer: CLIP text embedding -> SAM prompt token (paper section 3, Fig. 1).

    Args:
        in_dim: text embedding width (512 for CLIP ViT-B/32).
        out_dim: SAM prompt embedding width (256 for the official SAM models).
        tal_type: ``linear`` (paper: "a learnable one-layer MLP") or ``linear_relu_bn``
            (official code: Linear, ReLU, BatchNorm1d).
    """

    def __init__(self, in_dim: int = TEXT_EMBEDDING_DIM, out_dim: int = 256, tal_type: str = "linear") -> None:
        super().__init__()
        if tal_type not in TAL_TYPES:
            raise ValueError(f"tal must be one of {TAL_TYPES}, got {tal_type!r}.")
        self.tal_type = tal_type
        self.linear = nn.Linear(in_dim, out_dim)
        self.act = nn.ReLU() if tal_type == "linear_relu_bn" else nn.Identity()
        self.norm = nn.BatchNorm1d(out_dim) if tal_type == "linear_relu_bn" else nn.Identity()

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """Map text embeddings ``[K, in_dim]`` to prompt tokens ``[K, out_dim]``."""
        if self.training and self.tal_type == "linear_relu_bn" and text.shape[0] < 2:
            raise ValueError(
                "tal='linear_relu_bn' (the official code's BatchNorm TAL) needs at least 2 classes in training, "
                f"got {text.shape[0]}; use tal='linear' (the paper's TAL) for a single class."
            )
        return self.norm(self.act(self.linear(text)))


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return value


class SSAM(nn.Module):
    """S-SAM network on the 5D tensor contract ``[B, C, H, W, D] -> [B, K, H, W, D]``.

    Every axial slice is segmented independently (S-SAM is a 2D method); ``K = 1 +
    len(class_names)``: channel 0 is a constant 0 logit (background), channel ``i`` the
    logit of ``class_names[i - 1]``.

    Composed from built parts (:func:`shared_nets.s_sam.build_s_sam` builds them from the paper's
    settings and sets the trainable set with :meth:`set_trainable`). The constructor builds and
    injects nothing and leaves ``requires_grad`` as the parts have it.

    Args:
        sam: SAM whose image encoder already carries the SVD layers (``shared_nets.peft.inject_svd``)
            unless the whole model is fine-tuned, with the attention layout (global / windowed,
            relative positions or none) already chosen.
        text_embeddings: ``[len(class_names), text_dim]`` label-name vectors, one row per class
            (kept as a non-persistent buffer, so a checkpoint does not depend on the class list).
        class_names: label names, in output-channel order (background excluded).
        tal: the Text-Affine Layer mapping a text vector to a prompt token, or None to feed the
            first prompt-dim entries of the text vector as the token (Table 3 "TAL" off).
        img_size: in-plane input size of the encoder.
        mode: ``paper`` or ``official``: recorded for reports (the parts carry its effects).
        full_finetune: SAM's own weights are trained (no SVD layers); see :meth:`set_trainable`.
        peft: the image encoder's ``peft`` setting (:data:`shared_nets.peft.PEFT_METHODS`); None means
            ``"full"`` with ``full_finetune``, else ``"svd"``. ``lora``/``fact``/``adapter`` train the
            encoder parameters of that method (already injected) in :meth:`set_trainable`.
        resize_input: if True, slices whose in-plane size is not ``img_size`` are resized
            bilinearly in and the logits back; if False such input is an error.
        pixel_norm: subtract SAM's pixel mean and divide by its std per RGB channel.
        gradient_checkpointing: recompute the image-encoder blocks in the backward pass instead of
            keeping their activations (same outputs and gradients).
    """

    def __init__(
        self,
        sam: Sam,
        text_embeddings: torch.Tensor,
        class_names: Sequence[str],
        tal: TextAffineLayer | None,
        img_size: int,
        mode: str = "paper",
        full_finetune: bool = False,
        peft: str | None = None,
        resize_input: bool = False,
        pixel_norm: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if mode not in S_SAM_MODES:
            raise ValueError(f"mode must be one of {S_SAM_MODES}, got {mode!r}.")
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] != len(class_names):
            raise ValueError(
                f"text_embeddings must be [len(class_names)={len(class_names)}, text_dim], "
                f"got shape {tuple(text_embeddings.shape)}."
            )
        prompt_dim = sam.prompt_encoder.embed_dim
        if tal is None and text_embeddings.shape[1] < prompt_dim:
            raise ValueError(
                f"use_tal=false feeds the first {prompt_dim} text entries as the token; "
                f"text_dim={text_embeddings.shape[1]} is smaller."
            )
        self.sam = sam
        self.img_size = img_size
        self.class_names = [str(n) for n in class_names]
        self.text_dim = int(text_embeddings.shape[1])
        self.mode = mode
        self.use_tal = tal is not None
        self.full_finetune = full_finetune
        self.peft = peft if peft is not None else ("full" if full_finetune else "svd")
        if full_finetune != (self.peft == "full"):
            raise ValueError(f"peft={self.peft!r} contradicts full_finetune={full_finetune}; set only peft.")
        self.resize_input = resize_input
        self.pixel_norm = pixel_norm
        # Label-name prompts (paper section 3): fixed text vectors, non-persistent so that a
        # checkpoint does not depend on the class list it was trained with.
        self.register_buffer("text_embeddings", text_embeddings, persistent=False)
        self.tal = tal
        # the singular-value layers (eq. 2) in encoder order: block layers, then the neck's
        self.svd_layers: list[nn.Module] = [m for m in sam.image_encoder.modules() if isinstance(m, _SVD_LAYER_TYPES)]
        if not isinstance(gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {gradient_checkpointing!r}.")
        self.gradient_checkpointing = gradient_checkpointing
        enable_gradient_checkpointing(self.sam.image_encoder.blocks, gradient_checkpointing)

    # ------------------------------------------------------------------ trainable set
    def set_trainable(
        self,
        svd_scale: bool = True,
        svd_shift: bool = True,
        train_pos_embed: bool = True,
        train_norms: bool = True,
        train_decoder_norms: bool = False,
    ) -> None:
        """Freeze everything except S-SAM's trainable set (paper section 3, Fig. 1; Table 3 switches).

        With ``full_finetune`` every used parameter trains and the switches are ignored.

        Args:
            svd_scale: train the singular-value scales ``a`` (Table 3 "Scaling").
            svd_shift: train the singular-value shifts ``b`` (Table 3 "Shifting").
            train_pos_embed: train the position embedding (Table 3 "Tuning Pos Embeds").
            train_norms: train the encoder blocks' LayerNorms (Table 3 "Tuning Layernorm").
            train_decoder_norms: train the mask decoder's LayerNorms (official code).
        """
        if self.full_finetune:
            self.requires_grad_(True)
            # Parts this network never uses stay frozen, so every trainable parameter gets a
            # gradient (DistributedDataParallel requires it): the IoU head, the hypernetworks of
            # mask tokens 1-3 and the prompt encoder's point/box/mask embeddings.
            dec, pe = self.sam.mask_decoder, self.sam.prompt_encoder
            dec.iou_prediction_head.requires_grad_(False)
            dec.output_hypernetworks_mlps[1:].requires_grad_(False)
            pe.requires_grad_(False)
            pe.no_mask_embed.requires_grad_(True)
            return
        self.requires_grad_(False)
        for layer in self.svd_layers:
            layer.scale.requires_grad_(svd_scale)
            layer.shift.requires_grad_(svd_shift)
        enc = self.sam.image_encoder
        if train_pos_embed and getattr(enc, "pos_embed", None) is not None:
            enc.pos_embed.requires_grad_(True)
        if train_norms:
            # The blocks' LayerNorms only: the neck's LayerNorm2d stay frozen, as in the official
            # code and in the paper's trainable count.
            for blk in enc.blocks:
                for norm in block_norms(blk):
                    norm.requires_grad_(True)
        if train_decoder_norms:
            for m in self.sam.mask_decoder.transformer.modules():
                if isinstance(m, nn.LayerNorm):
                    m.requires_grad_(True)
        if self.peft in ("lora", "fact", "adapter"):
            globs = peft_globs(self.peft)
            for name, p in enc.named_parameters():
                if any(fnmatchcase(name, g) for g in globs):
                    p.requires_grad_(True)
        if self.tal is not None:
            self.tal.requires_grad_(True)

    def trainable_parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per S-SAM component (and ``total``), for reports and tests."""
        groups = {
            "pos_embed": ["sam.image_encoder.pos_embed"],
            "svd_blocks": ["sam.image_encoder.blocks.", "sam.image_encoder.layers."],  # ViT / TinyViT
            "svd_neck": ["sam.image_encoder.neck."],
            "encoder_norms": [],
            "tal": ["tal."],
            "decoder_norms": [],
            "other": [],
        }
        counts = dict.fromkeys(groups, 0)
        norm_params = {id(p) for blk in self.sam.image_encoder.blocks for n in block_norms(blk) for p in n.parameters()}
        dec_norm_params = {
            id(p) for m in self.sam.mask_decoder.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()
        }
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in norm_params:
                key = "encoder_norms"
            elif id(p) in dec_norm_params:
                key = "decoder_norms"
            else:
                key = next((k for k, prefixes in groups.items() if any(name.startswith(x) for x in prefixes)), "other")
            counts[key] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    # ------------------------------------------------------------------ forward
    def class_prompts(self) -> torch.Tensor:
        """Sparse prompt tokens of the classes: ``[K, prompt_dim]`` (TAL over the stored text vectors)."""
        text = self.text_embeddings
        if self.tal is None:
            return text[:, : self.sam.prompt_encoder.embed_dim]
        return self.tal(text.to(self.tal.linear.weight.dtype))

    def decode(self, image_embeddings: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """One mask-decoder pass per (image, class) (paper section 3, Fig. 1).

        Each image embedding is paired with each class token (row ``n*K + k``); the dense
        prompt is SAM's "no mask" embedding. The official code decodes with
        ``multimask_output=False``, i.e. the first mask token.

        Args:
            image_embeddings: ``[N, C, h, w]`` encoder output.
            prompts: ``[K, C]`` class prompt tokens.

        Returns:
            ``[N, K, 4h, 4w]`` mask logits.
        """
        pe = self.sam.prompt_encoder
        n, k = image_embeddings.shape[0], prompts.shape[0]
        sparse = prompts.to(image_embeddings.dtype).repeat(n, 1).unsqueeze(1)  # [N*K, 1, C]
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        masks, _ = decode_masks(
            self.sam.mask_decoder, image_embeddings.repeat_interleave(k, dim=0), pe.get_dense_pe(), sparse, dense
        )
        return masks[:, 0].reshape(n, k, *masks.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment every class in every axial slice.

        Args:
            x: ``[B, C, H, W, D]`` image, ``C`` = 1 (grey, repeated to 3) or 3 (RGB).

        Returns:
            ``[B, 1 + len(class_names), H, W, D]`` logits; channel 0 is 0 (background).
        """
        if x.ndim != 5:
            raise ValueError(f"SSAM expects a 5D input [B, C, H, W, D], got shape {tuple(x.shape)}.")
        b, c, hh, ww, d = x.shape
        if c not in (1, 3):
            raise ValueError(
                f"SSAM expects 1 (grey) or 3 (RGB) image channels, got {c} (input shape {tuple(x.shape)})."
            )
        s = self.img_size
        slices = volume_to_slices(x)  # [B*D, C, H, W]
        if (hh, ww) != (s, s):
            if not self.resize_input:
                raise ValueError(
                    f"SSAM input in-plane size ({hh}, {ww}) must equal img_size={s}; resize in pre-processing "
                    "(the bundle's Resized + Invertd) or construct the network with resize_input=true."
                )
            slices = F.interpolate(slices, size=(s, s), mode="bilinear", align_corners=False)
        slices = to_rgb(slices)
        if self.pixel_norm:
            # SAM's ImageNet statistics (the official code's copy has a typo, std 53.395 for red; not reproduced)
            slices = (slices - self.sam.pixel_mean) / self.sam.pixel_std
        emb = self.sam.image_encoder(slices)  # [B*D, C', h, w]
        logits = self.decode(emb, self.class_prompts())  # [B*D, K, 4h, 4w]
        # Official post-processing: bilinear up-sampling of the low-resolution masks.
        logits = upsample_to(logits, (hh, ww))
        logits = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
        return slices_to_volume(logits, d)
