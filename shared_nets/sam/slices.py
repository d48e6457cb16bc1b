"""Slice stacking for the 2D SAM networks: volume <-> slice batches, grey -> RGB, logit resizing, input checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_input", "slices_to_volume", "to_rgb", "upsample_to", "volume_to_slices"]


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Repeat a grey ``[N, 1, H, W]`` batch to SAM's 3 channels (3-channel input passes through)."""
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3:
        return x
    raise ValueError(f"image input must have 1 (grey) or 3 (RGB) channels, got {x.shape[1]}.")


def volume_to_slices(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W, D]`` → ``[B*D, C, H, W]`` with row order ``b*D + d``."""
    b, c, h, w, d = x.shape
    return x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)


def slices_to_volume(x: torch.Tensor, depth: int) -> torch.Tensor:
    """``[B*D, K, H, W]`` → ``[B, K, H, W, D]`` (inverse of :func:`volume_to_slices`)."""
    n, k, h, w = x.shape
    return x.reshape(n // depth, depth, k, h, w).permute(0, 2, 3, 4, 1)


def check_input(
    x: torch.Tensor, channels: int, img_size: int | None = None, depth: int | None = None, name: str = "network"
) -> None:
    """Raise ``ValueError`` naming what was expected when ``x`` is not ``[B, channels, H, W, D]``."""
    if x.ndim != 5:
        raise ValueError(f"{name}: expected a 5D input [B, C, H, W, D], got shape {tuple(x.shape)}.")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name}: expected {channels} input channel(s) (image + guidance), got {x.shape[1]} "
            f"in shape {tuple(x.shape)}."
        )
    if img_size is not None and tuple(x.shape[2:4]) != (img_size, img_size):
        raise ValueError(
            f"{name}: expected in-plane size {img_size}x{img_size} (the network's img_size; resize in pre-processing), "
            f"got {tuple(x.shape[2:4])}."
        )
    if depth is not None and x.shape[4] != depth:
        raise ValueError(f"{name}: expected {depth} slices along the last axis, got {x.shape[4]}.")


def upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[N, K, h, w]`` logits to ``size`` (no-op when already there)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
