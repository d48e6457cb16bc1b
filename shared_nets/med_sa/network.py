"""Med-SA: Medical SAM Adapter (Wu et al., arXiv 2304.12620) as a MONAI-contract network.

Frozen SAM with bottleneck adapters in every encoder block, the SD-Trans depth branch for
slice chunks, three adapters per decoder block of which the first is the prompt-conditioned
HyP-Adpt, and click/box prompts decoded from guidance channels. Input ``[B, C + 3, H, W, D]``
(image channels, then positive clicks, negative clicks, box), output ``[B, 2, H, W, D]``
logits ``[background, object]`` at the input size.

Deliberate differences from the official code (KidsWithTokens/Medical-SAM-Adapter), each a
switch of :func:`~shared_nets.med_sa.build_med_sa` whose default follows the paper:

- adapter activation ReLU (paper) vs GELU (code): ``adapter_act``;
- adapter width ``D/16`` reproduces the paper's ~13M trainable parameters on ViT-H; the code's
  ``D/4`` with a third (depth) adapter per block trains 82.9M: ``adapter_ratio``, ``depth_adapter``;
- decoder adapters and HyP-Adpt exist only in the paper: ``decoder_adapters``, ``hyp_adapter``;
- the code trains the whole mask decoder, the paper keeps SAM frozen: ``train_mask_decoder``;
- the code's adapters start from random up-projections; ours are zero-initialised so 2D
  inference starts exactly at SAM (AdaptFormer, which the paper follows for ``s``, does
  this): ``adapter_zero_init``;
- SD-Trans is correct in windowed blocks too (code: only in global blocks), and official
  relative-position tables are loaded (code: never) -- no switch, the code's behaviour is a bug.
"""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from segment_anything.modeling import Sam
from torch import nn

from shared_nets.prompts import decode_boxes_2d, decode_points, decode_points_2d, scale_coords
from shared_nets.sam import enable_gradient_checkpointing
from shared_nets.sam.cache import EmbeddingCache
from shared_nets.sam.decoding import decode_masks
from shared_nets.sam.encoder_blocks import run_encoder
from shared_nets.sam.slices import slices_to_volume, to_rgb, upsample_to, volume_to_slices

__all__ = ["MedSA", "MEDSA_OFFICIAL_CODE_SETTINGS", "PROMPT_SCOPES", "check_forward_args"]

#: ``slice``: each slice sees only its own clicks (as a 2D interactive tool; default);
#: ``chunk``: every slice of a 3D chunk sees all clicks of the chunk (at their in-plane position).
#: Boxes are always restricted per slice (a 3D box gives every slice inside it its rectangle).
PROMPT_SCOPES = ("slice", "chunk")

#: :func:`~shared_nets.med_sa.build_med_sa` switches that reproduce the official code's model
#: (82.9M trainable on ViT-H).
MEDSA_OFFICIAL_CODE_SETTINGS: dict[str, object] = {
    "adapter_ratio": 0.25,
    "adapter_act": "gelu",
    "adapter_zero_init": False,
    "depth_adapter": True,
    "decoder_adapters": False,
    "hyp_adapter": False,
    "train_mask_decoder": True,
}


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return value


def _check_pos_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def check_forward_args(
    in_channels: object, prompt_scope: object, max_points: object, max_depth: object, embedding_cache: object
) -> None:
    """Validate the plain values :class:`MedSA`'s forward reads (``ValueError`` naming the argument)."""
    if in_channels not in (1, 3) or isinstance(in_channels, bool):
        raise ValueError(f"in_channels must be 1 (grey, repeated to RGB) or 3 image channels, got {in_channels!r}.")
    if prompt_scope not in PROMPT_SCOPES:
        raise ValueError(f"prompt_scope must be one of {PROMPT_SCOPES}, got {prompt_scope!r}.")
    _check_pos_int(max_points, "max_points")
    _check_pos_int(max_depth, "max_depth")
    if isinstance(embedding_cache, bool) or not isinstance(embedding_cache, int) or embedding_cache < 0:
        raise ValueError(
            f"embedding_cache must be a number of cached images >= 0 (0 disables), got {embedding_cache!r}."
        )


class MedSA(nn.Module):
    """Medical SAM Adapter for interactive (click / box) segmentation of 2D images and 3D slice chunks.

    Paper sections: "Med-SA architecture" (adapters, Fig. 1b/d), "SD-Trans" (Fig. 1c),
    "HyP-Adpt" (Eq. 1-2, Fig. 2), "Training Strategy" (click and box prompts).

    The network is composed from a SAM whose parts already carry Med-SA's adapters; it builds and
    injects nothing. :func:`~shared_nets.med_sa.build_med_sa` builds SAM, injects the adapters, returns this
    class and sets which parameters train.

    Args:
        sam: SAM (``segment_anything``'s ``Sam``) with the adapters injected: every image-encoder block a
            :class:`~shared_nets.med_sa.blocks.MedSAEncoderBlock` (ViT) or
            :class:`~shared_nets.med_sa.blocks.MedSATinyViTBlock` (TinyViT), and the mask decoder's transformer a
            :class:`~shared_nets.med_sa.blocks.MedSATwoWayTransformer` when ``decoder_adapters``. Its image
            encoder, prompt encoder and mask decoder become this module's.
        img_size: SAM input side; slices are resized to it inside the network.
        in_channels: image channels before the 3 guidance channels: 1 (grey, repeated to RGB) or 3.
        max_points: click slots per decoded slice (more clicks raise ``ValueError``).
        max_depth: largest slice chunk ``D`` accepted in one forward.
        prompt_scope: :data:`PROMPT_SCOPES`.
        automatic: allow inputs without any prompt (decoded with SAM's "no prompt" tokens);
            otherwise such an input raises ``ValueError`` naming the guidance channels.
        decoder_adapters: whether ``sam``'s mask decoder carries the decoder adapters (recorded only).
        embedding_cache: without autograd, keep the embeddings of this many recent images and reuse them
            when the same image is decoded again with new prompts; 0 disables.
        no_prompt_logit: object logit written for slices without any prompt (non-automatic).
        gradient_checkpointing: recompute the image-encoder blocks in the backward pass instead of
            keeping their activations (training memory; same outputs and gradients).
    """

    def __init__(
        self,
        sam: Sam,
        img_size: int = 1024,
        in_channels: int = 1,
        max_points: int = 8,
        max_depth: int = 16,
        prompt_scope: str = "slice",
        automatic: bool = False,
        decoder_adapters: bool = True,
        embedding_cache: int = 8,
        no_prompt_logit: float = -20.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_forward_args(in_channels, prompt_scope, max_points, max_depth, embedding_cache)
        for name, value in (
            ("automatic", automatic),
            ("decoder_adapters", decoder_adapters),
            ("gradient_checkpointing", gradient_checkpointing),
        ):
            _check_bool(value, name)
        self.max_points, self.max_depth = max_points, max_depth
        self.in_channels, self.img_size = in_channels, img_size
        self.prompt_scope, self.automatic, self.embedding_cache = prompt_scope, automatic, embedding_cache
        self.no_prompt_logit = float(no_prompt_logit)
        self.image_encoder, self.prompt_encoder, self.mask_decoder = (
            sam.image_encoder,
            sam.prompt_encoder,
            sam.mask_decoder,
        )
        self.decoder_adapters = decoder_adapters
        self._embeddings = EmbeddingCache(embedding_cache, self.image_encoder)
        self.gradient_checkpointing = gradient_checkpointing
        enable_gradient_checkpointing(self.image_encoder.blocks, gradient_checkpointing)

    # ------------------------------------------------------------------ encoder
    def encode(self, images: torch.Tensor, num_slices: int = 1) -> torch.Tensor:
        """Image embeddings of slices (paper Fig. 1b/c).

        Args:
            images: ``[B*D, 3, img_size, img_size]``, the ``D`` slices of each sample consecutive.
            num_slices: ``D`` (SD-Trans mixes these slices).

        Returns:
            ``[B*D, C', img_size/p, img_size/p]`` (``C'`` the neck width).
        """
        return run_encoder(self.image_encoder, images, lambda i, blk, x: blk(x, num_slices))

    @property
    def cache_hits(self) -> int:
        """Forwards that reused cached image embeddings (re-prompts of an image already encoded)."""
        return self._embeddings.hits

    def _encode_cached(self, images: torch.Tensor, num_slices: int) -> torch.Tensor:
        """:meth:`encode` through a small LRU cache keyed on the image tensor (no autograd only).

        The encoder does not see the prompts (HyP-Adpt and the other prompt-conditioned
        adapters sit in the mask decoder), so a re-prompt of a cached image runs only the prompt
        encoder and the decoder; in the official-code setting too.
        """
        entry = self._embeddings.lookup(images, num_slices, lambda: self.encode(images, num_slices))
        return self.encode(images, num_slices) if entry is None else entry["value"]

    def clear_cache(self) -> None:
        """Drop the cached image embeddings."""
        self._embeddings.clear()

    # ------------------------------------------------------------------ prompts
    def prompts(self, guidance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode guidance channels into per-slice SAM prompts in SAM's input frame.

        Args:
            guidance: ``[B, 3, H, W, D]`` (positive clicks, negative clicks, box).

        Returns:
            ``coords [B*D, P, 2]`` (x, y) in ``img_size`` pixels, ``labels [B*D, P]`` (1/0/-1),
            ``boxes [B*D, 4]`` (x0, y0, x1, y1), ``box_valid [B*D]`` bool; row ``b*D + d``.
        """
        b, _, h, w, d = guidance.shape
        try:
            if self.prompt_scope == "chunk" and d > 1:
                c3, labels = decode_points(guidance[:, :2], self.max_points, strict=True)
                coords = c3[..., [1, 0]].repeat_interleave(d, dim=0)  # in-plane (x=j, y=i) on every slice
                labels = labels.repeat_interleave(d, dim=0)
            else:
                coords, labels = decode_points_2d(guidance[:, :2], self.max_points, strict=True)
        except ValueError as e:
            raise ValueError(
                f"MedSA: too many clicks in the guidance channels ({e}); pass at most max_points={self.max_points} "
                f"clicks per {'chunk' if self.prompt_scope == 'chunk' else 'slice'} or raise max_points."
            ) from None
        boxes, box_valid = decode_boxes_2d(guidance[:, 2:3])
        boxes = boxes - torch.tensor(
            [0.0, 0.0, 1.0, 1.0], device=boxes.device, dtype=boxes.dtype
        )  # SAM: last pixel, inclusive
        coords = scale_coords(coords, (w, h), (self.img_size, self.img_size))
        boxes = scale_coords(boxes, (w, h), (self.img_size, self.img_size))
        return coords, labels, boxes, box_valid

    def embed_prompts(
        self, coords: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, box_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's sparse prompt tokens with a fixed count ``max_points + 2`` (box corners; not-a-point if no box).

        Returns:
            ``sparse [N, P + 2, C']`` and ``dense [N, C', h, w]``.
        """
        pe = self.prompt_encoder
        corners, dense = pe(points=None, boxes=boxes, masks=None)
        # SAM's PromptEncoder._embed_points, with torch.where instead of boolean-mask in-place adds (same
        # values): a trace would freeze the number of padding points that a boolean mask selects.
        points = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)
        lab = labels[..., None]
        points = torch.where(lab == -1, pe.not_a_point_embed.weight.to(points.dtype), points)
        points = torch.where(lab == 0, points + pe.point_embeddings[0].weight, points)
        points = torch.where(lab == 1, points + pe.point_embeddings[1].weight, points)
        pad = pe.not_a_point_embed.weight.to(corners.dtype)
        corners = torch.where(box_valid[:, None, None], corners, pad.expand(corners.shape[0], 2, -1))
        return torch.cat([points, corners], dim=1), dense

    # ------------------------------------------------------------------ decoder
    def decode(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Single-mask logits from SAM's mask decoder with Med-SA's decoder adapters (Fig. 1d).

        Args:
            image_embeddings: ``[N, C', h, w]``, one per prompt row.
            sparse: ``[N, max_points + 2, C']``; dense: ``[N, C', h, w]``.

        Returns:
            ``[N, 1, 4h, 4w]`` logits of SAM's first (single-mask) output token.
        """
        masks, _ = decode_masks(self.mask_decoder, image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense)
        return masks[:, :1]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment the prompted object.

        Args:
            x: ``[B, C + 3, H, W, D]``: ``C = in_channels`` image channels, then positive clicks,
                negative clicks and box as guidance channels; ``D`` = 1 (2D) or a slice chunk
                (``D <= max_depth``).

        Returns:
            ``[B, 2, H, W, D]`` logits ``[background (0), object]``; ``softmax`` gives
            ``sigmoid(object logit)`` as the object probability.
        """
        if isinstance(x, MetaTensor):
            x = x.as_tensor()
        c = self.in_channels
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != c + 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"MedSA expects input [B, {c + 3}, H, W, D] ({c} image channel(s), then positive clicks, "
                f"negative clicks, box); got {shape}."
            )
        b, _, h, w, d = x.shape
        if d > self.max_depth:
            raise ValueError(
                f"MedSA got a chunk of {d} slices but max_depth={self.max_depth}; use a smaller roi depth "
                "or raise max_depth."
            )
        guidance = x[:, c:]
        coords, labels, boxes, box_valid = self.prompts(guidance)
        clicked = (labels >= 0).any(dim=1)
        row_prompted = clicked | box_valid  # [B*D]
        item_prompted = row_prompted.view(b, d).any(dim=1)
        if not self.automatic and not bool(item_prompted.all()):
            missing = torch.nonzero(~item_prompted).flatten().tolist()
            raise ValueError(
                f"MedSA received no prompt for batch item(s) {missing}: put clicks in guidance channels "
                f"{c} (positive) / {c + 1} (negative) or a box in channel {c + 2} "
                "(MONAI Label 'foreground', 'background', 'roi'), "
                "or construct the network with automatic=True."
            )

        if self.automatic or bool(row_prompted.all()):
            return self.forward_prompted(x[:, :c], coords, labels, boxes, box_valid)
        # decode only the prompted slices; the encoder still sees the whole chunk (SD-Trans)
        emb = self._slice_embeddings(x[:, :c])
        rows = torch.nonzero(row_prompted).flatten()
        out = self.decode(emb[rows], *self.embed_prompts(coords[rows], labels[rows], boxes[rows], box_valid[rows]))
        logits = out.new_full((b * d, *out.shape[1:]), self.no_prompt_logit)
        return self._to_volume(logits.index_copy(0, rows, out), h, w, d)

    def forward_prompted(
        self,
        image: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor,
        box_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Segment with prompts already decoded (as :meth:`prompts` returns them), every slice decoded.

        This is :meth:`forward` without the guidance decoding and without the prompted-rows
        selection, both data-dependent (nonzero-based), so it is the part that TorchScript tracing,
        ``torch.export`` and ONNX can express (see ``shared_nets.export``). It equals
        :meth:`forward` when every slice carries a prompt or the network is automatic.

        Args:
            image: ``[B, in_channels, H, W, D]``.
            coords, labels, boxes, box_valid: per-slice prompts, rows ``b*D + d`` (see :meth:`prompts`).

        Returns:
            ``[B, 2, H, W, D]`` logits as :meth:`forward`.
        """
        _, _, h, w, d = image.shape
        emb = self._slice_embeddings(image)
        return self._to_volume(self.decode(emb, *self.embed_prompts(coords, labels, boxes, box_valid)), h, w, d)

    def _slice_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """Image embeddings of the slices of ``image [B, C, H, W, D]`` (through the cache)."""
        img = upsample_to(to_rgb(volume_to_slices(image)), (self.img_size, self.img_size))
        return self._encode_cached(img.contiguous(), image.shape[-1])

    @staticmethod
    def _to_volume(logits: torch.Tensor, h: int, w: int, d: int) -> torch.Tensor:
        """``[B*D, 1, h', w']`` object logits -> ``[B, 2, H, W, D]`` (background logit 0)."""
        fg = slices_to_volume(upsample_to(logits, (h, w)), d)  # [B, 1, H, W, D]
        return torch.cat([torch.zeros_like(fg), fg], dim=1)
