"""Fused attention for SAM's image encoder: ``scaled_dot_product_attention`` with rel-pos terms.

``segment_anything``'s image-encoder ``Attention`` materialises the full attention matrix
(``q @ kᵀ``), adds the decomposed relative-position terms (MViTv2, SAM sec. 3 / appendix A)
in a second full-size tensor and applies softmax in a third. :class:`SdpaAttention` computes
the same function through :func:`torch.nn.functional.scaled_dot_product_attention`, which picks
a fused kernel (FlashAttention / memory-efficient on CUDA, the blocked flash kernel on CPU):

* ``rel_pos_mode="bias"`` (default): the decomposed rel-pos terms are summed into one additive
  ``attn_mask`` ``[B, heads, N, N]``; the softmax/intermediate matrices are never stored.
* ``rel_pos_mode="fold"``: the rel-pos terms are folded into the dot product instead, by
  appending the per-query terms to ``q`` and one-hot row/column indicators to ``k``
  (``q'·k' = s·q·k + R_h[row(k)] + R_w[col(k)]``), so no ``N × N`` tensor exists at all.
  Costs ``h + w`` extra channels per head; pays off for large global-attention grids.

It is a subclass with no new parameters, so swapping the class of a built module
(:func:`enable_sdpa`) keeps ``state_dict`` keys, checkpoints and PEFT wrappers of ``attn.qkv``
(``self.qkv(x)`` / ``self.proj(x)`` are still called) unchanged. SAM's own rel-pos helper
``get_rel_pos`` (table interpolation for other input sizes) is reused as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

__all__ = ["REL_POS_MODES", "SdpaAttention", "decomposed_rel_pos_bias", "enable_sdpa", "is_sdpa_enabled"]

REL_POS_MODES = ("bias", "fold")


def _rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query rel-pos logits along each axis (MViTv2 decomposed rel-pos, SAM appendix A).

    Args:
        q: unscaled queries ``[B, heads, h*w, head_dim]``.
        rel_pos_h: table ``[L_h, head_dim]``; rel_pos_w: table ``[L_w, head_dim]``.
        size: token grid ``(h, w)`` (queries and keys share it: self-attention).

    Returns:
        ``rel_h [B, heads, h*w, h]`` (term for each key row) and ``rel_w [B, heads, h*w, w]``.
    """
    h, w = size
    r_h = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # [h_q, h_k, C]
    r_w = get_rel_pos(w, w, rel_pos_w).to(q.dtype)  # [w_q, w_k, C]
    b, n_heads, _, c = q.shape
    grid_q = q.reshape(b, n_heads, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, r_h).reshape(b, n_heads, h * w, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, r_w).reshape(b, n_heads, h * w, w)
    return rel_h, rel_w


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """SAM's decomposed relative-position terms as one additive attention bias.

    Equals what ``segment_anything.modeling.image_encoder.add_decomposed_rel_pos`` adds to the
    attention logits, for self-attention over an ``h × w`` grid.

    Args:
        q: unscaled queries ``[B, heads, h*w, head_dim]``.
        rel_pos_h: table ``[L_h, head_dim]`` (interpolated to ``2h - 1`` rows if needed).
        rel_pos_w: table ``[L_w, head_dim]``.
        size: token grid ``(h, w)``.

    Returns:
        Bias ``[B, heads, h*w, h*w]`` in ``q``'s dtype, key index ``k_row * w + k_col``.
    """
    h, w = size
    rel_h, rel_w = _rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    b, n_heads, n, _ = rel_h.shape
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, n_heads, n, h * w)


class SdpaAttention(Attention):
    """SAM image-encoder ``Attention`` computed with ``scaled_dot_product_attention``.

    Same parameters and state-dict keys as ``segment_anything``'s ``Attention`` (it is built by
    :func:`enable_sdpa` swapping the class of an existing module, or constructed with the same
    arguments). Numerically equal to the stock forward up to float rounding (tested to 1e-4).

    Attributes:
        rel_pos_mode: ``"bias"`` (rel-pos as additive ``attn_mask``) or ``"fold"`` (rel-pos folded
            into extra ``q``/``k`` channels, no ``N × N`` tensor); read at every forward.
    """

    rel_pos_mode: str = "bias"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention with decomposed rel-pos (SAM sec. 3, image encoder).

        Args:
            x: tokens ``[B, h, w, C]`` (a window or the whole grid).

        Returns:
            ``[B, h, w, C]``.
        """
        b, h, w, _ = x.shape
        # [3, B, heads, h*w, head_dim]; qkv may be a PEFT wrapper: call it, never read its weight
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif self.rel_pos_mode == "fold":
            out = self._folded(q, k, v, (h, w))
        elif self.rel_pos_mode == "bias":
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            raise ValueError(f"rel_pos_mode must be one of {REL_POS_MODES}, got {self.rel_pos_mode!r}.")
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)

    def _folded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Attention with the rel-pos terms as extra dot-product channels (no bias tensor).

        Args:
            q, k, v: ``[B, heads, h*w, head_dim]``.
            size: token grid ``(h, w)``.

        Returns:
            ``[B, heads, h*w, head_dim]``.
        """
        h, w = size
        rel_h, rel_w = _rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, size)
        rows = torch.arange(h, device=q.device).repeat_interleave(w)  # key row of each key token
        cols = torch.arange(w, device=q.device).repeat(h)
        ind = torch.cat([F.one_hot(rows, h), F.one_hot(cols, w)], dim=-1).to(k.dtype)  # [h*w, h+w]
        extra = h + w
        pad = (-(q.shape[-1] + extra)) % 8  # fused kernels want head dims in multiples of 8
        q2 = torch.cat([q * self.scale, rel_h, rel_w], dim=-1)
        k2 = torch.cat([k, ind.expand(*k.shape[:2], -1, -1)], dim=-1)
        if pad:
            q2, k2 = F.pad(q2, (0, pad)), F.pad(k2, (0, pad))
        # fused kernels want one head dim for q, k and v: pad v with zeros, drop them after
        v2 = F.pad(v, (0, q2.shape[-1] - v.shape[-1]))
        return F.scaled_dot_product_attention(q2, k2, v2, scale=1.0)[..., : v.shape[-1]]


def enable_sdpa(module: nn.Module, enabled: bool = True, rel_pos_mode: str = "bias") -> nn.Module:
    """Switch every SAM image-encoder ``Attention`` inside ``module`` to or from :class:`SdpaAttention`.

    Only the class of each attention module is swapped (in place), so parameters, state-dict
    keys, devices, PEFT wrappers and hooks stay as they are; switching back restores the stock
    forward exactly. Other subclasses of ``Attention`` (with their own forward) are left alone.

    Args:
        module: any model (a ``Sam``, an ``ImageEncoderViT``, a method network...).
        enabled: True for the SDPA forward, False for ``segment_anything``'s.
        rel_pos_mode: ``"bias"`` or ``"fold"`` (see :class:`SdpaAttention`); used when enabling.

    Returns:
        ``module`` itself (so configs can write ``$shared_nets.sam.enable_sdpa(@network_def)``).
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}.")
    if rel_pos_mode not in REL_POS_MODES:
        raise ValueError(f"rel_pos_mode must be one of {REL_POS_MODES}, got {rel_pos_mode!r}.")
    for m in module.modules():
        if enabled and type(m) in (Attention, SdpaAttention):
            m.__class__ = SdpaAttention
            m.rel_pos_mode = rel_pos_mode
        elif not enabled and type(m) is SdpaAttention:
            m.__class__ = Attention
            m.__dict__.pop("rel_pos_mode", None)
    return module


def is_sdpa_enabled(module: nn.Module) -> bool:
    """Whether ``module`` holds at least one :class:`SdpaAttention`."""
    return any(isinstance(m, SdpaAttention) for m in module.modules())
