"""LoRA (Hu et al. 2021) for any ``nn.Linear`` and for the q/k/v slices of SAM's fused ``qkv`` (SAMed, H-SAM)."""

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

__all__ = ["LoRALinear", "LoRAQKV", "inject_lora"]


def _check_alpha(alpha: float | None, r: int) -> float:
    if alpha is None:
        return float(r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number or None (meaning alpha = r), got {alpha!r}.")
    return float(alpha)


def _lora_pair(in_features: int, out_features: int, r: int, like: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    """A (default ``nn.Linear`` init, i.e. Kaiming-uniform as in ``peft``) and B (zeros), on ``like``'s device/dtype."""
    kw = {"device": like.device, "dtype": like.dtype}
    lora_a = nn.Linear(in_features, r, bias=False, **kw)
    lora_b = nn.Linear(r, out_features, bias=False, **kw)
    nn.init.zeros_(lora_b.weight)
    return lora_a, lora_b


class LoRALinear(PeftLayer):
    """LoRA on an ``nn.Linear``: ``y = W x + b + (alpha / r) · B A dropout(x)`` (LoRA paper eq. 3).

    Args:
        base_layer: the ``nn.Linear`` to adapt (frozen).
        r: rank of the update.
        alpha: scaling numerator; ``None`` means ``alpha = r`` (scaling 1, as SAMed).
        dropout: dropout probability on the LoRA branch input.

    Shapes:
        ``x [..., in_features] -> [..., out_features]``.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        check_base_layer(base_layer, nn.Linear, "an nn.Linear")
        super().__init__(base_layer)
        self.r = check_positive_int(r, "r")
        self.alpha = _check_alpha(alpha, r)
        self.scaling = self.alpha / self.r
        p = check_dropout(dropout)
        self.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.lora_A, self.lora_B = _lora_pair(base_layer.in_features, base_layer.out_features, r, base_layer.weight)

    def get_delta_weight(self) -> torch.Tensor:
        """``scaling · B A``, shape ``[out_features, in_features]``."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}"


class LoRAQKV(QKVRowsMixin, PeftLayer):
    """LoRA on selected q/k/v slices of SAM's fused ``Attention.qkv`` (SAMed sec. 3.2: q and v).

    Each target gets its own ``A [r, dim]`` / ``B [dim, r]`` pair (B zero-initialised) in
    ``lora_A[t]`` / ``lora_B[t]``; the update ``(alpha / r) · B_t A_t x`` is added to that
    target's ``dim`` output channels (SAM orders the fused output as ``[q | k | v]``).

    Args:
        base_layer: SAM's ``nn.Linear(dim, 3 * dim)``.
        r: rank of each update.
        targets: any of ``"q"``, ``"k"``, ``"v"``.
        alpha: scaling numerator; ``None`` means ``alpha = r``.
        dropout: dropout probability on the LoRA branch input.
        rows: per target, the ``dim`` output rows of ``base_layer`` it owns, for fused layouts other
            than SAM's ``[q | k | v]`` (LiteMedSAM's per-head layout, see
            :func:`~shared_nets.peft.base.qkv_rows`); None: SAM's thirds.

    Shapes:
        ``x [..., dim] -> [..., 3 * dim]``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        targets: Sequence[str] = ("q", "v"),
        alpha: float | None = None,
        dropout: float = 0.0,
        rows: dict[str, torch.Tensor] | None = None,
    ) -> None:
        check_base_layer(base_layer, nn.Linear, "a fused qkv nn.Linear(dim, 3*dim)")
        if base_layer.out_features != 3 * base_layer.in_features:
            raise ValueError(f"base_layer must be a fused qkv nn.Linear(dim, 3*dim), got {base_layer!r}.")
        super().__init__(base_layer)
        self.r = check_positive_int(r, "r")
        self.targets = check_targets(targets)
        self.alpha = _check_alpha(alpha, r)
        self.scaling = self.alpha / self.r
        self.dim = base_layer.in_features
        p = check_dropout(dropout)
        self.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        for t in self.targets:
            self.lora_A[t], self.lora_B[t] = _lora_pair(self.dim, self.dim, r, base_layer.weight)
        self._init_rows(rows, self.targets, self.dim)

    def get_delta_weight(self) -> torch.Tensor:
        """Zero except the target rows, shape ``[3 * dim, dim]``."""
        weight = self.base_layer.weight
        delta = torch.zeros(weight.shape, device=weight.device, dtype=self.lora_A[self.targets[0]].weight.dtype)
        for t in self.targets:
            delta[self._target_rows(t, self.dim)] = (self.lora_B[t].weight @ self.lora_A[t].weight) * self.scaling
        return delta

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        deltas = {t: self.lora_B[t](self.lora_A[t](self.lora_dropout(x))) * self.scaling for t in self.targets}
        return self._add_to_targets(self.base_layer(x), deltas, self.dim)

    def extra_repr(self) -> str:
        return f"r={self.r}, targets={self.targets}, alpha={self.alpha:g}, merged={self.merged}"


def inject_lora(
    encoder: nn.Module,
    r: int,
    targets: Sequence[str] = ("q", "v"),
    alpha: float | None = None,
    dropout: float = 0.0,
    blocks: Sequence[int] | None = None,
) -> list[LoRAQKV]:
    """Replace ``encoder.blocks[i].attn.qkv`` by :class:`LoRAQKV` layers, in place (SAMed / H-SAM encoder).

    Only the wrapped qkv weights are frozen here; freeze the rest of the model with
    :func:`shared_nets.peft.freeze_except`.

    Args:
        encoder: a SAM ``ImageEncoderViT`` or LiteMedSAM ``TinyViTEncoder`` (its per-head qkv
            layout is followed), after its (pretrained) weights are loaded.
        r: LoRA rank (H-SAM paper 4, its code and SAMed 4/5).
        targets: projections to adapt.
        alpha: scaling numerator; ``None`` means ``alpha = r``.
        dropout: LoRA dropout probability.
        blocks: indices of the blocks to adapt (negative indices allowed); ``None`` = all.

    Returns:
        The new layers, in block order.
    """
    all_blocks = get_encoder(encoder).blocks
    n = len(all_blocks)
    if blocks is None:
        indices = list(range(n))
    else:
        try:
            indices = [int(i) for i in blocks]
        except (TypeError, ValueError):
            raise ValueError(f"blocks must be None or a sequence of block indices, got {blocks!r}.") from None
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise ValueError(f"blocks must index the encoder's {n} blocks (range [-{n}, {n})), got {bad}.")
        indices = sorted({i % n for i in indices})
    qkvs = [get_qkv(all_blocks[i], i) for i in indices]  # validate all before changing anything
    layers = []
    for i, qkv in zip(indices, qkvs):
        rows = qkv_rows(all_blocks[i], check_targets(targets))
        layer = LoRAQKV(qkv, r=r, targets=targets, alpha=alpha, dropout=dropout, rows=rows).train(qkv.training)
        all_blocks[i].attn.qkv = layer
        layers.append(layer)
    return layers
