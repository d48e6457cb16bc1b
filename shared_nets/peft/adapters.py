"""Token adapters: a bottleneck adapter (Med-SA) and MA-SAM's 3D adapter with a convolution across slices."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import check_positive_int

__all__ = ["BottleneckAdapter", "Adapter3D"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


def _make_act(act: str) -> nn.Module:
    if act not in _ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)}, got {act!r}.")
    return _ACTIVATIONS[act]()


def _check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}.")
    return float(scale)


class BottleneckAdapter(nn.Module):
    """Bottleneck adapter ``f(x) = W_up · act(W_down · x)`` (Med-SA sec. "Med-SA architecture", Fig. 2).

    Returns ``x + scale · f(x)`` with ``skip`` (Med-SA's adapter after attention) or
    ``scale · f(x)`` without (its adapter parallel to the MLP, scaled by ``s``; code: 0.5).
    The paper uses ReLU, the official code GELU.

    These adapters change the block's computation and cannot be folded into SAM's weights:
    :func:`shared_nets.peft.export_merged_state_dict` refuses them unless told to drop them.

    Args:
        dim: token width.
        hidden_dim: bottleneck width.
        act: ``"relu"`` or ``"gelu"``.
        skip: add the input back.
        scale: factor on the adapter branch.
        zero_init: zero the up-projection (weight and bias), so the adapter starts as the
            identity (``skip``) or as zero (no ``skip``).

    Shapes:
        ``x [..., dim] -> [..., dim]``.
    """

    peft_unmergeable = True

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act: str = "relu",
        skip: bool = True,
        scale: float = 1.0,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        self.skip = bool(skip)
        self.scale = _check_scale(scale)
        self.down = nn.Linear(dim, hidden_dim)
        self.act = _make_act(act)
        self.up = nn.Linear(hidden_dim, dim)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension {self.dim} (dim), got shape {tuple(x.shape)}.")
        out = self.up(self.act(self.down(x))) * self.scale
        return x + out if self.skip else out

    def extra_repr(self) -> str:
        return f"skip={self.skip}, scale={self.scale:g}"


class Adapter3D(nn.Module):
    """MA-SAM's 3D adapter, eq. 3: ``M + σ(Conv3D(Norm(M) · W_down)) · W_up`` (paper sec. 3.3).

    The token maps of the ``N`` slices of each volume are stacked along a depth axis, so the
    ``Conv3d`` (kernel ``(3, 1, 1)`` by default) mixes information across neighbouring slices;
    padding keeps every size. As in the official code the Linears follow ``bias`` (False)
    while the convolution has a bias. Deliberate difference: the official code initialises
    ``W_up`` randomly; with ``zero_init`` (default) we zero it so the adapted SAM starts
    exactly at SAM.

    Args:
        dim: token width ``C``.
        hidden_dim: adapter width ``c`` (MA-SAM 384).
        kernel_size: Conv3d kernel over ``(slices, h, w)``; odd sizes only.
        act: ``"gelu"`` or ``"relu"``.
        use_norm: LayerNorm (eps 1e-6, as SAM's blocks) before the down-projection.
        bias: bias of the two Linears.
        zero_init: zero the up-projection.

    Shapes:
        ``forward(x [B*N, h, w, C], num_slices=N) -> [B*N, h, w, C]`` with the ``N`` slices of
        each volume consecutive along the first axis.
    """

    peft_unmergeable = True

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        kernel_size: int | tuple[int, int, int] = (3, 1, 1),
        act: str = "gelu",
        use_norm: bool = True,
        bias: bool = False,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(ks) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 and k % 2 for k in ks):
            raise ValueError(f"kernel_size must be an odd positive int or three of them, got {kernel_size!r}.")
        self.kernel_size = ks
        self.norm = nn.LayerNorm(dim, eps=1e-6) if use_norm else nn.Identity()
        self.down = nn.Linear(dim, hidden_dim, bias=bias)
        self.conv = nn.Conv3d(hidden_dim, hidden_dim, ks, padding=tuple(k // 2 for k in ks))
        self.act = _make_act(act)
        self.up = nn.Linear(hidden_dim, dim, bias=bias)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            if self.up.bias is not None:
                nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, num_slices: int) -> torch.Tensor:
        """Args:
            x: tokens ``[B*N, h, w, C]``.
            num_slices: ``N``, the slices per volume.

        Returns:
            ``[B*N, h, w, C]``.
        """
        if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices <= 0:
            raise ValueError(f"num_slices must be a positive integer, got {num_slices!r}.")
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B*N, h, w, {self.dim}] (dim={self.dim}), got shape {tuple(x.shape)}.")
        bn, h, w, _ = x.shape
        if bn % num_slices:
            raise ValueError(f"x.shape[0] ({bn}) must be divisible by num_slices ({num_slices}).")
        z = self.down(self.norm(x))  # [B*N, h, w, c]
        z = z.reshape(bn // num_slices, num_slices, h, w, self.hidden_dim).permute(0, 4, 1, 2, 3)  # [B, c, N, h, w]
        z = self.conv(z)
        z = z.permute(0, 2, 3, 4, 1).reshape(bn, h, w, self.hidden_dim)
        return x + self.up(self.act(z))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"
