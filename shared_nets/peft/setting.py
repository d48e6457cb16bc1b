"""One ``peft`` setting for any SAM image encoder: LoRA, FacT, SVD, bottleneck adapters, full or frozen.

:func:`apply_peft` injects the chosen method into a built (checkpoint-loaded) encoder and returns the
parameter-name globs that :func:`shared_nets.peft.freeze_except` must keep trainable for it, so a
network combines them with the globs of its own extra modules. :func:`inject_adapters` gives encoders
whose paper has no adapters (SAM ViT and LiteMedSAM TinyViT blocks) Med-SA's adapter placement
(Wu et al., Med-SA, Fig. 1b; AdaptFormer's parallel MLP adapter): a serial adapter with skip on the
attention output and a scaled adapter parallel to the MLP on its normalised input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .adapters import BottleneckAdapter
from .base import get_encoder
from .fact import inject_fact
from .lora import inject_lora
from .svd import inject_svd

__all__ = [
    "PEFT_METHODS",
    "SVD_TARGETS_TINY_VIT",
    "SVD_TARGETS_VIT",
    "apply_peft",
    "check_peft",
    "inject_adapters",
    "log_peft_build",
    "peft_globs",
    "resolve_peft",
    "svd_targets",
]

#: The values of a ``peft`` setting: weight-delta methods (mergeable), adapters (not mergeable), all or nothing.
PEFT_METHODS: tuple[str, ...] = ("lora", "fact", "svd", "adapter", "full", "frozen")

#: Layers singular-value tuning re-parameterises in a SAM ViT block, plus the neck's convolutions
#: (S-SAM paper section 3 "SVD-based Tuning"; neck: official S-SAM code).
SVD_TARGETS_VIT: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2", "neck")
#: The same layers in a LiteMedSAM TinyViT block (its MLP's linears are ``fc1``/``fc2``), plus the neck.
SVD_TARGETS_TINY_VIT: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "neck")


def check_peft(value: object, name: str = "peft") -> str:
    """Return ``value`` if it is one of :data:`PEFT_METHODS`, else raise a one-line ``ValueError`` naming ``name``."""
    if not isinstance(value, str) or value not in PEFT_METHODS:
        raise ValueError(f"{name} must be one of {list(PEFT_METHODS)}, got {value!r}.")
    return value


def resolve_peft(peft: object, default: str, **aliases: object) -> str:
    """The ``peft`` setting a builder uses: ``peft``, else an old key's value, else the paper's ``default``.

    Old keys stay aliases: ``finetune="lora"`` means ``peft="lora"``, ``full_finetune=True`` means
    ``peft="full"`` (``False`` and ``None`` say nothing). A ``peft`` that contradicts an alias raises.

    Args:
        peft: the ``peft`` argument, one of :data:`PEFT_METHODS` or None.
        default: the paper's setting of the network.
        aliases: old key name → its value (``finetune``: a :data:`PEFT_METHODS` value; ``full_finetune``: bool).

    Raises:
        ValueError: one line naming the key whose value is not allowed, or both keys when they disagree.
    """
    chosen = None if peft is None else check_peft(peft)
    for name, value in aliases.items():
        if value is None or value is False:
            continue
        implied = "full" if value is True else check_peft(value, name)
        if chosen is None:
            chosen = implied
        elif chosen != implied:
            shown = "true" if value is True else repr(value)
            raise ValueError(f"peft={chosen!r} contradicts {name}={shown} (an old alias of peft); set only peft.")
    return check_peft(default, "default peft") if chosen is None else chosen


def peft_globs(peft: str, prefix: str = "") -> list[str]:
    """The ``freeze_except`` globs of an encoder's trainable parameters under ``peft`` (as :func:`apply_peft`)."""
    globs = {
        "lora": ["*.lora_*"],
        "fact": ["*fact_*"],
        "svd": ["*.scale", "*.shift"],
        "adapter": ["*.attn_adapter.*", "*.mlp_adapter.*"],
        "full": ["*"],
        "frozen": [],
    }[check_peft(peft)]
    return [prefix + g for g in globs]


def log_peft_build(model: nn.Module, name: str, peft: str) -> tuple[int, int]:
    """Log (INFO, logger ``shared_nets.peft``) and return ``(trainable, total)`` parameter counts of a built network.

    Every builder calls it last, so each network reports its trainable parameters under its ``peft`` setting.
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logging.getLogger("shared_nets.peft").info(
        "%s (peft=%s): %d of %d parameters trainable (%.2f %%)", name, peft, trainable, total, 100 * trainable / total
    )
    return trainable, total


def _has_conv_neck(encoder: nn.Module) -> bool:
    neck = getattr(encoder, "neck", None)
    return isinstance(neck, nn.Sequential) and any(isinstance(m, nn.Conv2d) for m in neck)


def svd_targets(encoder: nn.Module) -> tuple[str, ...]:
    """The ``include`` paths of :func:`~shared_nets.peft.inject_svd` for ``encoder``'s block type.

    SAM ViT blocks (MLP ``lin1``/``lin2``) get :data:`SVD_TARGETS_VIT`, TinyViT blocks (MLP
    ``fc1``/``fc2``) :data:`SVD_TARGETS_TINY_VIT`; ``"neck"`` is left out when the encoder has no
    ``nn.Sequential`` neck of convolutions (e.g. an encoder whose necks are 3D).

    Args:
        encoder: a SAM image encoder, or a model with one as ``image_encoder``.

    Raises:
        ValueError: if the first block's MLP has neither naming.
    """
    enc = get_encoder(encoder)
    mlp = getattr(enc.blocks[0], "mlp", None)
    if isinstance(getattr(mlp, "lin1", None), nn.Module):
        targets = SVD_TARGETS_VIT
    elif isinstance(getattr(mlp, "fc1", None), nn.Module):
        targets = SVD_TARGETS_TINY_VIT
    else:
        raise ValueError(
            f"encoder blocks[0] ({type(enc.blocks[0]).__name__}) has no `mlp.lin1` (SAM ViT) or `mlp.fc1` (TinyViT); "
            "pass svd_include explicitly."
        )
    return targets if _has_conv_neck(enc) else tuple(t for t in targets if t != "neck")


class AttentionAdapter(BottleneckAdapter):
    """A :class:`BottleneckAdapter` with skip on a block's attention output, run by a forward hook on ``attn``.

    The hook is this module's bound method :meth:`hook` (no closure), so ``copy.deepcopy`` of the
    encoder rebinds the copied hook to the copied adapter. Not mergeable (inherited).
    """

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of ``attn``: ``output + scale · f(output)``."""
        return self(output)


class MlpAdapter(BottleneckAdapter):
    """A scaled :class:`BottleneckAdapter` parallel to a block's MLP, run by a forward hook on ``mlp``.

    Its input is the MLP's normalised input: SAM's ViT normalises before ``mlp`` (``norm2``), so the
    hook's input is used as is; TinyViT's MLP normalises inside (``mlp.norm``), which the hook applies.

    Args:
        norm_input: apply the hooked MLP's own ``norm`` to its input first (TinyViT).
        Others: as :class:`BottleneckAdapter`.
    """

    def __init__(self, *args, norm_input: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm_input = bool(norm_input)

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of ``mlp``: ``output + scale · f(x)`` with ``x`` the MLP's (normalised) input."""
        x = args[0]
        if self.norm_input:
            x = module.norm(x)
        return output + self(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm_input={self.norm_input}"


def _block_width(block: nn.Module, index: int) -> int:
    for norm in (getattr(block, "norm1", None), getattr(getattr(block, "attn", None), "norm", None)):
        if isinstance(norm, nn.LayerNorm):
            return int(norm.normalized_shape[0])
    raise ValueError(
        f"blocks[{index}] ({type(block).__name__}) has neither `norm1` (SAM ViT) nor `attn.norm` (TinyViT) "
        "to read its width from."
    )


def inject_adapters(
    encoder: nn.Module, ratio: float = 0.25, act: str = "relu", scale: float = 0.5
) -> list[BottleneckAdapter]:
    """Add ``attn_adapter`` and ``mlp_adapter`` to every encoder block, in place (Med-SA Fig. 1b placement).

    Per block: ``blk.attn_adapter`` (:class:`AttentionAdapter`, skip) on the attention output before
    the residual, and ``blk.mlp_adapter`` (:class:`MlpAdapter`, no skip, factor ``scale``) added to
    the MLP output, fed the MLP's normalised input. Both are zero-initialised (the encoder's output
    is unchanged until they train) and unmergeable. They run as forward hooks on ``blk.attn`` and
    ``blk.mlp``, so block classes, SAM's state-dict keys and class swaps on blocks or attention
    (SDPA, gradient checkpointing) are untouched; the new keys are ``blocks.{i}.{attn,mlp}_adapter.*``.
    Adapters are created on the device and dtype of their block's weights.

    Args:
        encoder: a SAM ``ImageEncoderViT`` or LiteMedSAM ``TinyViTEncoder`` (or a model with one as
            ``image_encoder``); blocks need ``attn`` and ``mlp`` and a ``norm1`` or ``attn.norm``.
        ratio: bottleneck width / block width, in ``(0, 1]``; width ``max(1, round(dim * ratio))``.
        act: ``"relu"`` (Med-SA paper) or ``"gelu"`` (its code).
        scale: factor on the MLP adapter (Med-SA ``s``, code 0.5).

    Returns:
        The new adapters, block by block (attention adapter, then MLP adapter).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"adapter ratio must be a number in (0, 1], got {ratio!r}.")
    blocks = get_encoder(encoder).blocks
    plan = []
    for i, blk in enumerate(blocks):  # validate all before changing anything
        if hasattr(blk, "attn_adapter") or hasattr(blk, "mlp_adapter"):
            raise ValueError(f"blocks[{i}] already has adapters; inject_adapters must be called once per encoder.")
        if not all(isinstance(getattr(blk, name, None), nn.Module) for name in ("attn", "mlp")):
            raise ValueError(f"blocks[{i}] ({type(blk).__name__}) must have `attn` and `mlp` modules for adapters.")
        dim = _block_width(blk, i)
        norm_input = isinstance(getattr(blk.mlp, "norm", None), nn.LayerNorm)
        plan.append((blk, dim, max(1, round(dim * ratio)), norm_input))
    adapters: list[BottleneckAdapter] = []
    for blk, dim, hidden, norm_input in plan:
        like = next(blk.parameters())
        attn_adapter = AttentionAdapter(dim, hidden, act=act, skip=True).to(like)
        mlp_adapter = MlpAdapter(dim, hidden, act=act, skip=False, scale=scale, norm_input=norm_input).to(like)
        blk.attn_adapter, blk.mlp_adapter = attn_adapter.train(blk.training), mlp_adapter.train(blk.training)
        blk.attn.register_forward_hook(attn_adapter.hook)
        blk.mlp.register_forward_hook(mlp_adapter.hook)
        adapters += [attn_adapter, mlp_adapter]
    return adapters


def apply_peft(
    encoder: nn.Module,
    peft: str,
    *,
    lora_rank: int = 4,
    lora_alpha: float | None = None,
    fact_rank: int = 32,
    fact_dropout: float = 0.1,
    fact_scale: float = 1.0,
    targets: Sequence[str] = ("q", "v"),
    svd_include: Sequence[str] | None = None,
    adapter_ratio: float = 0.25,
    prefix: str = "",
) -> list[str]:
    """Inject ``peft`` into ``encoder`` in place and return the globs of the encoder parameters it trains.

    ===========  ====================================================  ==============================
    ``peft``     injected                                              returned globs (after ``prefix``)
    ===========  ====================================================  ==============================
    ``lora``     :func:`inject_lora` on ``attn.qkv`` (``targets``)     ``*.lora_*``
    ``fact``     :func:`inject_fact` on ``attn.qkv`` (``targets``)     ``*fact_*``
    ``svd``      :func:`inject_svd` (``svd_include`` or                ``*.scale``, ``*.shift``
                 :func:`svd_targets`)
    ``adapter``  :func:`inject_adapters` (``adapter_ratio``)           ``*.attn_adapter.*``, ``*.mlp_adapter.*``
    ``full``     nothing                                               ``*`` (the whole encoder)
    ``frozen``   nothing                                               none
    ===========  ====================================================  ==============================

    The caller freezes with :func:`shared_nets.peft.freeze_except` over its whole network, adding the
    globs of its own trained modules. lora, fact and svd merge into SAM's weights
    (:func:`shared_nets.peft.merge_peft`); adapters do not.

    Args:
        encoder: a SAM image encoder (or a model with one as ``image_encoder``), weights loaded.
        peft: one of :data:`PEFT_METHODS`.
        lora_rank: LoRA rank.
        lora_alpha: LoRA scaling numerator; None means ``alpha = r``.
        fact_rank: FacT rank.
        fact_dropout: FacT branch dropout.
        fact_scale: FacT scaling ``s``.
        targets: q/k/v projections for LoRA and FacT.
        svd_include: layers for SVD tuning; None: :func:`svd_targets`.
        adapter_ratio: adapter bottleneck width / block width.
        prefix: the encoder's name in the network plus a dot (e.g. ``"sam.image_encoder."``), put
            before every glob; ``""`` when the encoder is the model being frozen.

    Returns:
        The ``freeze_except`` globs of the encoder's trainable parameters for ``peft``.
    """
    check_peft(peft)
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a string (the encoder's name plus a dot, or ''), got {prefix!r}.")
    if peft == "lora":
        inject_lora(encoder, lora_rank, targets, alpha=lora_alpha)
    elif peft == "fact":
        inject_fact(encoder, fact_rank, targets, dropout=fact_dropout, scale=fact_scale)
    elif peft == "svd":
        inject_svd(encoder, include=svd_targets(encoder) if svd_include is None else svd_include)
    elif peft == "adapter":
        inject_adapters(encoder, adapter_ratio)
    return peft_globs(peft, prefix)
