"""TinyViT image encoder of LiteMedSAM, in the key layout of its published checkpoint.

LiteMedSAM (Ma et al., "Segment anything in medical images", MedSAM; its LiteMedSAM branch,
the "MedSAM on laptop" CVPR 2024 challenge baseline) distils MedSAM's ViT-B image encoder into a
TinyViT (Wu et al., ECCV 2022) adapted by MobileSAM. LiteMedSAM's variant differs from the
standard TinyViT-5M in two ways that the checkpoint fixes:

* the patch embedding is two **1×1, stride-1** ``Conv2d + BatchNorm`` (stock TinyViT: 3×3 stride 2),
  so the first (MBConv) stage runs at the input resolution;
* the patch merging into the last stage has stride 1, so a ``S × S`` input gives an
  ``S/4 × S/4`` embedding (64×64 at the native 256).

Tokens travel between blocks as ``[B, H, W, C]`` (like ``segment_anything``'s ViT blocks), so the
grid follows the input and any ``img_size`` divisible by 4 works with the same weights (attention
biases are per window offset, not per image position). Window attention pads the grid to a
multiple of the window with zeros *before* the attention's LayerNorm, as the published model does.
Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` with the learned
per-head offset biases as additive mask.

Inference path (same outputs up to float rounding; modules, parameter names and state-dict keys
unchanged): activations stay channels-last, so the ``[B, H, W, C]`` ⇄ ``[B, C, H, W]`` permutations
around the convolutions cost no copy; in eval mode each ``ConvBN`` runs as one convolution (a matmul
for the 1×1 ones) with its BatchNorm folded in; without autograd (``torch.no_grad`` /
``torch.inference_mode``) GELU runs in place on intermediates; the attention mask is 4-D so that
torch's fused CPU SDPA kernel runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

__all__ = ["ConvBN", "MBConv", "PatchMerging", "TinyViTBlock", "TinyViTEncoder", "WindowAttention"]


class ConvBN(nn.Sequential):
    """``Conv2d`` (no bias) followed by ``BatchNorm2d``; children named ``c`` and ``bn``.

    Args:
        in_chans: input channels.
        out_chans: output channels.
        kernel_size: square kernel side.
        stride: convolution stride.
        groups: convolution groups (``out_chans`` for depth-wise).
        bn_weight_init: initial BatchNorm scale (0 makes a residual branch start as identity).
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        )
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``c`` then ``bn``; in eval mode one convolution with the BatchNorm folded into its weight and bias.

        Folding uses the running statistics, exactly what eval-mode BatchNorm applies, so the result is the
        same up to float rounding; it is recomputed from the current parameters on every call (a few small
        tensors), so loading weights or fine-tuning needs no refresh step and gradients reach both children.
        A 1×1 stride-1 convolution of a channels-last map runs as a matmul (``F.linear``), which MKL does
        faster than oneDNN's convolution on 2 threads (measured).
        """
        conv, bn = self.c, self.bn
        if self.training or not bn.track_running_stats or bn.running_var is None:
            return bn(conv(x))
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        if (
            conv.kernel_size == (1, 1)
            and conv.stride == (1, 1)
            and conv.groups == 1
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            # a 1×1 convolution of a channels-last map is a matmul over [B, H, W, C] (a free permutation)
            return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _act(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)`` where ``x`` is an intermediate the caller owns: GELU runs in place when no graph is recorded.

    At 256² the first stage's activations are 64 MB each; a fresh tensor of that size costs more in page
    faults than the GELU itself, so inference (``torch.no_grad`` / ``torch.inference_mode``) reuses ``x``.
    """
    if type(act) is nn.GELU and not torch.is_grad_enabled():
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


class PatchEmbed(nn.Module):
    """Two 1×1 stride-1 ``ConvBN`` with GELU between (``seq.0``, ``seq.2``): channels 3 → dim/2 → dim.

    Args:
        in_chans: image channels.
        embed_dim: output channels (the first stage's width).
    """

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, embed_dim // 2), nn.GELU(), ConvBN(embed_dim // 2, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` image → ``[B, embed_dim, H, W]``."""
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2-style) block on ``[B, C, H, W]``: 1×1 expand, 3×3 depth-wise, 1×1 project.

    Args:
        dim: channels in and out.
        expand_ratio: hidden width / ``dim``.
    """

    def __init__(self, dim: int, expand_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size=3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same shape out; GELU after the residual sum."""
        y = _act(self.act, self.conv2(_act(self.act, self.conv1(x))))
        return _act(self.act, self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Change width (and usually halve the grid): 1×1 ``ConvBN``, 3×3 depth-wise ``ConvBN`` with ``stride``, 1×1.

    Args:
        dim: input channels.
        out_dim: output channels.
        stride: stride of the depth-wise convolution (2, or 1 into LiteMedSAM's last stage).
    """

    def __init__(self, dim: int, out_dim: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel_size=3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` feature map → tokens ``[B, H', W', out_dim]``."""
        x = self.conv3(_act(self.act, self.conv2(_act(self.act, self.conv1(x)))))
        return x.permute(0, 2, 3, 1)


def window_offset_index(window_size: int) -> torch.Tensor:
    """Index ``[N, N]`` (N = window²) of the learned bias for each query/key pair of a window.

    The pair of tokens at ``(y1, x1)`` and ``(y2, x2)`` shares the bias of offset
    ``(|y1 - y2|, |x1 - x2|)``, stored at ``|y1 - y2| * window + |x1 - x2|`` (the order in which
    LeViT/TinyViT enumerate offsets, which the checkpoint's ``attention_biases`` columns follow).
    """
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return (ys[:, None] - ys[None, :]).abs() * window_size + (xs[:, None] - xs[None, :]).abs()


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window with learned per-head offset biases (LeViT).

    ``qkv`` is one ``Linear(dim, 3 * dim)`` whose output is laid out **per head** as
    ``[q_h, k_h, v_h]`` (head-major; SAM's ViT lays out ``[q, k, v]`` first): PEFT pieces on q/v
    must use :meth:`qkv_slices`.

    Args:
        dim: token width.
        num_heads: heads (``dim`` divisible by it).
        window_size: window side in tokens.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("attention_bias_idxs", window_offset_index(window_size), persistent=False)

    def qkv_slices(self, part: str) -> torch.Tensor:
        """Output rows of ``qkv`` that belong to ``part`` (``"q"``, ``"k"`` or ``"v"``), over all heads."""
        offset = "qkv".index(part) * self.head_dim
        rows = torch.arange(self.head_dim)
        return torch.cat([h * 3 * self.head_dim + offset + rows for h in range(self.num_heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``[B, N, C]`` (N = window²) → ``[B, N, C]``."""
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        # a 4-D mask [1, heads, N, N]: with a 3-D one torch's CPU dispatch falls back to the unfused math kernel
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    """Pre-norm MLP: ``LayerNorm`` → ``fc1`` → GELU → ``fc2``.

    Args:
        dim: token width.
        hidden_dim: hidden width.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_act(self.act, self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """TinyViT block on tokens ``[B, H, W, C]``: window attention + residual, 3×3 depth-wise ``ConvBN``, MLP + residual.

    Args:
        dim: token width.
        num_heads: attention heads.
        window_size: attention window side in tokens (the grid is zero-padded to a multiple).
        mlp_ratio: MLP hidden width / ``dim``.
        local_conv_size: kernel of the depth-wise convolution between attention and MLP.
    """

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float = 4.0, local_conv_size: int = 3
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, kernel_size=local_conv_size, groups=dim)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over non-overlapping windows of ``x`` ``[B, H, W, C]`` (residual not added)."""
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        return x[:, :h, :w] if (pad_b or pad_r) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, H, W, C]`` → same shape."""
        x = x + self.window_attention(x)
        # [B, H, W, C] permuted to [B, C, H, W] is a channels-last tensor: the convolution runs in that layout
        # and its output permutes back to contiguous tokens, with no copy either way
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """First stage: MBConv blocks on ``[B, C, H, W]``, then :class:`PatchMerging` (→ tokens)."""

    def __init__(self, dim: int, depth: int, out_dim: int, stride: int, expand_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class AttnStage(nn.Module):
    """A stage of :class:`TinyViTBlock` on tokens, optionally followed by :class:`PatchMerging`."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        out_dim: int | None = None,
        stride: int = 2,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size) for _ in range(depth)
        )
        self.downsample = None if out_dim is None else PatchMerging(dim, out_dim, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2))  # channels-last, no copy
        return x


class TinyViTEncoder(nn.Module):
    """LiteMedSAM's image encoder: ``[B, 3, S, S]`` in [0, 1] → embedding ``[B, out_chans, S/4, S/4]``.

    Parameter names match the published ``lite_medsam.pth`` (``patch_embed.seq.*``,
    ``layers.{i}.blocks.{j}.*``, ``layers.{i}.downsample.*``, ``neck.*``).

    Args:
        img_size: input side (divisible by 4; 256 for the published weights' training size).
        in_chans: image channels.
        embed_dims: width of each stage.
        depths: blocks per stage (stage 0 is MBConv, the others attention).
        num_heads: attention heads per stage (entry 0 unused).
        window_sizes: attention window per stage (entry 0 unused).
        merge_strides: stride of the patch merging after stages 0, 1, 2.
        mlp_ratio: MLP hidden width / token width.
        mbconv_expand_ratio: MBConv hidden width / width.
        local_conv_size: depth-wise kernel between attention and MLP.
        out_chans: width of the neck output (SAM's prompt embedding width).
    """

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        if not (len(depths) == len(num_heads) == len(window_sizes) == n and len(merge_strides) == n - 1 and n >= 2):
            raise ValueError(
                f"embed_dims, depths, num_heads, window_sizes need one entry per stage and merge_strides one fewer; "
                f"got {len(embed_dims)}, {len(depths)}, {len(num_heads)}, {len(window_sizes)}, {len(merge_strides)}."
            )
        down = 1
        for s in merge_strides:
            down *= s
        if not isinstance(img_size, int) or img_size <= 0 or img_size % down:
            raise ValueError(f"img_size must be a positive integer divisible by {down}, got {img_size!r}.")
        self.img_size = img_size
        self.downsampling = down
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        layers: list[nn.Module] = [
            ConvStage(embed_dims[0], depths[0], embed_dims[1], merge_strides[0], mbconv_expand_ratio)
        ]
        for i in range(1, n):
            last = i == n - 1
            layers.append(
                AttnStage(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    out_dim=None if last else embed_dims[i + 1],
                    stride=1 if last else merge_strides[i],
                )
            )
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def blocks(self) -> list[TinyViTBlock]:
        """All attention blocks in order (where PEFT pieces attach)."""
        return [b for layer in self.layers[1:] for b in layer.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C, S, S]`` → embedding ``[B, out_chans, S/4, S/4]``."""
        if x.ndim != 4 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"TinyViTEncoder expects images [B, C, {self.img_size}, {self.img_size}], got {tuple(x.shape)}."
            )
        # channels-last throughout: the convolutions run faster in it, and tokens [B, H, W, C] are its permutation
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return self.neck(x.permute(0, 3, 1, 2)).contiguous()
