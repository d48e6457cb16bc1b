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

import dataclasses
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

from shared_nets.peft import inject_svd
from shared_nets.sam import build_sam, enable_gradient_checkpointing, get_variant
from shared_nets.sam.decoding import decode_masks
from shared_nets.sam.slices import slices_to_volume, to_rgb, upsample_to, volume_to_slices
from shared_nets.sam.tiny_vit import TinyViTBlock

from .text import TEXT_EMBEDDING_DIM, HashTextEncoder, load_class_embeddings

__all__ = ["SSAM", "TextAffineLayer", "S_SAM_MODES", "TAL_TYPES"]

S_SAM_MODES = ("paper", "official")
TAL_TYPES = ("linear", "linear_relu_bn")

# Encoder layers S-SAM re-parameterises (paper section 3, "SVD-based Tuning"; neck convs: code).
_SVD_TARGETS = ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2", "neck")
# The same layers in LiteMedSAM's TinyViT blocks (its MLP's linears are fc1/fc2; the neck has two convs too)
_SVD_TARGETS_TINY_VIT = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "neck")


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
            and ``use_rel_pos`` (see the module docstring).
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
        full_finetune: train every parameter of SAM that the forward pass uses, and the TAL,
            without the SVD re-parameterisation ("SAM with full finetuning" in Tables 2, 4, 5;
            used by the demo, which trains ``tiny`` from scratch).
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
    """

    def __init__(
        self,
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
        full_finetune: bool = False,
        resize_input: bool = False,
        pixel_norm: bool = False,
        patch_size: int = 16,
        pos_embed_mode: str = "avgpool",
        gradient_checkpointing: bool = False,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
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
            ("full_finetune", full_finetune),
            ("resize_input", resize_input),
            ("pixel_norm", pixel_norm),
        ):
            _check_bool(value, name)
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
        sam: Sam = build_sam(
            v,
            checkpoint=checkpoint,
            img_size=img_size,
            patch_size=patch_size,
            pos_embed_mode=pos_embed_mode,
            use_sdpa=use_sdpa,
        )
        self.sam = sam
        if not use_rel_pos and v.encoder != "tiny_vit":
            # Official-code behaviour (JayParanjape/SVDSAM model.py builds ImageEncoderViT with
            # use_rel_pos=False): the blocks have no relative-position tables at all.
            for blk in sam.image_encoder.blocks:
                blk.attn.use_rel_pos = False
                del blk.attn.rel_pos_h, blk.attn.rel_pos_w

        self.img_size = img_size
        self.class_names = [str(n) for n in class_names]
        self.text_dim = text_dim
        self.mode = mode
        self.use_tal = use_tal
        self.full_finetune = full_finetune
        self.resize_input = resize_input
        self.pixel_norm = pixel_norm
        prompt_dim = v.prompt_embed_dim
        if not use_tal and text_dim < prompt_dim:
            raise ValueError(
                f"use_tal=false feeds the first {prompt_dim} text entries as the token; text_dim={text_dim} is smaller."
            )

        # Label-name prompts (paper section 3): fixed text vectors, non-persistent so that a
        # checkpoint does not depend on the class list it was trained with.
        if text_embeddings is None:
            text = HashTextEncoder(text_dim)(self.class_names)
        else:
            text = load_class_embeddings(os.fspath(text_embeddings), self.class_names, dim=text_dim)
        self.register_buffer("text_embeddings", text, persistent=False)
        self.tal = TextAffineLayer(text_dim, prompt_dim, tal) if use_tal else None

        # Singular-value re-parameterisation (eq. 2), injected after the checkpoint is loaded.
        self.svd_layers: list[nn.Module] = []
        if not full_finetune and (svd_scale or svd_shift):
            targets = _SVD_TARGETS_TINY_VIT if v.encoder == "tiny_vit" else _SVD_TARGETS
            self.svd_layers = list(inject_svd(sam.image_encoder, include=targets))
        self._set_trainable(svd_scale, svd_shift, train_pos_embed, train_norms, train_decoder_norms)
        if not isinstance(gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {gradient_checkpointing!r}.")
        self.gradient_checkpointing = gradient_checkpointing
        enable_gradient_checkpointing(self.sam.image_encoder.blocks, gradient_checkpointing)

    # ------------------------------------------------------------------ trainable set
    def _set_trainable(
        self, svd_scale: bool, svd_shift: bool, train_pos_embed: bool, train_norms: bool, train_decoder_norms: bool
    ) -> None:
        """Freeze everything except S-SAM's trainable set (paper section 3, Fig. 1; Table 3 switches)."""
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
