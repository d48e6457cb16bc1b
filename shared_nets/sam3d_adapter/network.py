"""3DSAM-adapter: SAM turned fully volumetric for point-prompted (or automatic) 3D segmentation.

Paper: Gong et al., "3DSAM-adapter: Holistic adaptation of SAM from 2D to 3D for promptable tumor
segmentation" (arXiv 2306.13465); official code med-air/3DSAM-adapter, read for facts only. Where this
implementation follows the code rather than the paper, docs/deviations.md says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from shared_nets.peft import freeze_except
from shared_nets.prompts import decode_points
from shared_nets.sam.cache import EmbeddingCache

from .encoder import Block3D, Neck3D, VolumeTokenizer, run_blocks
from .heads import PROMPT_ENCODINGS, MultiLevelDecoder3D, PromptEncoder3D

__all__ = ["SAM3DAdapter", "PROMPT_ENCODER_MODES", "NO_POSITIVE_MODES", "SAM3D_TRAINABLE_PATTERNS"]

PROMPT_ENCODER_MODES = (*PROMPT_ENCODINGS, "none")
NO_POSITIVE_MODES = ("error", "background", "run")

# What the method tunes (poster: "only a few lightweight spatial adapters"; official freezing rules).
SAM3D_TRAINABLE_PATTERNS = (
    "tokenizer.slice_embed.*",
    "tokenizer.depth_embed",
    "blocks.*.adapter.*",
    "blocks.*.norm1.*",
    "blocks.*.norm2.*",
    "blocks.*.attn.rel_pos_d",
    "necks.*",
    "decoder.*",
)


def _as_patch_size(img_size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(img_size, bool):
        raise ValueError(f"img_size must be an int or [H, W, D], got {img_size!r}.")
    if isinstance(img_size, int):
        size = (img_size,) * 3
    elif isinstance(img_size, Sequence) and not isinstance(img_size, str) and len(img_size) == 3:
        size = tuple(img_size)
    else:
        raise ValueError(f"img_size must be an int or [H, W, D], got {img_size!r}.")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"img_size must hold positive integers, got {img_size!r}.")
    return size  # type: ignore[return-value]


def _check_in_channels(in_channels: int) -> None:
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grey, repeated to RGB) or 3, got {in_channels!r}.")


def _check_click_options(max_points: int, no_positive: str) -> None:
    if not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points must be a positive integer, got {max_points!r}.")
    if no_positive not in NO_POSITIVE_MODES:
        raise ValueError(f"no_positive must be one of {NO_POSITIVE_MODES}, got {no_positive!r}.")


def _key(parts: Mapping, level: int) -> int | str:
    """The key of ``level`` in a level -> module mapping keyed by ints or by strings (``nn.ModuleDict``)."""
    return level if level in parts else str(level)


class SAM3DAdapter(nn.Module):
    """3DSAM-adapter network: ``(B, C, H, W, D)`` patch (+ click guidance) -> ``(B, K, H, W, D)`` logits.

    Composed from built parts, as ``segment_anything``'s ``Sam(image_encoder, prompt_encoder, mask_decoder)``;
    :func:`shared_nets.sam3d_adapter.build_sam3d_adapter` builds them from a SAM backbone (the bundles' target).
    Architecture (poster sections in brackets; details from the official code):

    - [Adapting Image Encoder for Volumetric Inputs] a :class:`VolumeTokenizer` resizes the patch so SAM's
      frozen 16x16 patch embedding, run on every axial slice, gives a ``sam_input_size / 16`` in-plane grid
      (512 -> 32 for ViT-B); a trainable depthwise Conv3d along the slices reaches the same step in depth
      (a 128^3 patch gives 32^3 tokens). SAM's position embedding, built at twice the grid, is
      average-pooled 2x2, plus a learnable depth embedding. Every :class:`Block3D` (one per SAM block) runs
      3D window attention (``window_size``^3 windows, shifted by half a window on even blocks) with a depth
      relative-position table initialised from SAM's h/w tables, and starts with a :class:`SpatialAdapter3D`.
      A :class:`Neck3D` after blocks depth/4, depth/2, 3depth/4, depth (3, 6, 9, 12 for ViT-B) gives each of
      the four feature levels.
    - [Prompt Encoding by Visual Sampler] a :class:`PromptEncoder3D` at each prompted level (the poster's
      best: the bottleneck only).
    - [Lightweight Mask Decoder] :class:`MultiLevelDecoder3D` over the levels and the image.

    Input channels are ``[image (in_channels), positive clicks, negative clicks]`` (clicks are decoded with
    :func:`shared_nets.prompts.decode_points`), or the image alone without prompt encoders. A grey image is
    repeated to SAM's three channels. Intensity normalisation is the bundle's transform. The constructor
    keeps each part's ``requires_grad``; :meth:`set_trainable` applies the method's freezing.

    Args:
        tokenizer: volume -> 3D token grid, around SAM's patch and position embeddings.
        blocks: the 3D transformer blocks on the tokenizer's grid, in order (at least 4).
        necks: feature level (1-4) -> neck applied after block ``depth * level // 4``; the levels the
            decoder aggregates (all four, or ``{4: ...}`` for the bottleneck only).
        decoder: decoder over one feature map per neck level (shallow to deep) and the image.
        prompt_encoders: prompted level -> prompt encoder (levels among ``necks``, one encoding for all);
            None or empty for automatic segmentation (no click channels).
        img_size: input patch ``H = W = D`` (int) or ``[H, W, D]`` with ``H == W``, matching the
            tokenizer's resizing.
        in_channels: image channels, 1 (grey, repeated) or 3.
        max_points: clicks decoded per patch (positives first; see ``decode_points``).
        no_positive: what a patch without a positive click does: ``"error"``, ``"background"`` or ``"run"``
            (see :func:`~shared_nets.sam3d_adapter.build_sam3d_adapter`).
        background_logit: channel-0 logit written for ``"background"`` patches (others get its negative).
        use_checkpoint: gradient checkpointing of the transformer blocks in training.
        cache_image_embedding: in eval mode without gradients, reuse the image features (and the decoder's
            prompt-independent part) when the same patch comes again with new clicks.
        cache_size: patches kept in that cache (the windows of one volume).
        variant: name of the SAM backbone the parts come from (reports only).
    """

    def __init__(
        self,
        tokenizer: VolumeTokenizer,
        blocks: Sequence[Block3D],
        necks: Mapping[int, Neck3D],
        decoder: MultiLevelDecoder3D,
        prompt_encoders: Mapping[int, PromptEncoder3D] | None = None,
        *,
        img_size: int | Sequence[int],
        in_channels: int = 1,
        max_points: int = 64,
        no_positive: str = "error",
        background_logit: float = 10.0,
        use_checkpoint: bool = False,
        cache_image_embedding: bool = False,
        cache_size: int = 8,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        patch = _as_patch_size(img_size)
        blocks = list(blocks)
        if len(blocks) < 4:
            raise ValueError(f"blocks: the encoder needs at least 4 blocks for four feature levels, got {len(blocks)}.")
        window = blocks[0].window_size
        grid, resized = self._token_grid(patch, tokenizer.resized[0], window, tokenizer.patch)
        if grid != tokenizer.grid or resized != tokenizer.resized or any(b.grid != grid for b in blocks):
            raise ValueError(
                f"img_size {list(patch)} gives a {list(grid)} token grid (patch resized to {list(resized)}); "
                f"the tokenizer was built for {list(tokenizer.grid)} (resized to {list(tokenizer.resized)}) and the "
                f"blocks for {sorted({b.grid for b in blocks})}."
            )
        self._init_options(
            patch,
            grid,
            necks,
            decoder,
            prompt_encoders,
            in_channels=in_channels,
            max_points=max_points,
            no_positive=no_positive,
            background_logit=background_logit,
            use_checkpoint=use_checkpoint,
            cache_image_embedding=cache_image_embedding,
            cache_size=cache_size,
            variant=variant,
        )
        self.window_size = window
        self.tokenizer = tokenizer
        self.blocks = nn.ModuleList(blocks)
        depth = len(blocks)
        self.taps = [depth * k // 4 for k in (1, 2, 3, 4)]
        self._init_heads(necks, decoder, prompt_encoders)

    def _init_options(
        self,
        patch: tuple[int, int, int],
        grid: tuple[int, int, int],
        necks: Mapping[int, Neck3D],
        decoder: MultiLevelDecoder3D,
        prompt_encoders: Mapping[int, PromptEncoder3D] | None,
        *,
        in_channels: int,
        max_points: int,
        no_positive: str,
        background_logit: float,
        use_checkpoint: bool,
        cache_image_embedding: bool,
        cache_size: int,
        variant: str | None,
    ) -> None:
        """Check the levels and options shared by every encoder and set them as attributes (no modules)."""
        _check_in_channels(in_channels)
        _check_click_options(max_points, no_positive)
        decoded = sorted(int(k) for k in necks)
        levels = sorted(int(k) for k in (prompt_encoders or {}))
        if not decoded or any(k not in (1, 2, 3, 4) for k in decoded) or len(decoded) != decoder.num_levels:
            raise ValueError(
                f"necks must map distinct levels 1-4 to necks, one per decoder level ({decoder.num_levels}), "
                f"got levels {decoded}."
            )
        if any(k not in decoded for k in levels):
            raise ValueError(f"prompt_encoders levels {levels} must be among the necks' levels {decoded}.")
        modes = {pe.encoding for pe in (prompt_encoders or {}).values()}
        if len(modes) > 1:
            raise ValueError(f"prompt_encoders must share one encoding, got {sorted(modes)}.")

        self.patch_size = patch
        self.variant = variant
        self.num_classes = decoder.num_classes
        self.in_channels = in_channels
        self.prompt_mode = modes.pop() if modes else "none"
        self.prompt_levels = levels
        self.decoded_levels = decoded
        self.max_points = max_points
        self.no_positive = no_positive
        self.background_logit = float(background_logit)
        self.grid = grid
        self.use_checkpoint = bool(use_checkpoint)
        self.cache_image_embedding = bool(cache_image_embedding)
        self._cache_size = cache_size

    def _init_heads(
        self,
        necks: Mapping[int, Neck3D],
        decoder: MultiLevelDecoder3D,
        prompt_encoders: Mapping[int, PromptEncoder3D] | None,
    ) -> None:
        """Register the necks, prompt encoders and decoder (after the encoder: parameter order) and the cache."""
        self.necks = nn.ModuleDict({str(k): necks[_key(necks, k)] for k in self.decoded_levels})
        self.prompt_encoders = nn.ModuleDict(
            {str(k): prompt_encoders[_key(prompt_encoders, k)] for k in self.prompt_levels}
        )
        self.decoder = decoder
        self._embeddings = EmbeddingCache(self._cache_size, self)

    def set_trainable(self, full_finetune: bool = False, peft_patterns: Sequence[str] = ()) -> int:
        """Set which parameters train, as the official code: slice/depth embeddings, block norms, adapters,
        depth rel-pos tables, necks, prompt encoder(s) and decoder; SAM's weights stay frozen.

        For ViT-B at the builder's defaults that is exactly 25,462,400 parameters (the poster's 25.46M),
        22,298,240 without prompt encoder (automatic mode; the poster lists the encoder's 15,209,984 = 15.21M).

        Args:
            full_finetune: train every parameter instead (poster comparison "Full fine-tuning"; also what a
                ``tiny`` model without pretrained weights needs).
            peft_patterns: globs of the parameters of another ``peft`` setting injected into the blocks
                (:func:`shared_nets.peft.apply_peft`), trained as well. The adapters' glob is left out when
                the blocks have no adapters.

        Returns:
            The number of trainable parameter values.
        """
        if full_finetune:
            for p in self.parameters():
                p.requires_grad_(True)
            return sum(p.numel() for p in self.parameters())
        patterns = list(SAM3D_TRAINABLE_PATTERNS) + (["prompt_encoders.*"] if self.prompt_levels else [])
        if all(getattr(blk, "adapter", None) is None for blk in self.blocks):
            patterns.remove("blocks.*.adapter.*")
        return freeze_except(self, patterns + list(peft_patterns))

    @staticmethod
    def _token_grid(
        patch: tuple[int, int, int], sam_input_size: int, ws: int, sam_patch: int = 16
    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Token grid and resized patch for ``patch``; ValueError when the tokeniser cannot take it."""
        step = sam_patch * ws
        if not isinstance(sam_input_size, int) or sam_input_size <= 0 or sam_input_size % step:
            raise ValueError(
                f"sam_input_size must be a positive multiple of {step} "
                f"({sam_patch}-pixel patches x {ws}-token windows), "
                f"got {sam_input_size!r}."
            )
        h, w, d = patch
        if h != w:
            raise ValueError(
                f"img_size {list(patch)}: the 3DSAM-adapter tokeniser needs H == W (SAM's square position "
                "embedding); the depth D may differ."
            )
        if (d * sam_input_size) % h or ((d * sam_input_size) // h) % step:
            raise ValueError(
                f"img_size {list(patch)}: the depth D is resized by sam_input_size / H = {sam_input_size}/{h} like "
                f"the in-plane axes and must then be a multiple of {step} "
                f"({sam_patch}-slice merging x {ws}-token windows); "
                f"use D = H or a D with D * {sam_input_size} / {h} divisible by {step}."
            )
        resized_d = d * sam_input_size // h
        grid = (sam_input_size // sam_patch, sam_input_size // sam_patch, resized_d // sam_patch)
        return grid, (sam_input_size, sam_input_size, resized_d)

    @property
    def prompted(self) -> bool:
        """Whether the network takes click guidance channels."""
        return self.prompt_mode != "none"

    @property
    def expected_channels(self) -> int:
        """Input channels: image channels plus 2 guidance channels when prompted."""
        return self.in_channels + (2 if self.prompted else 0)

    @property
    def cache_hits(self) -> int:
        """Forwards that reused cached image features (re-prompts of a patch already encoded)."""
        return self._embeddings.hits

    def clear_cache(self) -> None:
        """Drop the cached image features."""
        self._embeddings.clear()

    def _cached(self, image: torch.Tensor) -> dict | None:
        """The cache entry of ``image`` (features computed on a miss), or None when not caching."""
        if not self.cache_image_embedding or self.training:
            return None
        return self._embeddings.lookup(image, None, lambda: self._encode(image))

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Image features per decoded level (cached as ``cache_image_embedding`` says).

        Args:
            image: ``[B, in_channels, H, W, D]`` patch.

        Returns:
            One ``[B, C_neck, h, w, d]`` tensor per level in ``decoded_levels`` (shallow to deep).
        """
        entry = self._cached(image)
        return self._encode(image) if entry is None else list(entry["value"])

    def _encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        rgb = image.expand(-1, 3, -1, -1, -1) if image.shape[1] == 1 else image
        tokens = self.tokenizer(rgb)
        taps = [self.taps[k - 1] for k in self.decoded_levels]
        outs = run_blocks(self.blocks, tokens, taps, use_checkpoint=self.use_checkpoint and self.training)
        return [self.necks[str(k)](o.permute(0, 4, 1, 2, 3)) for k, o in zip(self.decoded_levels, outs)]

    def _check_points(self, coords: torch.Tensor, labels: torch.Tensor, batch: int) -> None:
        if coords.ndim != 3 or coords.shape[-1] != 3 or labels.shape != coords.shape[:2] or coords.shape[0] != batch:
            raise ValueError(
                f"points must be coords [B, P, 3] and labels [B, P] with B = {batch}, got coords "
                f"{tuple(coords.shape)} and labels {tuple(labels.shape)}."
            )
        for b in range(batch):
            if not bool((labels[b] == 1).any()) and (self.no_positive == "error" or not bool((labels[b] == 0).any())):
                raise ValueError(
                    f"batch item {b} has no positive click: 3DSAM-adapter needs at least one positive point "
                    "(guidance channel 'foreground') inside every patch it segments."
                )
        valid = labels >= 0
        pts = coords[valid]
        upper = torch.as_tensor(self.patch_size, dtype=pts.dtype, device=pts.device) - 1
        outside = (pts < 0).any(-1) | (pts > upper).any(-1)
        if bool(outside.any()):
            raise ValueError(
                f"point {pts[outside][0].tolist()} lies outside the patch of size {list(self.patch_size)}; "
                "clicks must be voxel indices (i, j, k) inside the patch."
            )

    def forward_points(
        self, image: torch.Tensor, coords: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Segment a patch given clicks as coordinates.

        Args:
            image: ``[B, in_channels, H, W, D]`` patch of size ``img_size``.
            coords: ``[B, P, 3]`` click voxel indices ``(i, j, k)`` in the patch (prompted mode).
            labels: ``[B, P]`` 1 positive, 0 negative, -1 padding.

        Returns:
            ``[B, K, H, W, D]`` logits.
        """
        self._check_image(image, self.in_channels)
        if self.prompted:
            if coords is None or labels is None:
                raise ValueError("this 3DSAM-adapter is prompted: pass coords [B, P, 3] and labels [B, P].")
            # While exporting (torch.export / ONNX) the per-item Python checks and the negative-only
            # branch are data-dependent and skipped: an exported network needs a positive click per patch.
            exporting = torch.compiler.is_exporting()
            if not exporting:
                self._check_points(coords, labels, image.shape[0])
            has_pos = (labels == 1).any(1)
            if self.no_positive == "background" and not exporting and not bool(has_pos.all()):  # negative-only
                out = image.new_full((image.shape[0], self.num_classes, *self.patch_size), -self.background_logit)
                out[:, 0] = self.background_logit
                if bool(has_pos.any()):
                    out[has_pos] = self.forward_points(image[has_pos], coords[has_pos], labels[has_pos]).to(out.dtype)
                return out
        entry = self._cached(image)
        feats = self._encode(image) if entry is None else list(entry["value"])
        prompted = [self.decoded_levels.index(k) for k in self.prompt_levels]
        for i, k in zip(prompted, self.prompt_levels):
            feats[i] = self.prompt_encoders[str(k)](feats[i], coords, labels, self.patch_size)
        if entry is None or not prompted:
            return self.decoder(feats, image[:, :1], self.patch_size)
        static = entry["extra"].get("decoder")
        if static is None:  # once per patch: the decoder's share of the unprompted levels and the image
            static = entry["extra"]["decoder"] = self.decoder.static_part(feats, image[:, :1], prompted)
        return self.decoder.forward_with_static(feats, static, prompted, self.patch_size)

    def _check_image(self, x: torch.Tensor, channels: int) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"input must be a 5D tensor [B, C, H, W, D], got {shape}.")
        if x.shape[1] != channels:
            layout = "[image, positive clicks, negative clicks]" if self.prompted else "[image]"
            raise ValueError(
                f"input has {x.shape[1]} channels, expected {channels} "
                f"({layout} with {self.in_channels} image channel(s))."
            )
        if tuple(x.shape[2:]) != self.patch_size:
            raise ValueError(
                f"input patch is {list(x.shape[2:])}, the network was built for img_size {list(self.patch_size)}; "
                "crop or resize to that patch (inference uses a window of this size)."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment.

        Args:
            x: ``[B, C, H, W, D]``: ``in_channels`` image channels, then (prompted) positive and
                negative click channels (one voxel per click).

        Returns:
            ``[B, num_classes, H, W, D]`` logits.
        """
        self._check_image(x, self.expected_channels)
        image = x[:, : self.in_channels]
        if not self.prompted:
            return self.forward_points(image)
        coords, labels = decode_points(x[:, self.in_channels : self.in_channels + 2], self.max_points)
        return self.forward_points(image, coords, labels)
