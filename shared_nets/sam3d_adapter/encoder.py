"""3DSAM-adapter image encoder pieces: SAM's 2D ViT turned into a volumetric encoder.

Poster section "Adapting Image Encoder for Volumetric Inputs". The frozen SAM parts
(patch embedding, position embedding, ``qkv`` / ``proj`` / MLP weights, h/w relative-position
tables) are taken from a built ``segment_anything`` ``ImageEncoderViT`` and reused as they
are; the pieces here add the third axis around them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention as SamAttention
from segment_anything.modeling.image_encoder import Block as SamBlock
from segment_anything.modeling.image_encoder import PatchEmbed, get_rel_pos
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "LayerNorm3d",
    "SpatialAdapter3D",
    "WindowAttention3D",
    "Block3D",
    "Neck3D",
    "VolumeTokenizer",
    "window_partition_3d",
    "window_unpartition_3d",
    "shifted_window_regions",
    "run_blocks",
]


class LayerNorm3d(nn.Module):
    """Layer normalisation over the channel axis of a channels-first volume ``[B, C, H, W, D]``."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W, D]`` -> ``[B, C, H, W, D]``."""
        x = x.movedim(1, -1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


class SpatialAdapter3D(nn.Module):
    """The 3D spatial adapter at the start of every block (poster: "lightweight spatial adapters").

    ``x + up(ReLU(DWConv3d(ReLU(down(x)))))`` on channels-last tokens ``[B, H, W, D, C]``: a
    bottleneck whose depthwise 3x3x3 convolution mixes neighbouring tokens in all three axes.

    Args:
        dim: token width ``C``.
        hidden_dim: bottleneck width (``C // 2`` in the official code: 384 for ViT-B).
        kernel_size: depthwise kernel size (3 in the official code).
        final_relu: also apply ReLU after the up-projection, as the official code does (the
            poster's description ends with the up-projection; default off).
        zero_init: zero-initialise the up-projection so the adapter starts as the identity.
            The official code uses PyTorch's default initialisation. Zero initialisation with
            ``final_relu`` would never receive gradients (ReLU'(0) = 0) and is refused.
    """

    def __init__(
        self, dim: int, hidden_dim: int, kernel_size: int = 3, final_relu: bool = False, zero_init: bool = True
    ) -> None:
        super().__init__()
        if hidden_dim < 1:
            raise ValueError(f"adapter hidden_dim must be a positive integer, got {hidden_dim!r}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"adapter kernel_size must be a positive odd integer, got {kernel_size!r}.")
        if final_relu and zero_init:
            raise ValueError(
                "adapter zero_init=True with final_relu=True would leave the adapter without gradients "
                "(ReLU of an all-zero output); use zero_init=False with final_relu=True."
            )
        self.down = nn.Linear(dim, hidden_dim)
        self.conv = nn.Conv3d(hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2, groups=hidden_dim)
        self.up = nn.Linear(hidden_dim, dim)
        self.final_relu = final_relu
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, D, C]`` -> ``[B, H, W, D, C]``."""
        h = F.relu(self.down(x))
        h = F.relu(self.conv(h.movedim(-1, 1)).movedim(1, -1))
        h = self.up(h)
        if self.final_relu:
            h = F.relu(h)
        return x + h


def window_partition_3d(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut ``[B, H, W, D, C]`` into non-overlapping cubes ``[B * nW, ws**3, C]`` (sides divisible by ``ws``)."""
    b, h, w, d, c = x.shape
    ws = window_size
    x = x.view(b, h // ws, ws, w // ws, ws, d // ws, ws, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws**3, c)


def window_unpartition_3d(windows: torch.Tensor, window_size: int, grid: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition_3d`: ``[B * nW, ws**3, C]`` -> ``[B, H, W, D, C]``."""
    h, w, d = grid
    ws = window_size
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // ws) * (w // ws) * (d // ws))
    x = windows.view(b, h // ws, w // ws, d // ws, ws, ws, ws, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, h, w, d, c)


def shifted_window_regions(grid: Sequence[int], window_size: int, shift: int) -> torch.Tensor:
    """Region id of every token inside every window after a cyclic shift (Swin-style masking).

    Tokens of one window that came from different sides of the cyclic roll get different ids
    and must not attend to each other.

    Returns:
        ``[nW, ws**3]`` integer ids.
    """
    ids = torch.zeros(1, *grid, 1)
    bounds = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    region = 0
    for sh in bounds:
        for sw in bounds:
            for sd in bounds:
                ids[:, sh, sw, sd, :] = region
                region += 1
    return window_partition_3d(ids, window_size)[..., 0].long()


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside 3D windows, reusing a SAM 2D ``Attention``'s weights.

    Poster "3D window attention": decomposed relative position along h, w (SAM's pretrained
    tables, frozen) and d (a new table initialised as the mean of the h and w tables, as the
    official code does). Tables keep SAM's lengths and are linearly interpolated to the
    window at run time (``segment_anything``'s ``get_rel_pos``), so pretrained tables load
    unchanged. (The official code also multiplies the relative terms by a frozen scalar that
    stays 1; we leave it out.)

    Args:
        sam_attn: a ``segment_anything`` ``Attention`` with relative positions; its ``qkv``,
            ``proj`` and tables are shared, not copied.
    """

    def __init__(self, sam_attn: SamAttention) -> None:
        super().__init__()
        if not getattr(sam_attn, "use_rel_pos", False):
            raise ValueError("WindowAttention3D needs a SAM Attention built with use_rel_pos=True.")
        self.num_heads = sam_attn.num_heads
        self.qkv = sam_attn.qkv
        self.proj = sam_attn.proj
        self.rel_pos_h = sam_attn.rel_pos_h
        self.rel_pos_w = sam_attn.rel_pos_w
        with torch.no_grad():
            self.rel_pos_d = nn.Parameter(0.5 * (sam_attn.rel_pos_h.detach() + sam_attn.rel_pos_w.detach()))

    def forward(self, x: torch.Tensor, region_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within each window.

        Args:
            x: ``[B * nW, h, w, d, C]`` windows (or a whole grid with ``nW = 1``).
            region_ids: ``[nW, h * w * d]`` shifted-window region ids, or None for no masking.

        Returns:
            ``[B * nW, h, w, d, C]``.
        """
        bw, h, w, d, c = x.shape
        n = h * w * d
        heads = self.num_heads
        qkv = self.qkv(x).reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [bw, heads, n, hd]
        rh = get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)
        rw = get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)
        rd = get_rel_pos(d, d, self.rel_pos_d).to(q.dtype)
        r_q = q.reshape(bw, heads, h, w, d, -1)
        bias_h = torch.einsum("bnhwdc,hkc->bnhwdk", r_q, rh)[..., :, None, None]
        bias_w = torch.einsum("bnhwdc,wkc->bnhwdk", r_q, rw)[..., None, :, None]
        bias_d = torch.einsum("bnhwdc,dkc->bnhwdk", r_q, rd)[..., None, None, :]
        bias = (bias_h + bias_w + bias_d).reshape(bw, heads, n, n)
        if region_ids is not None:
            nw = region_ids.shape[0]
            blocked = region_ids[:, :, None] != region_ids[:, None, :]  # [nW, n, n]
            bias = bias.view(bw // nw, nw, heads, n, n).masked_fill(blocked[None, :, None], float("-inf"))
            bias = bias.view(bw, heads, n, n)
        if torch.compiler.is_exporting():  # the math form: ONNX's decomposition of the SDPA node fails here
            out = torch.softmax(q @ k.transpose(-2, -1) * (c // heads) ** -0.5 + bias, dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(bw, h, w, d, c)
        return self.proj(out)


class Block3D(nn.Module):
    """A SAM transformer block run on a 3D token grid (poster "Adapting Image Encoder").

    Adapter first (official placement), then pre-norm 3D (shifted-)window attention and the
    block's MLP, both with residuals. Norms, MLP and attention weights are SAM's.

    Args:
        sam_block: a ``segment_anything`` image-encoder ``Block``.
        grid: token grid ``(h, w, d)`` the block runs on (each divisible by ``window_size``).
        window_size: side of the cubic attention windows (8 in the official code).
        shift: cyclic shift of the windows (``window_size // 2`` on alternate blocks), 0 for none.
        adapter: the block's :class:`SpatialAdapter3D`, or None for none.
    """

    def __init__(
        self,
        sam_block: SamBlock,
        grid: Sequence[int],
        window_size: int,
        shift: int = 0,
        adapter: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.norm1 = sam_block.norm1
        self.attn = WindowAttention3D(sam_block.attn)
        self.norm2 = sam_block.norm2
        self.mlp = sam_block.mlp
        self.grid = tuple(int(g) for g in grid)
        self.window_size = int(window_size)
        self.shift = int(shift)
        if self.shift:
            self.register_buffer(
                "region_ids", shifted_window_regions(self.grid, self.window_size, self.shift), persistent=False
            )
        else:
            self.region_ids = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, h, w, d, C]`` -> ``[B, h, w, d, C]``."""
        if self.adapter is not None:
            x = self.adapter(x)
        shortcut = x
        x = self.norm1(x)
        dims = (1, 2, 3)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift,) * 3, dims=dims)
        ws = self.window_size
        win = window_partition_3d(x, ws)
        win = self.attn(win.view(-1, ws, ws, ws, x.shape[-1]), self.region_ids).flatten(1, 3)
        x = window_unpartition_3d(win, ws, self.grid)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift,) * 3, dims=dims)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Neck3D(nn.Sequential):
    """One multi-scale neck (poster Fig. "Lightweight Mask Decoder": intermediate encoder outputs).

    ``Conv3d 1x1 (no bias) -> LayerNorm3d -> Conv3d 3x3x3 (no bias) -> LayerNorm3d``: SAM's 2D
    neck made 3D, as in the official code's encoder.

    Args:
        in_channels: encoder token width.
        out_channels: feature width handed to the prompt encoder and decoder.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 1, bias=False),
            LayerNorm3d(out_channels),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            LayerNorm3d(out_channels),
        )


class VolumeTokenizer(nn.Module):
    """Volume -> 3D token grid (poster "Adapting Image Encoder for Volumetric Inputs").

    The patch is resized (trilinear) so that SAM's frozen 2D patch embedding, applied to every
    axial slice, yields the in-plane grid; a trainable depthwise Conv3d with kernel = stride =
    patch size along the slice axis then merges the slice embeddings into the depth grid. SAM's
    position embedding (built at twice the grid) is average-pooled 2x2 and a learnable depth
    embedding is added.

    Args:
        patch_embed: SAM's ``PatchEmbed`` (16x16, 3 -> C).
        pos_embed: SAM's position embedding ``[1, 2h, 2w, C]`` (shared Parameter).
        grid: token grid ``(h, w, d)``.
        resized: ``(H', W', D')`` the patch is resized to before embedding.
        depth_embed_init: ``"zeros"`` or ``"ones"`` (the official code's value).
        slice_embed_init: ``"mean"`` (average of the merged slices: tokens start as SAM's
            in-plane embeddings) or ``"default"`` (PyTorch's initialisation, as the official code).
        chunk: slices embedded per call of the frozen patch embedding (bounds peak memory).
    """

    def __init__(
        self,
        patch_embed: PatchEmbed,
        pos_embed: nn.Parameter,
        grid: Sequence[int],
        resized: Sequence[int],
        depth_embed_init: str = "zeros",
        slice_embed_init: str = "mean",
        chunk: int = 64,
    ) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.pos_embed = pos_embed
        dim = pos_embed.shape[-1]
        self.patch = int(patch_embed.proj.kernel_size[0])
        self.grid = tuple(int(g) for g in grid)
        self.resized = tuple(int(r) for r in resized)
        self.chunk = int(chunk)
        self.slice_embed = nn.Conv3d(dim, dim, (1, 1, self.patch), stride=(1, 1, self.patch), groups=dim)
        init = {"zeros": torch.zeros, "ones": torch.ones}
        if depth_embed_init not in init:
            raise ValueError(f"depth_embed_init must be 'zeros' or 'ones', got {depth_embed_init!r}.")
        self.depth_embed = nn.Parameter(init[depth_embed_init](1, self.grid[2], dim))
        if slice_embed_init == "mean":
            with torch.no_grad():
                self.slice_embed.weight.fill_(1.0 / self.patch)
                self.slice_embed.bias.zero_()
        elif slice_embed_init != "default":
            raise ValueError(f"slice_embed_init must be 'mean' or 'default', got {slice_embed_init!r}.")

    def _embed_slices(self, slices: torch.Tensor) -> torch.Tensor:
        frozen = not any(p.requires_grad for p in self.patch_embed.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            if frozen:
                return torch.cat([self.patch_embed(s) for s in slices.split(self.chunk)], 0)
            return self.patch_embed(slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W, D]`` (image patch) -> tokens ``[B, h, w, d, C]``."""
        b = x.shape[0]
        x = F.interpolate(x, size=self.resized, mode="trilinear")
        slices = x.permute(0, 4, 1, 2, 3).flatten(0, 1)  # [B * D', 3, H', W']
        tok = self._embed_slices(slices)  # [B * D', h, w, C]
        tok = tok.view(b, self.resized[2], *tok.shape[1:]).permute(0, 4, 2, 3, 1)  # [B, C, h, w, D']
        tok = self.slice_embed(tok).permute(0, 2, 3, 4, 1)  # [B, h, w, d, C]
        pos = F.avg_pool2d(self.pos_embed.permute(0, 3, 1, 2), kernel_size=2).permute(0, 2, 3, 1)  # [1, h, w, C]
        return tok + pos[:, :, :, None, :] + self.depth_embed[:, None, None, :, :]


def run_blocks(
    blocks: Sequence[nn.Module], x: torch.Tensor, taps: Sequence[int], use_checkpoint: bool = False
) -> list[torch.Tensor]:
    """Run ``blocks`` on ``x`` and return the outputs after the (1-based) block indices in ``taps``."""
    out = []
    for i, blk in enumerate(blocks, start=1):
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
        if i in taps:
            out.append(x)
    return out
