"""Singular-value fine-tuning as in S-SAM: ``W' = U · diag(ReLU(a ⊙ Σ + b)) · Vᵀ`` with trainable ``a``, ``b``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .base import PeftLayer, check_base_layer, get_encoder

__all__ = ["SVDLinear", "SVDConv2d", "inject_svd"]

_FACTORS = ("U", "S", "Vh")


class _SVDLayer(PeftLayer):
    """Shared part of :class:`SVDLinear` / :class:`SVDConv2d` (S-SAM sec. "Method", singular-value tuning).

    The SVD of the base weight (viewed as ``[out, rest]``), computed in float64, is kept as
    float32 buffers ``U [out, k]``, ``S [k]``, ``Vh [k, rest]`` (``k = min(out, rest)``); they
    are persistent so a saved state dict restores the exact decomposition even into a model
    whose base weights were random at wrap time. Trainable ``scale`` (a, ones) and ``shift``
    (b, zeros) have shape ``[k]``; the bias stays frozen.

    The decomposition is taken lazily, of the base weight as it is when the factors are first
    needed (forward, :meth:`get_delta_weight`, :meth:`singular_values`, ``state_dict()``, reading
    ``U``/``S``/``Vh``): a model that is built and then given its weights by a state dict holding
    the factors (a trained bundle ``model.pt``) never decomposes anything, and base weights loaded
    after wrapping are the ones decomposed. Loading a state dict that holds this layer's base
    weight but not its factors marks them stale, to be recomputed from the loaded weight. Base
    weights changed in place by other means after the factors exist need :meth:`reset_svd`.

    Deliberate difference from the official S-SAM code, which rebuilds the weight from the
    factors alone: we keep the base weight and add ``U · diag(ReLU(a ⊙ Σ + b) − Σ) · Vᵀ``.
    This equals ``U · diag(ReLU(a ⊙ Σ + b)) · Vᵀ`` up to the float rounding of the SVD, and
    is *exactly* the base layer at initialisation (``a = 1``, ``b = 0``, ``Σ ≥ 0``).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight.detach()
        out, rest = weight.shape[0], weight[0].numel()
        self.rank = min(out, rest)
        # placeholders of the right shapes (load_state_dict checks them); filled by _ensure_svd
        self.register_buffer("U", torch.empty(out, self.rank, device=weight.device, dtype=torch.float32))
        self.register_buffer("S", torch.empty(self.rank, device=weight.device, dtype=torch.float32))
        self.register_buffer("Vh", torch.empty(self.rank, rest, device=weight.device, dtype=torch.float32))
        self._svd_pending = True
        self.scale = nn.Parameter(torch.ones(self.rank, device=weight.device, dtype=torch.float32))
        self.shift = nn.Parameter(torch.zeros(self.rank, device=weight.device, dtype=torch.float32))

    def __getattr__(self, name: str):
        if name in _FACTORS and self.__dict__.get("_svd_pending", False):
            self._ensure_svd()
        return super().__getattr__(name)

    @property
    def svd_pending(self) -> bool:
        """Whether the factors are still to be computed from the current base weight."""
        return self._svd_pending

    def reset_svd(self) -> None:
        """Mark the factors stale: they are recomputed from the base weight when next needed."""
        if self._merged:
            raise ValueError(f"{type(self).__name__} is merged; unmerge it before resetting its SVD.")
        self._svd_pending = True

    @torch.no_grad()
    def _ensure_svd(self) -> None:
        """Fill ``U``, ``S``, ``Vh`` with the SVD of the current base weight if they are pending."""
        if not self._svd_pending:
            return
        weight = self.base_layer.weight.detach()
        u, s, vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1).to(torch.float64), full_matrices=False)
        for name, value in (("U", u), ("S", s), ("Vh", vh)):
            buf = self._buffers[name]
            buf.copy_(value.to(device=buf.device, dtype=buf.dtype))
        self._svd_pending = False

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self._ensure_svd()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        has_factors = all(prefix + name in state_dict for name in _FACTORS)
        has_base = prefix + "base_layer.weight" in state_dict
        n_errors = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if has_factors and len(error_msgs) == n_errors:
            self._svd_pending = False  # the saved decomposition, exactly
        elif has_base:
            self._svd_pending = True  # new base weight without its factors: decompose it when needed

    def singular_values(self) -> torch.Tensor:
        """The adapted singular values ``ReLU(a ⊙ Σ + b)``, shape ``[k]``."""
        return F.relu(self.scale * self.S + self.shift)

    def get_delta_weight(self) -> torch.Tensor:
        """``U · diag(ReLU(a ⊙ Σ + b) − Σ) · Vᵀ`` reshaped like ``base_layer.weight``."""
        delta = (self.U * (self.singular_values() - self.S)) @ self.Vh
        return delta.reshape(self.base_layer.weight.shape)

    def _effective_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight + self.get_delta_weight().to(weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, merged={self.merged}"


class SVDLinear(_SVDLayer):
    """S-SAM singular-value tuning of an ``nn.Linear`` (see :class:`_SVDLayer`).

    Args:
        base_layer: the ``nn.Linear`` to re-parameterise (frozen).

    Shapes:
        ``x [..., in_features] -> [..., out_features]``.
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        check_base_layer(base_layer, nn.Linear, "an nn.Linear")
        super().__init__(base_layer)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._effective_weight(), self.base_layer.bias)


class SVDConv2d(_SVDLayer):
    """S-SAM singular-value tuning of an ``nn.Conv2d``; the weight is decomposed as ``[out, in·kh·kw]``.

    Args:
        base_layer: the ``nn.Conv2d`` to re-parameterise (frozen), e.g. SAM's neck convs.

    Shapes:
        ``x [B, in_channels, H, W] -> [B, out_channels, H', W']``.
    """

    def __init__(self, base_layer: nn.Conv2d) -> None:
        check_base_layer(base_layer, nn.Conv2d, "an nn.Conv2d")
        super().__init__(base_layer)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self._effective_weight(), self.base_layer.bias)


def _wrap(module: nn.Module, where: str) -> _SVDLayer:
    if isinstance(module, PeftLayer):
        raise ValueError(f"{where} is already wrapped by {type(module).__name__}; inject PEFT layers once.")
    if isinstance(module, nn.Linear):
        return SVDLinear(module)
    if isinstance(module, nn.Conv2d):
        return SVDConv2d(module)
    raise ValueError(f"{where} must be an nn.Linear or nn.Conv2d to re-parameterise, got {type(module).__name__}.")


def inject_svd(
    module: nn.Module,
    include: Sequence[str] = ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2", "neck"),
) -> list[_SVDLayer]:
    """Re-parameterise a SAM image encoder's layers for singular-value tuning, in place (S-SAM).

    With the defaults on ViT-B this adds 2 × (4 × 768) × 12 = 73,728 trainable values in
    the blocks and 2 × (256 + 256) = 1,024 in the neck.

    Args:
        module: a SAM ``ImageEncoderViT`` (or a model with one as ``image_encoder``), after
            its (pretrained) weights are loaded: the SVD is taken of the current weights.
        include: dotted paths inside every block (``"attn.qkv"``, ``"attn.proj"``,
            ``"mlp.lin1"``, ``"mlp.lin2"``, or any other Linear/Conv2d), plus ``"neck"`` for
            the neck's two convolutions.

    Returns:
        The new layers: block layers in block order (``include`` order within a block), then the neck's.
    """
    encoder = get_encoder(module, "module")
    if isinstance(include, str):
        include = (include,)
    include = tuple(include)
    if not include or len(set(include)) != len(include) or not all(isinstance(p, str) and p for p in include):
        raise ValueError(f"include must be a non-empty sequence of distinct dotted paths (or 'neck'), got {include!r}.")
    block_paths = [p for p in include if p != "neck"]

    # Resolve everything first so a bad path leaves the model unchanged.
    plan: list[tuple[nn.Module, str, nn.Module, str]] = []  # (parent, attribute, layer, readable name)
    for i, block in enumerate(encoder.blocks):
        for path in block_paths:
            parent_path, _, attr = path.rpartition(".")
            try:
                parent = block.get_submodule(parent_path) if parent_path else block
            except AttributeError:
                parent = None
            if parent is None or not isinstance(getattr(parent, attr, None), nn.Module):
                raise ValueError(f"include entry {path!r} is not a submodule of blocks[{i}] ({type(block).__name__}).")
            plan.append((parent, attr, getattr(parent, attr), f"blocks[{i}].{path}"))
    if "neck" in include:
        neck = getattr(encoder, "neck", None)
        convs = [(j, m) for j, m in enumerate(neck)] if isinstance(neck, nn.Sequential) else []
        convs = [(j, m) for j, m in convs if isinstance(m, (nn.Conv2d, PeftLayer))]
        if not convs:
            raise ValueError("include has 'neck' but the encoder has no nn.Sequential `neck` with Conv2d layers.")
        plan.extend((neck, str(j), m, f"neck[{j}]") for j, m in convs)
    for _, _, layer, where in plan:
        if isinstance(layer, PeftLayer) or not isinstance(layer, (nn.Linear, nn.Conv2d)):
            _wrap(layer, where)  # raises the explanatory ValueError

    wrapped = []
    for parent, attr, layer, where in plan:
        new = _wrap(layer, where).train(layer.training)
        setattr(parent, attr, new)
        wrapped.append(new)
    return wrapped
