"""3DSAM-adapter: SAM turned fully volumetric for point-prompted (or automatic) 3D segmentation.

Paper: Gong et al., "3DSAM-adapter: Holistic adaptation of SAM from 2D to 3D for promptable tumor
segmentation" (arXiv 2306.13465); official code med-air/3DSAM-adapter, read for facts only. Where this
implementation follows the code rather than the paper, docs/deviations.md says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shared_nets.peft import freeze_except
from shared_nets.prompts import decode_points
from shared_nets.sam import build_sam, get_variant
from shared_nets.sam.cache import EmbeddingCache

from .encoder import Block3D, Neck3D, SpatialAdapter3D, VolumeTokenizer, run_blocks
from .heads import PROMPT_ENCODINGS, PROMPT_LAYERS, MultiLevelDecoder3D, PromptEncoder3D

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


class SAM3DAdapter(nn.Module):
    """3DSAM-adapter network: ``(B, C, H, W, D)`` patch (+ click guidance) -> ``(B, K, H, W, D)`` logits.

    Architecture (poster sections in brackets; details from the official code):

    - [Adapting Image Encoder for Volumetric Inputs] the patch is resized so SAM's frozen 16x16
      patch embedding, run on every axial slice, gives a ``sam_input_size / 16`` in-plane grid
      (512 -> 32 for ViT-B); a trainable depthwise Conv3d along the slices reaches the same
      step in depth (a 128^3 patch gives 32^3 tokens). SAM's position embedding, built at twice
      the grid, is average-pooled 2x2, plus a learnable depth embedding. Every block runs 3D
      window attention (``window_size``^3 windows, shifted by half a window on even blocks) with
      a depth relative-position table initialised from SAM's h/w tables, and starts with a
      :class:`SpatialAdapter3D`. Necks after blocks depth/4, depth/2, 3depth/4, depth (3, 6, 9, 12
      for ViT-B) give four feature levels.
    - [Prompt Encoding by Visual Sampler] a :class:`PromptEncoder3D` at each level of
      ``prompt_levels`` (the poster's best: the bottleneck only).
    - [Lightweight Mask Decoder] :class:`MultiLevelDecoder3D` over the levels and the image.

    Trainable by default (as the official code): slice/depth embeddings, block norms, adapters,
    depth rel-pos tables, necks, prompt encoder(s), decoder: exactly 25,462,400 parameters for
    ViT-B at the default settings (the poster's 25.46M), 22,298,240 without prompt encoder
    (automatic mode; the poster lists the encoder's 15,209,984 = 15.21M).

    Input channels are ``[image (in_channels), positive clicks, negative clicks]`` (guidance as
    in docs/architecture.md; clicks are decoded with :func:`shared_nets.prompts.decode_points`),
    or the image alone with ``prompt_encoder="none"``. A grey image is repeated to SAM's three
    channels. Intensity normalisation is the bundle's transform.

    Deliberate differences from the official code (each a switch where both are useful):
    adapters zero-initialised and without the trailing ReLU (``adapter_final_relu``,
    ``adapter_zero_init``), depth embedding zero-initialised (``depth_embed_init``),
    slice-merging conv initialised as the mean (``slice_embed_init``), prompt layers that use
    SAM's full two-way attention (``prompt_layer``), only the prompt encoders in use are built
    (the official script builds four and uses one), necks every depth/4 blocks for any backbone
    (the official loop hard-codes 12 blocks), shifted-window masks not stored in checkpoints.

    Args:
        variant: SAM backbone ``vit_b`` (the paper), ``vit_l``, ``vit_h`` or ``tiny`` (``lite``, LiteMedSAM's
            TinyViT, has no plain-ViT patch embedding or blocks to make 3D: ``ValueError``).
        checkpoint: official SAM ``.pth`` (loaded strictly before the 3D parts are added), or None.
        img_size: input patch ``H = W = D`` (int) or ``[H, W, D]`` with ``H == W``; the
            tokeniser needs each side times ``sam_input_size / H`` to be a multiple of
            ``patch_size * window_size``.
        num_classes: output channels ``K`` incl. background (2: background, object).
        in_channels: image channels, 1 (grey, repeated) or 3.
        sam_input_size: in-plane side the patch is resized to before SAM's patch embedding
            (512 in the official code, for its 128^3 prompted and 256^3 automatic patches).
        patch_size: SAM's patch size (16; 8 gives ``tiny`` CPU demos a finer grid at a quarter of
            the cost, only without a checkpoint). Slices are merged in groups of the same size.
        window_size: 3D attention window in tokens; None = 8 (4 for ``tiny``).
        adapter_dim: adapter bottleneck width; None = embed_dim // 2 (384 for ViT-B).
        decoder_channels: width of the decoder's level heads; None = neck width // 2 (128).
        prompt_encoder: ``"visual_sampler"`` (the method), ``"positional_encoding"`` (poster
            ablation) or ``"none"`` (automatic segmentation, poster Table 2).
        prompt_levels: feature levels 1-4 where the prompt enters (poster ablation "Feature
            Level"; default ``[4]``, the bottleneck).
        prompt_layer: ``"two_way"`` (SAM's two-way attention) or ``"official"`` (the released
            layer, which skips the tokens-to-image attention).
        num_global_queries: learnable global queries per prompt layer (10).
        use_point_labels: let the visual sampler tell positive from negative clicks (a learned
            label embedding; the method ignores click labels).
        max_points: clicks decoded per patch (positives first; see ``decode_points``).
        no_positive: a patch without a positive click raises ``ValueError`` (``"error"``) or,
            if it holds negative clicks, is predicted as background (``"background"``: for
            sliding-window inference where a window may catch only negative clicks) or segmented
            from its negative clicks alone (``"run"``: what the official training does for crops
            without tumour, where only its random points are given). A patch without any click
            always raises.
        background_logit: channel-0 logit written for such background patches (others get its
            negative).
        use_multi_level: aggregate all four levels in the decoder (poster ablation "multi-layer
            aggregation"); False decodes the bottleneck only.
        full_finetune: train every parameter (poster comparison "Full fine-tuning"; also what a
            ``tiny`` model without pretrained weights needs).
        adapter_final_relu: ReLU after the adapter's up-projection, as the official code.
        adapter_zero_init: zero-initialise adapter up-projections (identity at start); None =
            True unless ``adapter_final_relu``.
        depth_embed_init: ``"zeros"`` or ``"ones"`` (official).
        slice_embed_init: ``"mean"`` or ``"default"`` (official: PyTorch's initialisation).
        use_checkpoint: gradient checkpointing of the transformer blocks (memory for 128^3 ViT-B).
        cache_image_embedding: in eval mode without gradients, reuse the image features when
            the same patch comes again with new clicks (interactive refinement); the decoder's
            prompt-independent part (heads of the levels without a prompt, the image channel
            and their share of the classifier's first convolution) is cached with them, so a
            re-prompt runs only the prompt encoder and the prompted level's decoder path.
        cache_size: patches kept in that cache (the windows of one volume).
    """

    def __init__(
        self,
        variant: str = "vit_b",
        checkpoint: str | None = None,
        img_size: int | Sequence[int] = 128,
        num_classes: int = 2,
        in_channels: int = 1,
        *,
        sam_input_size: int = 512,
        patch_size: int = 16,
        window_size: int | None = None,
        adapter_dim: int | None = None,
        decoder_channels: int | None = None,
        prompt_encoder: str = "visual_sampler",
        prompt_levels: Sequence[int] = (4,),
        prompt_layer: str = "two_way",
        num_global_queries: int = 10,
        use_point_labels: bool = False,
        max_points: int = 64,
        no_positive: str = "error",
        background_logit: float = 10.0,
        use_multi_level: bool = True,
        full_finetune: bool = False,
        adapter_final_relu: bool = False,
        adapter_zero_init: bool | None = None,
        depth_embed_init: str = "zeros",
        slice_embed_init: str = "mean",
        use_checkpoint: bool = False,
        cache_image_embedding: bool = False,
        cache_size: int = 8,
    ) -> None:
        super().__init__()
        v = get_variant(variant)
        if v.encoder != "vit":
            # The method turns a plain ViT into a 3D one: its patch embedding tokenises 16^3 cubes, every
            # block runs 3D window attention with a learned depth position table, and four necks tap
            # blocks of one width. LiteMedSAM's TinyViT has none of that to adapt: convolutional stages
            # at full resolution, windows with per-offset 2D biases, three stage widths on two grids.
            raise ValueError(
                f"variant {v.name!r} is not supported by SAM3DAdapter: 3DSAM-adapter adapts a plain ViT's patch "
                "embedding and blocks to 3D (cube tokens, 3D window attention, depth positions); LiteMedSAM's "
                "TinyViT has convolutional stages and 2D per-window biases instead. Use vit_b/vit_l/vit_h/tiny, "
                "or a 2D method at lite (ma_sam, med_sa, s_sam, h_sam)."
            )
        self.patch_size = _as_patch_size(img_size)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grey, repeated to RGB) or 3, got {in_channels!r}.")
        if prompt_encoder not in PROMPT_ENCODER_MODES:
            raise ValueError(f"prompt_encoder must be one of {PROMPT_ENCODER_MODES}, got {prompt_encoder!r}.")
        if prompt_layer not in PROMPT_LAYERS:
            raise ValueError(f"prompt_layer must be one of {PROMPT_LAYERS}, got {prompt_layer!r}.")
        if not isinstance(max_points, int) or max_points < 1:
            raise ValueError(f"max_points must be a positive integer, got {max_points!r}.")
        if no_positive not in NO_POSITIVE_MODES:
            raise ValueError(f"no_positive must be one of {NO_POSITIVE_MODES}, got {no_positive!r}.")
        ws = (4 if v.name == "tiny" else 8) if window_size is None else window_size
        if not isinstance(ws, int) or ws < 1:
            raise ValueError(f"window_size must be a positive integer, got {window_size!r}.")
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
        grid, resized = self._token_grid(self.patch_size, sam_input_size, ws, patch_size)

        levels = sorted({int(x) for x in prompt_levels}) if prompt_encoder != "none" else []
        if prompt_encoder != "none" and (not levels or any(x not in (1, 2, 3, 4) for x in levels)):
            raise ValueError(f"prompt_levels must be a non-empty list of levels 1-4, got {list(prompt_levels)!r}.")
        decoded = [1, 2, 3, 4] if use_multi_level else [4]
        if any(x not in decoded for x in levels):
            raise ValueError(
                f"prompt_levels {levels} include levels the decoder does not use "
                "(use_multi_level=False decodes level 4 only)."
            )
        if v.encoder_depth < 4:
            raise ValueError(
                f"the encoder needs at least 4 blocks for four feature levels, {v.name} has {v.encoder_depth}."
            )

        self.variant = v.name
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.prompt_mode = prompt_encoder
        self.prompt_levels = levels
        self.decoded_levels = decoded
        self.max_points = max_points
        self.no_positive = no_positive
        self.background_logit = float(background_logit)
        self.grid = grid
        self.window_size = ws
        self.use_checkpoint = bool(use_checkpoint)
        self.cache_image_embedding = bool(cache_image_embedding)
        self._cache_size = cache_size

        # SAM first (official weights loaded strictly at twice the token grid: 1024 for a 32^2
        # grid, i.e. no resizing for ViT-B at the defaults), then the 3D parts around its pieces.
        sam = build_sam(v, checkpoint, img_size=2 * sam_input_size, patch_size=patch_size)
        enc = sam.image_encoder
        dim, out_dim = v.encoder_embed_dim, v.prompt_embed_dim
        self.tokenizer = VolumeTokenizer(
            enc.patch_embed,
            enc.pos_embed,
            grid,
            resized,
            depth_embed_init=depth_embed_init,
            slice_embed_init=slice_embed_init,
        )
        zero_init = (not adapter_final_relu) if adapter_zero_init is None else bool(adapter_zero_init)
        hidden = dim // 2 if adapter_dim is None else adapter_dim
        shift = ws // 2 if min(grid) > ws else 0  # one window per axis: nothing to shift
        self.blocks = nn.ModuleList(
            Block3D(
                blk,
                grid,
                ws,
                shift=shift if i % 2 == 0 else 0,
                adapter=SpatialAdapter3D(dim, hidden, final_relu=adapter_final_relu, zero_init=zero_init),
            )
            for i, blk in enumerate(enc.blocks)
        )
        depth = v.encoder_depth
        self.taps = [depth * k // 4 for k in (1, 2, 3, 4)]
        self.necks = nn.ModuleDict({str(k): Neck3D(dim, out_dim) for k in decoded})
        self.prompt_encoders = nn.ModuleDict(
            {
                str(k): PromptEncoder3D(
                    out_dim,
                    v.decoder_num_heads,
                    v.decoder_mlp_dim,
                    depth=2,
                    num_global_queries=num_global_queries,
                    encoding=prompt_encoder,
                    layer=prompt_layer,
                    use_point_labels=use_point_labels,
                )
                for k in levels
            }
        )
        ch = out_dim // 2 if decoder_channels is None else decoder_channels
        if not isinstance(ch, int) or ch < 1:
            raise ValueError(f"decoder_channels must be a positive integer, got {decoder_channels!r}.")
        self.decoder = MultiLevelDecoder3D(out_dim, ch, num_classes, num_levels=len(decoded), image_channels=1)
        self._embeddings = EmbeddingCache(cache_size, self)
        del sam, enc  # SAM's 2D neck, prompt encoder and mask decoder are not used

        if full_finetune:
            for p in self.parameters():
                p.requires_grad_(True)
        else:
            patterns = list(SAM3D_TRAINABLE_PATTERNS) + (["prompt_encoders.*"] if levels else [])
            freeze_except(self, patterns)

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
            self._check_points(coords, labels, image.shape[0])
            has_pos = (labels == 1).any(1)
            if self.no_positive == "background" and not bool(has_pos.all()):  # negative-only patches
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
