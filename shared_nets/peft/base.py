"""Common base of the weight-delta PEFT layers (LoRA, FacT, SVD), following Hugging Face ``peft``'s layer contract."""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = [
    "PeftLayer",
    "QKV_TARGETS",
    "check_base_layer",
    "check_dropout",
    "check_positive_int",
    "check_targets",
    "get_encoder",
    "get_qkv",
    "qkv_rows",
    "QKVRowsMixin",
]

#: Order of the three projections inside SAM's fused ``Attention.qkv`` output ([q | k | v] along the last axis).
QKV_TARGETS: tuple[str, ...] = ("q", "k", "v")


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is a positive ``int``, else raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def check_dropout(value: object, name: str = "dropout") -> float:
    """Return ``value`` as a float if it is a probability in ``[0, 1)``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
    return float(value)


def check_targets(targets: object, name: str = "targets") -> tuple[str, ...]:
    """Validate a non-empty, duplicate-free selection of ``"q"``, ``"k"``, ``"v"``; returned in q, k, v order."""
    if isinstance(targets, str):
        targets = tuple(targets) if set(targets) <= set(QKV_TARGETS) and targets else (targets,)
    try:
        items = tuple(targets)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a non-empty subset of {QKV_TARGETS}, got {targets!r}.") from None
    if not items or len(set(items)) != len(items) or any(t not in QKV_TARGETS for t in items):
        raise ValueError(f"{name} must be a non-empty subset of {QKV_TARGETS} without repeats, got {targets!r}.")
    return tuple(t for t in QKV_TARGETS if t in items)


def check_base_layer(base_layer: object, types: type | tuple[type, ...], expected: str) -> None:
    """Raise ``ValueError`` if ``base_layer`` is already a PEFT layer or not an instance of ``types``."""
    if isinstance(base_layer, PeftLayer):
        raise ValueError(
            f"base_layer is already a PEFT layer ({type(base_layer).__name__}); stacking PEFT layers is not supported."
        )
    if not isinstance(base_layer, types):
        raise ValueError(f"base_layer must be {expected}, got {base_layer!r}.")


def get_encoder(module: nn.Module, name: str = "encoder") -> nn.Module:
    """The SAM image encoder in ``module``: ``module`` itself, or its ``image_encoder``.

    An encoder is a module with non-empty ``blocks``: SAM's ``ImageEncoderViT`` (an
    ``nn.ModuleList``) or LiteMedSAM's ``TinyViTEncoder`` (a list of its attention blocks over
    all stages, whose widths differ per stage).

    Raises:
        ValueError: if neither has non-empty ``blocks``.
    """
    for candidate in (module, getattr(module, "image_encoder", None)):
        blocks = getattr(candidate, "blocks", None)
        if (
            isinstance(candidate, nn.Module)
            and isinstance(blocks, (nn.ModuleList, list, tuple))
            and len(blocks) > 0
            and all(isinstance(b, nn.Module) for b in blocks)
        ):
            return candidate
    raise ValueError(
        f"{name} must be a SAM ImageEncoderViT (with a non-empty `blocks` ModuleList) or a model with one as "
        f"`image_encoder`, got {type(module).__name__}."
    )


def get_qkv(block: nn.Module, index: int) -> nn.Linear:
    """``block.attn.qkv`` of encoder block ``index``, checked to be a plain fused ``nn.Linear(dim, 3*dim)``."""
    qkv = getattr(getattr(block, "attn", None), "qkv", None)
    if isinstance(qkv, PeftLayer):
        raise ValueError(
            f"blocks[{index}].attn.qkv is already wrapped by {type(qkv).__name__}; inject PEFT layers once."
        )
    if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
        raise ValueError(f"blocks[{index}].attn.qkv must be SAM's fused nn.Linear(dim, 3*dim), got {qkv!r}.")
    return qkv


def qkv_rows(block: nn.Module, targets: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """Output rows of ``block.attn.qkv`` per target when they are not SAM's ``[q | k | v]`` thirds.

    LiteMedSAM's TinyViT attention lays its fused output out per head (``[q_h, k_h, v_h]`` for each
    head ``h``) and says where each part lies through ``attn.qkv_slices(part)``; SAM's ViT has no
    such method and uses contiguous thirds (returned as None).
    """
    slices = getattr(getattr(block, "attn", None), "qkv_slices", None)
    if slices is None:
        return None
    return {t: slices(t) for t in targets}


class QKVRowsMixin:
    """Where each target's ``dim`` outputs lie in a fused ``qkv``: SAM's thirds, or given row indices.

    Subclasses call :meth:`_init_rows` after ``nn.Module.__init__`` and use :meth:`_add_to_target`
    in the forward pass and :meth:`_target_rows` to fill a weight delta.
    """

    def _init_rows(self, rows: dict[str, torch.Tensor] | None, targets: tuple[str, ...], dim: int) -> None:
        self.custom_rows = rows is not None
        if rows is None:
            return
        for t in targets:
            idx = rows.get(t) if isinstance(rows, dict) else None
            if not isinstance(idx, torch.Tensor) or idx.ndim != 1 or idx.numel() != dim or idx.dtype != torch.long:
                raise ValueError(f"rows[{t!r}] must be a 1D long tensor of {dim} output rows of qkv, got {idx!r}.")
            if int(idx.min()) < 0 or int(idx.max()) >= 3 * dim:
                raise ValueError(f"rows[{t!r}] must index qkv's {3 * dim} output rows.")
            self.register_buffer(f"rows_{t}", idx.clone(), persistent=False)

    def _target_rows(self, t: str, dim: int) -> slice | torch.Tensor:
        if self.custom_rows:
            return getattr(self, f"rows_{t}")
        i = QKV_TARGETS.index(t)
        return slice(i * dim, (i + 1) * dim)

    def _add_to_targets(self, out: torch.Tensor, deltas: dict[str, torch.Tensor], dim: int) -> torch.Tensor:
        """``out`` ``[..., 3*dim]`` plus each target's ``[..., dim]`` delta on that target's rows."""
        if self.custom_rows:
            for t, d in deltas.items():
                out = out.index_add(-1, getattr(self, f"rows_{t}"), d.to(out.dtype))
            return out
        parts = list(out.split(dim, dim=-1))
        for t, d in deltas.items():
            i = QKV_TARGETS.index(t)
            parts[i] = parts[i] + d
        return torch.cat(parts, dim=-1)


class PeftLayer(nn.Module):
    """A frozen ``base_layer`` plus a trainable weight delta that can be folded in and out.

    The contract is Hugging Face ``peft``'s LoRA layer: ``get_delta_weight()`` returns the
    delta with the base weight's shape, ``merge()`` adds it to the base weight in place (the
    forward pass then runs the base layer alone), ``unmerge()`` subtracts it again. While
    unmerged the forward pass is the subclass's :meth:`adapted_forward`.

    The wrapped layer stays reachable: ``weight`` and ``bias`` delegate to ``base_layer``
    (so code that reads ``attn.qkv.weight`` keeps working; it sees the merged weight only
    when merged), as do ``in_features``/``out_features`` and the convolution attributes.

    The merged state is not saved in ``state_dict()``: save unmerged models (or use
    :func:`shared_nets.peft.export_merged_state_dict`), and load into unmerged ones.

    Args:
        base_layer: the layer to adapt; it must have a ``weight``. Its parameters are frozen.
    """

    _delegated_attributes = (
        "in_features",
        "out_features",
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    )

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if isinstance(base_layer, PeftLayer):
            raise ValueError(
                f"base_layer is already a PEFT layer ({type(base_layer).__name__}); "
                "stacking PEFT layers is not supported."
            )
        if not isinstance(base_layer, nn.Module) or not isinstance(getattr(base_layer, "weight", None), torch.Tensor):
            raise ValueError(f"base_layer must be an nn.Module with a weight tensor, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self._merged = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is not None and name in PeftLayer._delegated_attributes:
                return getattr(base, name)
            raise

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (includes the delta only while merged)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's (frozen) bias."""
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        """Whether the delta is currently folded into ``base_layer.weight``."""
        return self._merged

    def get_delta_weight(self) -> torch.Tensor:
        """The weight delta, same shape as ``base_layer.weight``."""
        raise NotImplementedError

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward pass of base layer + delta (unmerged)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged:
            return self.base_layer(x)
        return self.adapted_forward(x)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A detached copy of the weight the layer currently computes with: base + delta.

        Returns:
            Tensor shaped like ``base_layer.weight``; the model is not modified.
        """
        weight = self.base_layer.weight
        if self._merged:
            return weight.detach().clone()
        return weight.detach() + self.get_delta_weight().to(weight.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the delta into ``base_layer.weight`` (in place).

        Args:
            safe_merge: compute the merged weight out of place first and raise ``ValueError``
                (leaving the layer untouched) if it has NaN or Inf entries.
        """
        if self._merged:
            warnings.warn(f"{type(self).__name__} is already merged; nothing to do.", stacklevel=2)
            return
        weight = self.base_layer.weight
        delta = self.get_delta_weight().to(weight.dtype)
        if safe_merge:
            new_weight = weight + delta
            if not torch.isfinite(new_weight).all():
                raise ValueError(
                    f"safe_merge: the merged weight of {type(self).__name__} has NaN/Inf entries; "
                    "the layer was left unmerged."
                )
            weight.copy_(new_weight)
        else:
            weight.add_(delta)
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta from ``base_layer.weight`` again (recomputed from the current parameters)."""
        if not self._merged:
            warnings.warn(f"{type(self).__name__} is not merged; nothing to do.", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.sub_(self.get_delta_weight().to(weight.dtype))
        self._merged = False
