"""FacT-TT (Jie & Deng 2023) on SAM's q and v projections, as used by MA-SAM (paper sec. 3.2)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import (
    PeftLayer,
    QKVRowsMixin,
    check_base_layer,
    check_dropout,
    check_positive_int,
    check_targets,
    get_encoder,
    get_qkv,
    qkv_rows,
)

__all__ = ["FacTFactors", "FacTQKV", "inject_fact"]


class FacTFactors(nn.Module):
    """The factors shared by all blocks: ``U [dim, rank]`` and ``V [rank, dim]`` (MA-SAM sec. 3.2).

    ``U`` starts as ``nn.Linear(dim, rank)``'s default (Kaiming-uniform, bound ``1/sqrt(dim)``)
    and ``V`` at zero, as in the official MA-SAM code, so every ``ΔW = s·U·Σ·V`` is zero at
    initialisation while ``V`` (and after one step ``U`` and the cores) receive gradients.

    Args:
        dim: token width of the encoder.
        rank: FacT rank ``r``.
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.rank = check_positive_int(rank, "rank")
        self.U = nn.Parameter(torch.empty(dim, rank))
        self.V = nn.Parameter(torch.empty(rank, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.U, -bound, bound)
        nn.init.zeros_(self.V)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}"


class FacTQKV(QKVRowsMixin, PeftLayer):
    """FacT-TT update of SAM's fused ``qkv``: per target ``t``, ``ΔW_t = s · U Σ_t V`` (MA-SAM sec. 3.2, eq. 2).

    ``U``/``V`` come from a :class:`FacTFactors` shared by all blocks; each block owns one
    ``r × r`` core ``Σ_t`` per target in ``fact_cores[t]`` (``nn.Linear(r, r)``-style
    uniform init). The forward pass adds ``s · dropout((x U) Σ_t) V`` to target ``t``'s slice.

    The shared factors are *not* registered in this layer (it keeps a plain reference), so
    they appear once in the model's ``named_parameters()`` / ``state_dict`` when registered
    once on the encoder, as :func:`inject_fact` does; a layer built directly must have its
    factors registered somewhere in the model by the caller.

    Args:
        base_layer: SAM's ``nn.Linear(dim, 3 * dim)``.
        factors: the shared :class:`FacTFactors` (``factors.dim == dim``).
        rank: FacT rank; must equal ``factors.rank``.
        targets: any of ``"q"``, ``"k"``, ``"v"`` (MA-SAM: q and v).
        dropout: dropout probability in the FacT branch (official code 0.1).
        scale: the scaling ``s`` (MA-SAM 1.0).
        rows: per target, the ``dim`` output rows of ``base_layer`` it owns (LiteMedSAM's per-head
            layout, see :func:`~shared_nets.peft.base.qkv_rows`); None: SAM's ``[q | k | v]`` thirds.

    Shapes:
        ``x [..., dim] -> [..., 3 * dim]``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        factors: FacTFactors,
        rank: int,
        targets: Sequence[str] = ("q", "v"),
        dropout: float = 0.1,
        scale: float = 1.0,
        rows: dict[str, torch.Tensor] | None = None,
    ) -> None:
        check_base_layer(base_layer, nn.Linear, "a fused qkv nn.Linear(dim, 3*dim)")
        if base_layer.out_features != 3 * base_layer.in_features:
            raise ValueError(f"base_layer must be a fused qkv nn.Linear(dim, 3*dim), got {base_layer!r}.")
        if not isinstance(factors, FacTFactors):
            raise ValueError(f"factors must be a FacTFactors, got {type(factors).__name__}.")
        check_positive_int(rank, "rank")
        if rank != factors.rank:
            raise ValueError(f"rank must equal factors.rank ({factors.rank}), got {rank}.")
        if factors.dim != base_layer.in_features:
            raise ValueError(f"factors.dim ({factors.dim}) must equal the qkv input width {base_layer.in_features}.")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}.")
        super().__init__(base_layer)
        # A plain tuple attribute: nn.Module does not register it, so the shared factors are
        # neither duplicated in named_parameters()/state_dict() nor moved twice by .to().
        self._factors_ref = (factors,)
        self.rank = rank
        self.targets = check_targets(targets)
        self.scale = float(scale)
        self.dim = base_layer.in_features
        p = check_dropout(dropout)
        self.fact_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        w = base_layer.weight
        self.fact_cores = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(rank, rank, device=w.device, dtype=w.dtype)) for t in self.targets}
        )
        self.reset_parameters()
        self._init_rows(rows, self.targets, self.dim)

    @property
    def factors(self) -> FacTFactors:
        """The shared :class:`FacTFactors`."""
        return self._factors_ref[0]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.rank)
        for core in self.fact_cores.values():
            nn.init.uniform_(core, -bound, bound)

    def get_delta_weight(self) -> torch.Tensor:
        """Zero except the target rows ``(s · U Σ_t V)ᵀ``, shape ``[3 * dim, dim]``."""
        u, v = self.factors.U, self.factors.V
        weight = self.base_layer.weight
        delta = torch.zeros(weight.shape, device=weight.device, dtype=u.dtype)
        for t in self.targets:
            delta[self._target_rows(t, self.dim)] = (self.scale * (u @ self.fact_cores[t] @ v)).T
        return delta

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.factors.U, self.factors.V
        out = self.base_layer(x)
        xu = x @ u  # [..., r], shared by the targets
        # Dropout after the core, before V: where the official MA-SAM code places it.
        deltas = {t: (self.fact_dropout(xu @ self.fact_cores[t]) @ v) * self.scale for t in self.targets}
        return self._add_to_targets(out, deltas, self.dim)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, targets={self.targets}, scale={self.scale:g}, merged={self.merged}"


def inject_fact(
    encoder: nn.Module,
    rank: int = 32,
    targets: Sequence[str] = ("q", "v"),
    dropout: float = 0.1,
    scale: float = 1.0,
) -> FacTFactors:
    """Wrap every block's ``attn.qkv`` in :class:`FacTQKV`, in place (MA-SAM sec. 3.2).

    The shared factors are registered once as ``encoder.fact_factors`` (parameter names
    ``fact_factors.U`` / ``fact_factors.V``); the per-block cores are
    ``blocks.{i}.attn.qkv.fact_cores.{q,v}``. An encoder whose blocks have several widths
    (LiteMedSAM's TinyViT: 128, 160, 320) gets one shared pair per width, in an
    ``nn.ModuleDict`` ``fact_factors`` keyed by the width (``fact_factors.160.U`` ...): FacT's
    factors span one weight space, and blocks of different widths have different ones.

    Args:
        encoder: a SAM ``ImageEncoderViT`` or LiteMedSAM ``TinyViTEncoder`` (per-head qkv
            layout followed) after its (pretrained) weights are loaded.
        rank: FacT rank (MA-SAM default 32; tiny SAM uses ``min(32, E/2)``).
        targets: projections to adapt.
        dropout: FacT branch dropout.
        scale: the scaling ``s``.

    Returns:
        The shared :class:`FacTFactors` (an ``nn.ModuleDict`` of them by width for several widths).
    """
    encoder = get_encoder(encoder)
    blocks = encoder.blocks
    if hasattr(encoder, "fact_factors"):
        raise ValueError("encoder already has `fact_factors`; inject_fact must be called once per encoder.")
    qkvs = [get_qkv(block, i) for i, block in enumerate(blocks)]  # validate all before changing anything
    widths = list(dict.fromkeys(qkv.in_features for qkv in qkvs))
    per_width = {w: FacTFactors(w, rank).to(next(q for q in qkvs if q.in_features == w).weight) for w in widths}
    targets = check_targets(targets)
    # New layers follow the train/eval mode of the layers they replace.
    layers = [
        FacTQKV(qkv, per_width[qkv.in_features], rank, targets, dropout, scale, rows=qkv_rows(block, targets)).train(
            qkv.training
        )
        for block, qkv in zip(blocks, qkvs)
    ]
    factors = per_width[widths[0]] if len(widths) == 1 else nn.ModuleDict({str(w): f for w, f in per_width.items()})
    encoder.fact_factors = factors
    for block, layer in zip(blocks, layers):
        block.attn.qkv = layer
    return factors
