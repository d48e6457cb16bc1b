"""Med-SA building blocks: adapted ViT blocks with SD-Trans, HyP-Adpt, adapted two-way decoder.

Paper: Wu et al., "Medical SAM Adapter" (arXiv 2304.12620), section "Med-SA architecture",
"SD-Trans" and "HyP-Adpt". The blocks *adopt* the sub-modules of SAM's own blocks
(``segment_anything.modeling.image_encoder.Block`` and ``transformer.TwoWayAttentionBlock``),
so parameter names stay SAM's (``blocks.0.attn.qkv.weight`` ...) and only the adapters are new.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from segment_anything.modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer
from torch import nn

from shared_nets.peft import BottleneckAdapter
from shared_nets.sam.tiny_vit import TinyViTBlock, WindowAttention

__all__ = [
    "PROMPT_FUSIONS",
    "adapter_width",
    "HyPAdapter",
    "MedSAEncoderBlock",
    "MedSATinyViTBlock",
    "depth_attention",
    "MedSADecoderBlock",
    "MedSATwoWayTransformer",
]

#: ways the first decoder adapter combines the prompt embedding (Table 3 ablation rows).
PROMPT_FUSIONS = ("hyper", "add", "concat", "none")

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}


def _check_act(act: str) -> None:
    if act not in _ACTS:
        raise ValueError(f"adapter_act must be one of {sorted(_ACTS)}, got {act!r}.")


def adapter_width(dim: int, ratio: float) -> int:
    """Bottleneck width ``max(1, round(dim * ratio))``; scales with the embedding width.

    Args:
        dim: token width of the adapted layer.
        ratio: width / dim, in ``(0, 1]``.
    """
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"adapter ratio must be a number in (0, 1], got {ratio!r}.")
    return max(1, round(dim * ratio))


class HyPAdapter(nn.Module):
    """Hyper-Prompting Adapter (paper section "HyP-Adpt", Eq. 1-2, Fig. 2).

    ``e_down = act(down(x))``; for each of ``num_layers`` layers an individual linear layer
    ``M_i`` projects the prompt embedding ``e_prompt [B, L]`` to ``hidden * hidden`` values,
    reshaped to a weight map ``W_i [B, hidden, hidden]`` and applied by matrix product:
    ``e_down <- ReLU(Norm(e_down @ W_i))`` with ``Norm`` a layer normalisation along the
    length (channel) dimension. ``up`` maps back to ``dim``. The paper's ``N`` (prompt rows)
    is read here as one prompt embedding per decoded image (our reading; the paper gives no
    code and the official repository does not contain HyP-Adpt).

    ``fusion`` selects the paper's Table 3 alternatives: ``"add"`` adds a projection of the
    prompt embedding to ``e_down``, ``"concat"`` concatenates it and projects back to the
    bottleneck width, ``"none"`` is a plain bottleneck adapter (``hyp_adapter: false``).

    Args:
        dim: token width ``C``.
        hidden_dim: bottleneck width.
        prompt_dim: width ``L`` of the prompt embedding.
        num_layers: hyper-prompting layers (3 in the paper).
        fusion: one of :data:`PROMPT_FUSIONS`.
        act: activation after the down projection (``relu`` paper, ``gelu``).
        skip: return ``x + adapter(x)`` (True) or ``adapter(x)``.
        zero_init: zero-initialise ``up`` so the adapter starts as identity (skip) / zero.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        prompt_dim: int,
        num_layers: int = 3,
        fusion: str = "hyper",
        act: str = "relu",
        skip: bool = True,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if fusion not in PROMPT_FUSIONS:
            raise ValueError(f"prompt_fusion must be one of {PROMPT_FUSIONS}, got {fusion!r}.")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"hyp_layers must be a positive integer, got {num_layers!r}.")
        _check_act(act)
        self.fusion, self.skip, self.hidden_dim = fusion, skip, hidden_dim
        self.down = nn.Linear(dim, hidden_dim)
        self.act = _ACTS[act]()
        self.up = nn.Linear(hidden_dim, dim)
        if fusion == "hyper":
            self.weight_generators = nn.ModuleList(
                nn.Linear(prompt_dim, hidden_dim * hidden_dim) for _ in range(num_layers)
            )
        elif fusion == "add":
            self.prompt_proj = nn.Linear(prompt_dim, hidden_dim)
        elif fusion == "concat":
            self.prompt_proj = nn.Linear(prompt_dim, hidden_dim)
            self.fuse = nn.Linear(2 * hidden_dim, hidden_dim)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def bottleneck(self, x: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
        """The prompt-conditioned bottleneck embedding.

        Args:
            x: tokens ``[B, N, dim]``.
            prompt: prompt embedding ``[B, L]`` (ignored by ``fusion="none"``).

        Returns:
            ``[B, N, hidden_dim]``.
        """
        h = self.act(self.down(x))
        if self.fusion == "none":
            return h
        if prompt is None:
            raise ValueError(f"HyPAdapter with fusion={self.fusion!r} needs a prompt embedding [B, L].")
        if self.fusion == "hyper":
            for gen in self.weight_generators:
                w = gen(prompt).view(-1, self.hidden_dim, self.hidden_dim)  # Eq. 1: W = Re(M(e_prompt))
                h = F.relu(F.layer_norm(torch.bmm(h, w), (self.hidden_dim,)))  # Eq. 2
        elif self.fusion == "add":
            h = h + self.prompt_proj(prompt)[:, None]
        else:  # concat
            p = self.prompt_proj(prompt)[:, None].expand(-1, h.shape[1], -1)
            h = self.act(self.fuse(torch.cat([h, p], dim=-1)))
        return h

    def forward(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Adapt ``x [B, N, dim]`` conditioned on ``prompt [B, L]``; returns ``[B, N, dim]``."""
        out = self.up(self.bottleneck(x, prompt))
        return x + out if self.skip else out


def _add_encoder_adapters(
    block: nn.Module,
    dim: int,
    hidden_dim: int,
    act: str,
    scale: float,
    zero_init: bool,
    depth_adapter: bool,
    encoder_adapters: bool = True,
) -> None:
    """Give an encoder block Med-SA's space adapter (skip), scaled MLP adapter and optional depth adapter.

    Without ``encoder_adapters`` (another ``peft`` setting tunes the encoder) the space and MLP adapters are
    None and the block computes SAM's block plus the SD-Trans branch.
    """
    block.space_adapter = (
        BottleneckAdapter(dim, hidden_dim, act=act, skip=True, zero_init=zero_init) if encoder_adapters else None
    )
    block.mlp_adapter = (
        BottleneckAdapter(dim, hidden_dim, act=act, skip=False, scale=scale, zero_init=zero_init)
        if encoder_adapters
        else None
    )
    block.depth_adapter = (
        BottleneckAdapter(dim, hidden_dim, act=act, skip=False, zero_init=zero_init) if depth_adapter else None
    )


def _along_slices(
    x: torch.Tensor, num_slices: int, attend: Callable[[torch.Tensor], torch.Tensor], adapter: nn.Module | None
) -> torch.Tensor:
    """SD-Trans (Fig. 1c): ``attend`` over the slice axis of tokens ``[B*D, h, w, C]`` (slices of one sample
    contiguous), then the optional depth adapter; ``attend`` maps ``[B*h*w, D, C]`` to ``D * C`` values per row.

    Returns:
        ``[B*D, h, w, C]``.
    """
    bd, h, w, c = x.shape
    b = bd // num_slices
    xd = attend(x.reshape(b, num_slices, h, w, c).permute(0, 2, 3, 1, 4).reshape(b * h * w, num_slices, c))
    if adapter is not None:
        xd = adapter(xd)
    return xd.reshape(b, h, w, num_slices, c).permute(0, 3, 1, 2, 4).reshape(bd, h, w, c)


class MedSAEncoderBlock(nn.Module):
    """A SAM ViT block with Med-SA's two adapters and the SD-Trans depth branch.

    Paper section "Med-SA architecture" (Fig. 1b): the *space* adapter sits after the
    multi-head attention, before the residual, with its own skip; the *MLP* adapter runs in
    parallel to the MLP on the normalised tokens and is scaled by ``s``. Section "SD-Trans"
    (Fig. 1c): for a chunk of ``D`` slices the same attention is also run with depth as the
    token axis (``N x D x L``) and its output added to the space branch.

    The depth branch runs on the full (un-windowed) token grid, so it is correct in windowed
    blocks too (deliberate difference: the official code regroups windowed tokens as if they
    were slices and mixes unrelated windows). Depth tokens are fed to the attention as a
    ``D x 1`` grid, so its relative-position table (interpolated by SAM to ``2D - 1``) encodes
    the slice distance; the official code folds depth into a 2D ``dh x dw`` grid instead.

    Args:
        block: the SAM ``Block`` whose ``norm1``, ``attn``, ``norm2``, ``mlp`` are adopted.
        hidden_dim: adapter bottleneck width.
        act: adapter activation (``relu`` paper, ``gelu`` official code).
        scale: ``s`` of the MLP adapter (paper: a scale factor following AdaptFormer; code 0.5).
        zero_init: zero-initialise adapter up-projections (the block starts as SAM's block).
        sd_trans: enable the depth branch for inputs with more than one slice.
        depth_adapter: pass the depth branch through a third adapter without skip (official
            code; the paper adds the depth attention output directly).
        encoder_adapters: add the space and MLP adapters (``peft="adapter"``, the paper); False when
            another ``peft`` setting tunes the block (then it computes SAM's block plus SD-Trans).
    """

    def __init__(
        self,
        block: Block,
        hidden_dim: int,
        act: str = "relu",
        scale: float = 0.5,
        zero_init: bool = True,
        sd_trans: bool = True,
        depth_adapter: bool = False,
        encoder_adapters: bool = True,
    ) -> None:
        super().__init__()
        _check_act(act)
        dim = block.norm1.normalized_shape[0]
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.window_size = block.window_size
        self.sd_trans = bool(sd_trans)
        _add_encoder_adapters(self, dim, hidden_dim, act, scale, zero_init, depth_adapter, encoder_adapters)

    def depth_branch(self, xn: torch.Tensor, num_slices: int) -> torch.Tensor:
        """SD-Trans depth branch: attention over the slice axis.

        Args:
            xn: normalised tokens ``[B*D, h, w, C]``, slices of one sample contiguous.
            num_slices: ``D``.

        Returns:
            ``[B*D, h, w, C]``.
        """
        # SAM's attention takes a [M, D, 1, C] grid: the slice line as a D x 1 image
        return _along_slices(xn, num_slices, lambda xd: self.attn(xd[:, :, None]), self.depth_adapter)

    def forward(self, x: torch.Tensor, num_slices: int = 1) -> torch.Tensor:
        """Args:
            x: tokens ``[B*D, h, w, C]`` (``D = num_slices`` consecutive slices per sample).
            num_slices: slices per sample; 1 for 2D input (no depth branch).

        Returns:
            ``[B*D, h, w, C]``.
        """
        if x.shape[0] % num_slices:
            raise ValueError(f"batch of {x.shape[0]} slice embeddings is not a multiple of num_slices={num_slices}.")
        shortcut = x
        xn = self.norm1(x)
        if self.window_size > 0:
            h, w = xn.shape[1], xn.shape[2]
            xw, pad_hw = window_partition(xn, self.window_size)
            a = window_unpartition(self.attn(xw), self.window_size, pad_hw, (h, w))
        else:
            a = self.attn(xn)
        if self.space_adapter is not None:
            a = self.space_adapter(a)  # Fig. 1b: adapter after attention, with skip
        if self.sd_trans and num_slices > 1:
            a = a + self.depth_branch(xn, num_slices)  # Fig. 1c: add the depth branch
        x = shortcut + a
        xn = self.norm2(x)
        if self.mlp_adapter is None:
            return x + self.mlp(xn)
        return x + self.mlp(xn) + self.mlp_adapter(xn)  # Fig. 1b: scaled parallel MLP adapter


def depth_attention(attn: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """A TinyViT :class:`~shared_nets.sam.tiny_vit.WindowAttention` run along a line of ``D`` tokens.

    Its LayerNorm, qkv, heads and projection as they are; the learned bias of the pair at slice
    distance ``d`` is the window's bias of offset ``(d, 0)`` (a ``D x 1`` column, as SAM's ViT
    gets its depth positions from its relative-position table), ``d`` clamped to the window.

    Args:
        attn: the block's attention.
        x: ``[M, D, C]`` un-normalised tokens (M = positions × samples).

    Returns:
        ``[M, D, C]``.
    """
    m, d, _ = x.shape
    qkv = attn.qkv(attn.norm(x)).view(m, d, attn.num_heads, 3, attn.head_dim)
    q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
    pos = torch.arange(d, device=x.device)
    offset = (pos[:, None] - pos[None, :]).abs().clamp(max=attn.window_size - 1) * attn.window_size
    bias = attn.attention_biases[:, offset].to(q.dtype)  # [heads, D, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return attn.proj(out.transpose(1, 2).reshape(m, d, -1))


class MedSATinyViTBlock(nn.Module):
    """Med-SA's adapters and SD-Trans on a LiteMedSAM TinyViT block (the ``lite`` variant).

    The same three pieces as :class:`MedSAEncoderBlock`, placed at the same points of TinyViT's
    block (window attention + residual, 3×3 depth-wise ``local_conv``, MLP + residual): the space
    adapter on the attention output before the residual, the depth branch (:func:`depth_attention`
    with the block's own attention weights) added to it, and the scaled MLP adapter in parallel to
    the MLP on the MLP's normalised input. TinyViT normalises inside its attention and MLP, so the
    depth branch gets the raw tokens and normalises with the attention's own LayerNorm.
    Sub-modules keep TinyViT's names (``attn``, ``local_conv``, ``mlp``), so checkpoint keys do not move.

    Args:
        block: the TinyViT block to adopt.
        hidden_dim: adapter bottleneck width.
        act, scale, zero_init, sd_trans, depth_adapter, encoder_adapters: as :class:`MedSAEncoderBlock`.
    """

    def __init__(
        self,
        block: TinyViTBlock,
        hidden_dim: int,
        act: str = "relu",
        scale: float = 0.5,
        zero_init: bool = True,
        sd_trans: bool = True,
        depth_adapter: bool = False,
        encoder_adapters: bool = True,
    ) -> None:
        super().__init__()
        _check_act(act)
        if not isinstance(block, TinyViTBlock):
            raise ValueError(f"block must be a TinyViTBlock, got {type(block).__name__}.")
        dim = block.attn.norm.normalized_shape[0]
        self.attn, self.local_conv, self.mlp = block.attn, block.local_conv, block.mlp
        self.window_size = block.window_size
        self.sd_trans = bool(sd_trans)
        _add_encoder_adapters(self, dim, hidden_dim, act, scale, zero_init, depth_adapter, encoder_adapters)

    window_attention = TinyViTBlock.window_attention

    def depth_branch(self, x: torch.Tensor, num_slices: int) -> torch.Tensor:
        """SD-Trans depth branch on raw tokens ``[B*D, h, w, C]`` → ``[B*D, h, w, C]``."""
        return _along_slices(x, num_slices, lambda xd: depth_attention(self.attn, xd), self.depth_adapter)

    def forward(self, x: torch.Tensor, num_slices: int = 1) -> torch.Tensor:
        """Tokens ``[B*D, h, w, C]`` (``D = num_slices`` consecutive slices per sample) → same shape."""
        if x.shape[0] % num_slices:
            raise ValueError(f"batch of {x.shape[0]} slice embeddings is not a multiple of num_slices={num_slices}.")
        a = self.window_attention(x)
        if self.space_adapter is not None:
            a = self.space_adapter(a)  # Fig. 1b: adapter after attention, with skip
        if self.sd_trans and num_slices > 1:
            a = a + self.depth_branch(x, num_slices)  # Fig. 1c
        x = x + a
        x = self.local_conv(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        if self.mlp_adapter is None:
            return x + self.mlp(x)
        return x + self.mlp(x) + self.mlp_adapter(self.mlp.norm(x))  # Fig. 1b: scaled parallel MLP adapter


class MedSADecoderBlock(nn.Module):
    """SAM's two-way attention block with Med-SA's three decoder adapters (Fig. 1d).

    1. HyP-Adpt on the token self-attention output (before its residual), conditioned on
       the prompt embedding;
    2. an adapter parallel to the token MLP, scaled by ``s`` (as in the encoder);
    3. an adapter after the residual of the image-embedding-to-prompt cross-attention,
       followed by another residual and the block's LayerNorm.

    The official repository has no decoder adapters; this follows the paper's text.

    Args:
        block: SAM ``TwoWayAttentionBlock`` whose sub-modules are adopted.
        hidden_dim: adapter bottleneck width.
        prompt_dim: width of the prompt embedding.
        fusion: HyP-Adpt mode (:data:`PROMPT_FUSIONS`; ``"none"`` = plain adapter).
        hyp_layers: hyper-prompting layers.
        act: adapter activation.
        scale: ``s`` of the MLP adapter.
        zero_init: zero-initialise adapter up-projections.
    """

    def __init__(
        self,
        block: TwoWayAttentionBlock,
        hidden_dim: int,
        prompt_dim: int,
        fusion: str = "hyper",
        hyp_layers: int = 3,
        act: str = "relu",
        scale: float = 0.5,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        for name in (
            "self_attn",
            "norm1",
            "cross_attn_token_to_image",
            "norm2",
            "mlp",
            "norm3",
            "norm4",
            "cross_attn_image_to_token",
        ):
            setattr(self, name, getattr(block, name))
        self.skip_first_layer_pe = block.skip_first_layer_pe
        dim = block.norm1.normalized_shape[0]
        self.hyp_adapter = HyPAdapter(
            dim, hidden_dim, prompt_dim, hyp_layers, fusion, act, skip=True, zero_init=zero_init
        )
        self.mlp_adapter = BottleneckAdapter(dim, hidden_dim, act=act, skip=False, scale=scale, zero_init=zero_init)
        self.image_adapter = BottleneckAdapter(dim, hidden_dim, act=act, skip=False, zero_init=zero_init)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        prompt: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            queries: prompt/output tokens ``[B, Nq, C]``; ``query_pe`` same shape.
            keys: image tokens ``[B, hw, C]``; ``key_pe`` same shape.
            prompt: prompt embedding ``[B, L]``.

        Returns:
            ``(queries [B, Nq, C], keys [B, hw, C])``.
        """
        if self.skip_first_layer_pe:
            queries = self.hyp_adapter(self.self_attn(q=queries, k=queries, v=queries), prompt)
        else:
            q = queries + query_pe
            queries = queries + self.hyp_adapter(self.self_attn(q=q, k=q, v=queries), prompt)  # adapter 1: HyP-Adpt
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))

        queries = self.norm3(queries + self.mlp(queries) + self.mlp_adapter(queries))  # adapter 2

        q, k = queries + query_pe, keys + key_pe
        keys = keys + self.cross_attn_image_to_token(q=k, k=q, v=queries)
        keys = self.norm4(keys + self.image_adapter(keys))  # adapter 3, then residual + LayerNorm
        return queries, keys


class MedSATwoWayTransformer(nn.Module):
    """SAM's ``TwoWayTransformer`` with :class:`MedSADecoderBlock` layers and a prompt embedding.

    The prompt embedding ``e_prompt`` (section "HyP-Adpt": click locations, click labels and
    box "concatenated and reduced") is computed once per decoded image from SAM's sparse
    prompt tokens ``[B, T, C]`` (each already the sum of a location encoding and a label /
    corner embedding): the ``T`` tokens are concatenated to ``T * C`` values and reduced by a
    linear layer to ``prompt_dim``.

    Args:
        transformer: the SAM transformer whose layers and final attention are adopted.
        num_prompt_tokens: ``T`` = max clicks + 2 box corners (fixed by padding).
        prompt_dim: ``L``.
        hidden_dim, fusion, hyp_layers, act, scale, zero_init: see :class:`MedSADecoderBlock`.
    """

    def __init__(
        self,
        transformer: TwoWayTransformer,
        num_prompt_tokens: int,
        hidden_dim: int,
        prompt_dim: int,
        fusion: str = "hyper",
        hyp_layers: int = 3,
        act: str = "relu",
        scale: float = 0.5,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        dim = transformer.embedding_dim
        self.num_prompt_tokens = num_prompt_tokens
        self.prompt_reduce = nn.Linear(num_prompt_tokens * dim, prompt_dim) if fusion != "none" else None
        self.layers = nn.ModuleList(
            MedSADecoderBlock(layer, hidden_dim, prompt_dim, fusion, hyp_layers, act, scale, zero_init)
            for layer in transformer.layers
        )
        self.final_attn_token_to_image = transformer.final_attn_token_to_image
        self.norm_final_attn = transformer.norm_final_attn

    def prompt_embedding(self, prompt_tokens: torch.Tensor) -> torch.Tensor | None:
        """``e_prompt [B, L]`` from sparse prompt tokens ``[B, T, C]`` (None for plain adapters)."""
        if self.prompt_reduce is None:
            return None
        if prompt_tokens.shape[1] != self.num_prompt_tokens:
            raise ValueError(
                f"expected {self.num_prompt_tokens} sparse prompt tokens (max_points + 2 box corners), "
                f"got {prompt_tokens.shape[1]}."
            )
        return self.prompt_reduce(prompt_tokens.flatten(1))

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop-in for ``TwoWayTransformer.forward``.

        Args:
            image_embedding: ``[B, C, h, w]``; image_pe: ``[B, C, h, w]``.
            point_embedding: output tokens then sparse prompt tokens ``[B, Nq, C]``; the last
                ``num_prompt_tokens`` rows are the prompt tokens that build ``e_prompt``.

        Returns:
            ``(queries [B, Nq, C], keys [B, h*w, C])``.
        """
        prompt = self.prompt_embedding(point_embedding[:, -self.num_prompt_tokens :])
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, prompt)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q=q, k=k, v=keys))
        return queries, keys
