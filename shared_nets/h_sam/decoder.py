"""H-SAM's hierarchical mask decoder parts (Cheng et al., CVPR 2024, sec. 3.1-3.4).

Stage 1 is SAM's own ``MaskDecoder`` (SAMed-style, one mask token per class); :func:`decode_stage1`
runs it and also returns the two intermediate tensors stage 2 needs. Stage 2
(:class:`HSAMStage2Decoder`) is a second two-way transformer decoder guided by the stage-1
probabilities through CMAttn (:class:`CMAttn`, sec. 3.2) and learnable mask cross-attention
(:class:`MaskGuidedAttention`, sec. 3.3), followed by the hierarchical pixel decoder (sec. 3.4).

All layers are built from ``segment_anything.modeling`` pieces (``Attention``, ``MLPBlock``,
``LayerNorm2d``, the hypernetwork ``MLP``); only the mask-guided forward passes are ours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from torch import nn

__all__ = [
    "MASK_ATTENTION_MODES",
    "CMAttn",
    "HSAMStage2Decoder",
    "MaskGuidedAttention",
    "MaskGuidedTwoWayTransformer",
    "class_balanced_noise_var",
    "decode_stage1",
    "run_two_way_transformer",
]

#: ``learnable``: paper eq. 3, ``M ⊙ softmax(QKᵀ)``; ``binary``: Mask2Former's ``softmax(t(M) + QKᵀ)``
#: (the paper's "original mask-attention", Table 5); ``none``: plain cross-attention.
MASK_ATTENTION_MODES = ("learnable", "binary", "none")


def _largest_divisor(n: int, at_most: int = 8) -> int:
    """Largest divisor of ``n`` not above ``at_most`` (CMAttn heads: 8 at 32² tokens, 7 at 14², as released)."""
    return max(d for d in range(1, at_most + 1) if n % d == 0)


def class_balanced_noise_var(frequencies: Sequence[float], max_var: float = 0.1) -> list[float]:
    """Per-class CMAttn noise variances inversely proportional to class frequency (sec. 3.2, eq. 1).

    The paper computes this list offline from the training labels; the rarest class gets
    ``max_var`` and a class ``f`` times as frequent gets ``max_var / f``. Absent classes
    (frequency 0) get 0.

    Args:
        frequencies: voxel (or slice) count or share of each class, background first.
        max_var: variance of the rarest present class.

    Returns:
        One variance per class, JSON-friendly (paste it into ``cmattn_noise_var``).
    """
    freqs = [float(f) for f in frequencies]
    if not freqs or any(f < 0 or not math.isfinite(f) for f in freqs) or not any(f > 0 for f in freqs):
        raise ValueError(
            f"frequencies must be non-negative finite numbers with at least one > 0, got {list(frequencies)!r}."
        )
    if not max_var >= 0:
        raise ValueError(f"max_var must be >= 0, got {max_var!r}.")
    f_min = min(f for f in freqs if f > 0)
    return [max_var * f_min / f if f > 0 else 0.0 for f in freqs]


# ----------------------------------------------------------------------------------------------
# two-way transformer with either attention order (stage 1 and stage 2)
# ----------------------------------------------------------------------------------------------


def _block_forward(
    block: nn.Module,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
    mask: torch.Tensor | None = None,
    cross_first: bool = False,
    dropout: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SAM two-way block (self-attn, token→image, MLP, image→token), optionally mask-guided.

    ``cross_first`` swaps the first two steps as the released H-SAM code does in both of its
    decoders (its modified ``TwoWayAttentionBlock``); SAM and the paper run self-attention first.
    In the first block SAM's self-attention has no residual and no positional encoding; the
    released order keeps that rule, so there the self-attention output replaces the queries.

    Args:
        block: a ``TwoWayAttentionBlock`` (stock or :class:`MaskGuidedTwoWayTransformer`'s).
        queries: tokens ``[B, T, C]``.
        keys: image tokens ``[B, N, C]``.
        query_pe: token positional embedding ``[B, T, C]``.
        key_pe: image positional encoding ``[B, N, C]``.
        mask: stage-1 probabilities ``[B, T, N]`` for the mask-guided cross-attentions, or None.
        cross_first: released attention order.
        dropout: applied to the token→image attention output (stage 2 only).

    Returns:
        Updated ``(queries [B, T, C], keys [B, N, C])``.
    """
    kw_ti = {} if mask is None else {"mask": mask}
    kw_it = {} if mask is None else {"mask": mask.transpose(1, 2)}

    def self_attention(qs: torch.Tensor) -> torch.Tensor:
        if block.skip_first_layer_pe:
            qs = block.self_attn(q=qs, k=qs, v=qs)
        else:
            q = qs + query_pe
            qs = qs + block.self_attn(q=q, k=q, v=qs)
        return block.norm1(qs)

    def token_to_image(qs: torch.Tensor) -> torch.Tensor:
        out = block.cross_attn_token_to_image(q=qs + query_pe, k=keys + key_pe, v=keys, **kw_ti)
        if dropout is not None:
            out = dropout(out)
        return block.norm2(qs + out)

    if cross_first:
        queries = self_attention(token_to_image(queries))
    else:
        queries = token_to_image(self_attention(queries))
    queries = block.norm3(queries + block.mlp(queries))
    out = block.cross_attn_image_to_token(q=keys + key_pe, k=queries + query_pe, v=queries, **kw_it)
    keys = block.norm4(keys + out)
    return queries, keys


def run_two_way_transformer(
    transformer: nn.Module,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor | None = None,
    cross_first: bool = False,
    dropout: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a SAM-style two-way transformer (SAM sec. 3 "mask decoder"; H-SAM sec. 3.1).

    Equivalent to ``segment_anything``'s ``TwoWayTransformer.forward`` when ``mask`` is None
    and ``cross_first`` is False (tested).

    Args:
        transformer: a ``TwoWayTransformer`` or :class:`MaskGuidedTwoWayTransformer`.
        image_embedding: ``[B, C, h, w]``.
        image_pe: ``[B or 1, C, h, w]``.
        tokens: output tokens ``[B, T, C]``.
        mask: stage-1 probabilities ``[B, T, h*w]`` (stage 2 only).
        cross_first: released H-SAM attention order.
        dropout: dropout on the token→image attention output.

    Returns:
        ``(tokens [B, T, C], image tokens [B, h*w, C])``.
    """
    b = image_embedding.shape[0]
    keys = image_embedding.flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2).expand(b, -1, -1)
    queries = tokens
    for layer in transformer.layers:
        queries, keys = _block_forward(layer, queries, keys, tokens, key_pe, mask, cross_first, dropout)
    out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    queries = transformer.norm_final_attn(queries + out)
    return queries, keys


def decode_stage1(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    dense_embeddings: torch.Tensor,
    cross_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage-1 decoding with SAM's own (SAMed-style multi-class) mask decoder (sec. 3.1).

    Prompt-free: the tokens are the IoU token and the ``T`` mask tokens (one per class); the
    dense embedding is the prompt encoder's trained default (``no_mask_embed``).

    Args:
        decoder: ``segment_anything`` ``MaskDecoder`` with ``T`` mask tokens.
        image_embeddings: ``[B, C, h, w]``.
        image_pe: ``[1, C, h, w]``.
        dense_embeddings: ``[1 or B, C, h, w]``.
        cross_first: released H-SAM attention order.

    Returns:
        ``logits [B, T, 4h, 4w]`` (SAM's low-resolution masks, H/4 for patch 16);
        ``mask_feature [B, T, h*w]``, the mask tokens times the transformer's image tokens
        before any upsampling (the CMAttn input, sec. 3.2);
        ``upscaled [B, C/8, 4h, 4w]``, the pixel-decoder features stage 2 skip-connects (sec. 3.4).
    """
    b, c, h, w = image_embeddings.shape
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = tokens.unsqueeze(0).expand(b, -1, -1)
    src = image_embeddings + dense_embeddings
    hs, keys = run_two_way_transformer(decoder.transformer, src, image_pe, tokens, cross_first=cross_first)
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens]
    mask_feature = mask_tokens_out @ keys.transpose(1, 2)
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    logits = (hyper @ upscaled.flatten(2)).view(b, -1, *upscaled.shape[-2:])
    return logits, mask_feature, upscaled


# ----------------------------------------------------------------------------------------------
# stage 2
# ----------------------------------------------------------------------------------------------


class MaskGuidedAttention(Attention):
    """SAM's ``Attention`` whose attention map is modulated by a probability mask (sec. 3.3).

    ``learnable`` (eq. 3): ``out = (M ⊙ softmax(QKᵀ/√d)) V``: the mask is used as is, so
    gradients reach stage 1 through it. ``binary`` (Mask2Former, eq. 2): ``softmax(t(M) + QKᵀ/√d) V``
    with ``t`` mapping the arg-max one-hot mask ``{0, 1}`` to ``{-inf, 0}``; a query whose row
    would be fully masked attends everywhere (Mask2Former's guard). ``none``: plain attention.

    Args:
        embedding_dim: token width ``C``.
        num_heads: attention heads.
        downsample_rate: internal width ``C / downsample_rate`` (SAM uses 2 in cross-attention;
            the released stage 2 uses 1, which we follow).
        mode: one of :data:`MASK_ATTENTION_MODES`.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, mode: str = "learnable") -> None:
        super().__init__(embedding_dim, num_heads, downsample_rate)
        if mode not in MASK_ATTENTION_MODES:
            raise ValueError(f"mask_attention must be one of {MASK_ATTENTION_MODES}, got {mode!r}.")
        self.mode = mode

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend ``q [B, Nq, C]`` to ``k, v [B, Nk, C]``; ``mask [B, Nq, Nk]`` in ``[0, 1]`` or None."""
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is None or self.mode == "none":
            attn = logits.softmax(-1)
        elif self.mode == "learnable":
            attn = logits.softmax(-1) * mask.unsqueeze(1)
        else:
            # one-hot of the most probable class along the token axis, whichever side the tokens are on
            tok_axis = 1 if mask.shape[1] < mask.shape[2] else 2
            hard = F.one_hot(mask.argmax(tok_axis), mask.shape[tok_axis]).to(torch.bool)
            hard = hard.transpose(1, 2) if tok_axis == 1 else hard
            hard = hard | ~hard.any(-1, keepdim=True)  # fully masked rows attend everywhere
            attn = logits.masked_fill(~hard.unsqueeze(1), float("-inf")).softmax(-1)
        return self.out_proj(self._recombine_heads(attn @ v))


class _MaskGuidedBlock(TwoWayAttentionBlock):
    """``TwoWayAttentionBlock`` whose two cross-attentions are :class:`MaskGuidedAttention`."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool, mode: str) -> None:
        super().__init__(embedding_dim, num_heads, mlp_dim, activation=nn.ReLU, skip_first_layer_pe=skip_first_layer_pe)
        self.cross_attn_token_to_image = MaskGuidedAttention(embedding_dim, num_heads, 1, mode)
        self.cross_attn_image_to_token = MaskGuidedAttention(embedding_dim, num_heads, 1, mode)


class MaskGuidedTwoWayTransformer(TwoWayTransformer):
    """Stage-2 transformer decoder: SAM's two-way transformer with mask-guided cross-attention (sec. 3.3).

    Run it through :func:`run_two_way_transformer` with the stage-1 mask. As in the released
    code, the block cross-attentions keep the full width (downsample rate 1) and the final
    token→image attention is SAM's unmasked one.

    Args:
        depth: number of two-way blocks (2, as SAM).
        embedding_dim: token width ``C``.
        num_heads: attention heads.
        mlp_dim: MLP width.
        mask_attention: one of :data:`MASK_ATTENTION_MODES`.
    """

    def __init__(
        self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, mask_attention: str = "learnable"
    ) -> None:
        super().__init__(depth, embedding_dim, num_heads, mlp_dim)
        self.layers = nn.ModuleList(
            _MaskGuidedBlock(embedding_dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0), mode=mask_attention)
            for i in range(depth)
        )


class CMAttn(nn.Module):
    """Class-balanced mask-guided self-attention (sec. 3.2, Fig. 3).

    The stage-1 mask feature ``P [B, T, h*w]`` (one token per class, the token's feature is
    its ``h*w`` map) is normalised over classes, perturbed during training by Gaussian noise
    ``N(0, var(i))`` wherever the resized ground truth is class ``i`` (eq. 1), passed through
    self-attention (two attention layers, MLP and LayerNorms, as released), compressed over the
    class axis by a linear layer to one map ``g [B, 1, h, w]``, and applied to the image
    embedding as ``E + E ⊙ g`` (Hadamard product with a residual path).

    ``released=True`` reproduces the released code: ReLU and a softmax over the size-1 class
    axis make ``g ≡ 1``, i.e. ``E + E`` whatever the mask (a no-op up to a factor 2).

    Args:
        num_tokens: classes ``T`` (incl. background).
        grid: token grid ``(h, w)``; the attention width is ``h*w``.
        num_heads: heads; None picks the largest divisor of ``h*w`` up to 8 (released: 8 at 32², 7 at 14²).
        mlp_dim: MLP width (released: 2048).
        noise_var: per-class noise variances ``[T]``; None estimates them per batch as
            ``max_var · f_min / f_i`` from the batch's label frequencies.
        noise_max_var: variance of the rarest class when ``noise_var`` is None.
        released: the released (no-op) behaviour.
    """

    def __init__(
        self,
        num_tokens: int,
        grid: tuple[int, int],
        num_heads: int | None = None,
        mlp_dim: int = 2048,
        noise_var: Sequence[float] | None = None,
        noise_max_var: float = 0.1,
        released: bool = False,
    ) -> None:
        super().__init__()
        dim = grid[0] * grid[1]
        heads = _largest_divisor(dim) if num_heads is None else num_heads
        if dim % heads:
            raise ValueError(f"cmattn_num_heads must divide the token count h*w={dim}, got {heads}.")
        if noise_var is not None:
            noise_var = [float(v) for v in noise_var]
            if len(noise_var) != num_tokens or any(not v >= 0 for v in noise_var):
                raise ValueError(
                    f"cmattn_noise_var must list {num_tokens} non-negative variances (one per class incl. "
                    f"background), got {noise_var!r}."
                )
        if not noise_max_var >= 0:
            raise ValueError(f"cmattn_noise_max_var must be >= 0, got {noise_max_var!r}.")
        self.grid = tuple(grid)
        self.num_tokens = num_tokens
        self.released = released
        self.noise_max_var = float(noise_max_var)
        self.register_buffer("noise_var", None if noise_var is None else torch.tensor(noise_var), persistent=False)
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn2 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.compress = nn.Linear(num_tokens, 1)

    def _noise_std(self, label: torch.Tensor) -> torch.Tensor:
        """Per-voxel noise std ``[B, 1, h*w]`` from the label ``[B, h*w]`` (long)."""
        if self.noise_var is not None:
            var = self.noise_var.to(label.device)
        else:
            counts = torch.bincount(label.flatten(), minlength=self.num_tokens).float()
            present = counts > 0
            var = torch.where(present, self.noise_max_var * counts[present].min() / counts.clamp_min(1), 0.0)
        return var.sqrt()[label].unsqueeze(1)

    def forward(
        self, image_embedding: torch.Tensor, mask_feature: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Enhance ``image_embedding [B, C, h, w]`` with ``mask_feature [B, T, h*w]``.

        Args:
            image_embedding: the stage-2 input embedding.
            mask_feature: stage-1 mask feature (unnormalised logits at the token grid).
            label: ground truth at the token grid ``[B, h*w]`` (long), training only.

        Returns:
            ``[B, C, h, w]``.
        """
        b, _, h, w = image_embedding.shape
        p = mask_feature.softmax(1)
        if self.training and label is not None:
            p = p + torch.randn_like(p) * self._noise_std(label).to(p.dtype)
        x = self.norm1(self.self_attn(q=p, k=p, v=p))
        x = self.self_attn2(q=x, k=x, v=x)
        x = self.norm2(x + self.mlp(x))
        g = self.compress(x.transpose(1, 2)).transpose(1, 2).reshape(b, 1, h, w)
        if self.released:
            g = F.relu(g).softmax(1)  # size-1 axis: g == 1 (released behaviour)
        return image_embedding + image_embedding * g


class HSAMStage2Decoder(nn.Module):
    """H-SAM's second-stage mask decoder (sec. 3.1-3.4).

    Image embedding → CMAttn (sec. 3.2) → mask-guided two-way transformer with the stage-1
    probabilities (sec. 3.3) → pixel decoder: SAM's two ×2 transposed convolutions, concatenated
    with stage 1's upscaled features and upsampled by further ×2 stages (LayerNorm2d + GELU) to
    full resolution (hierarchical pixel decoder, sec. 3.4) → hypernetwork dot products.

    Args:
        transformer_dim: SAM's decoder width ``C`` (256; 32 for ``tiny``).
        num_tokens: classes ``T`` incl. background.
        grid: token grid ``(h, w)``.
        patch_size: encoder patch size (embedding stride); the hierarchical decoder upsamples
            ``log2(patch/4)`` times: none at LiteMedSAM's stride 4, where stage 1 already predicts at
            full resolution and the skip connection is a concatenation alone.
        depth: transformer blocks.
        num_heads: transformer heads.
        mlp_dim: transformer MLP width.
        mask_attention: one of :data:`MASK_ATTENTION_MODES`.
        use_cmattn: enable CMAttn.
        use_hierarchical_pixel_decoder: enable the skip-connected full-resolution pixel decoder;
            otherwise stage 2 predicts at ``4h × 4w`` like SAM.
        cross_first: released attention order.
        dropout: dropout on the token→image attention output (released: 0.2).
        cmattn_num_heads, cmattn_mlp_dim, cmattn_noise_var, cmattn_noise_max_var, released_cmattn:
            see :class:`CMAttn`.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        num_tokens: int,
        grid: tuple[int, int],
        patch_size: int = 16,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        mask_attention: str = "learnable",
        use_cmattn: bool = True,
        use_hierarchical_pixel_decoder: bool = True,
        cross_first: bool = False,
        dropout: float = 0.2,
        cmattn_num_heads: int | None = None,
        cmattn_mlp_dim: int = 2048,
        cmattn_noise_var: Sequence[float] | None = None,
        cmattn_noise_max_var: float = 0.1,
        released_cmattn: bool = False,
    ) -> None:
        super().__init__()
        c = transformer_dim
        n_up = int(round(math.log2(patch_size / 4))) if patch_size >= 4 else -1
        if n_up < 0 or 4 * 2**n_up != patch_size:
            raise ValueError(
                f"patch_size must be 4, 8, 16, 32, ... (4·2^n) for H-SAM's pixel decoders, got {patch_size}."
            )
        self.num_tokens = num_tokens
        self.grid = tuple(grid)
        self.mask_attention = mask_attention
        self.cross_first = cross_first
        self.use_hierarchical_pixel_decoder = use_hierarchical_pixel_decoder
        self.mask_tokens = nn.Embedding(num_tokens, c)
        self.transformer = MaskGuidedTwoWayTransformer(depth, c, num_heads, mlp_dim, mask_attention)
        self.dropout = nn.Dropout(dropout)
        self.cmattn = (
            CMAttn(
                num_tokens,
                grid,
                cmattn_num_heads,
                cmattn_mlp_dim,
                cmattn_noise_var,
                cmattn_noise_max_var,
                released_cmattn,
            )
            if use_cmattn
            else None
        )
        # SAM's pixel decoder (sec. 3.1): 4h x 4w, C/8 channels
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4),
            nn.GELU(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        if use_hierarchical_pixel_decoder:
            # sec. 3.4: concat with stage 1's C/8 features, then x2 stages halving the width to full
            # resolution (released: 256 -> 64+32 -> 32 -> 16). Floor of 8 channels so narrow test models
            # (tiny: C = 32) do not end in a rank-2 feature map; no effect for SAM's C = 256.
            layers: list[nn.Module] = []
            ch = c // 4
            for _ in range(n_up):
                out = max(ch // 2, 8)
                layers += [nn.ConvTranspose2d(ch, out, kernel_size=2, stride=2), LayerNorm2d(out), nn.GELU()]
                ch = out
            self.skip_connect = nn.Sequential(*layers)
            self.output_hypernetworks_mlps = nn.ModuleList(MLP(c, c, ch, 5) for _ in range(num_tokens))
        else:
            self.skip_connect = None
            self.output_hypernetworks_mlps = nn.ModuleList(MLP(c, c, c // 8, 3) for _ in range(num_tokens))

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense_embeddings: torch.Tensor,
        stage1_probs: torch.Tensor,
        mask_feature: torch.Tensor,
        stage1_upscaled: torch.Tensor,
        label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode stage 2.

        Args:
            image_embeddings: ``[B, C, h, w]``.
            image_pe: ``[1, C, h, w]``.
            dense_embeddings: ``[1 or B, C, h, w]`` (the trained default embedding).
            stage1_probs: stage-1 class probabilities at the token grid ``[B, T, h, w]`` (mask attention).
            mask_feature: stage-1 mask feature ``[B, T, h*w]`` (CMAttn).
            stage1_upscaled: stage-1 pixel-decoder features ``[B, C/8, 4h, 4w]`` (skip connection).
            label: ground truth at the token grid ``[B, h*w]`` (long) for CMAttn's noise, training only.

        Returns:
            Logits ``[B, T, H, W]`` at full resolution (``[B, T, 4h, 4w]`` without the
            hierarchical pixel decoder).
        """
        b, c, h, w = image_embeddings.shape
        src = image_embeddings
        if self.cmattn is not None:
            src = self.cmattn(src, mask_feature, label)
        src = src + dense_embeddings
        tokens = self.mask_tokens.weight.unsqueeze(0).expand(b, -1, -1)
        mask = None if self.mask_attention == "none" else stage1_probs.flatten(2)
        hs, keys = run_two_way_transformer(
            self.transformer, src, image_pe, tokens, mask=mask, cross_first=self.cross_first, dropout=self.dropout
        )
        up = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        if self.skip_connect is not None:
            up = self.skip_connect(torch.cat([up, stage1_upscaled], dim=1))
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        return (hyper @ up.flatten(2)).view(b, -1, *up.shape[-2:])
