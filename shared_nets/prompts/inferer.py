"""Prompted inference restricted to the region around the prompts: the union of the prompts plus a margin
(or a fixed patch centred on the clicks) is evaluated, background is written elsewhere, and a window without
a prompt never runs the decoder."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import convert_to_dst_type

__all__ = ["PromptRegionInferer", "prompt_region"]

_BLEND = ("constant", "gaussian")


def _triple(value: int | Sequence[int], name: str, minimum: int) -> tuple[int, int, int]:
    vals = [value] * 3 if isinstance(value, int) else list(value)
    if len(vals) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in vals):
        raise ValueError(f"{name} must be an int >= {minimum} or three such ints, got {value!r}.")
    return vals[0], vals[1], vals[2]


def prompt_region(
    occupied: torch.Tensor, roi_size: Sequence[int], margin: Sequence[int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """Region to evaluate around the prompts of one item.

    The bounding box of the prompt voxels, enlarged by ``margin`` on each side and clamped
    to the volume; an axis shorter than ``roi_size`` is grown to ``roi_size`` (or the whole
    axis if the volume is smaller), centred on the prompts and shifted to stay inside.

    Args:
        occupied: ``[H, W, D]`` bool, True where any guidance channel is nonzero.
        roi_size: window size per axis.
        margin: voxels added on each side per axis.

    Returns:
        ``(start, end)`` (exclusive end) per axis, or ``None`` without prompts.
    """
    nz = torch.nonzero(occupied)
    if nz.numel() == 0:
        return None
    size = occupied.shape
    p_lo = nz.amin(0).tolist()
    p_hi = (nz.amax(0) + 1).tolist()
    start, end = [], []
    for a in range(3):
        lo = max(p_lo[a] - margin[a], 0)
        hi = min(p_hi[a] + margin[a], size[a])
        need = min(roi_size[a], size[a])
        if hi - lo < need:
            centre = (p_lo[a] + p_hi[a]) / 2.0
            lo = int(math.floor(centre - need / 2.0 + 0.5))  # round half up, not to even
            lo = min(max(lo, 0), size[a] - need)
            hi = lo + need
        start.append(lo)
        end.append(hi)
    return (start[0], start[1], start[2]), (end[0], end[1], end[2])


class _PromptedWindows:
    """Runs ``network`` only on windows whose guidance channels hold a prompt; background elsewhere."""

    def __init__(
        self,
        network: Callable,
        num_image_channels: int,
        out_channels: int,
        background: float,
        foreground: float,
        skip_empty: bool = True,
    ):
        self.network = network
        self.skip_empty = skip_empty
        self.nic = num_image_channels
        self.k = out_channels
        self.background = background
        self.foreground = foreground
        self.run = 0
        self.skipped = 0

    def fill(self, n: int, spatial: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        out = torch.full((n, self.k, *spatial), self.foreground, dtype=like.dtype, device=like.device)
        out[:, 0] = self.background
        return out

    def __call__(self, window: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.skip_empty:
            has = (window[:, self.nic :] != 0).flatten(1).any(1)
        else:
            has = torch.ones(window.shape[0], dtype=torch.bool, device=window.device)
        n_run = int(has.sum())
        self.run += n_run
        self.skipped += window.shape[0] - n_run
        spatial = window.shape[2:]
        if n_run == window.shape[0]:
            return self._checked(self.network(window, *args, **kwargs), window)
        out = self.fill(window.shape[0], spatial, window)
        if n_run:
            pred = self._checked(self.network(window[has], *args, **kwargs), window[has])
            out = out.to(pred.dtype)
            out[has] = pred
        return out

    def _checked(self, pred: Any, window: torch.Tensor) -> torch.Tensor:
        if not isinstance(pred, torch.Tensor) or tuple(pred.shape) != (window.shape[0], self.k, *window.shape[2:]):
            got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
            raise ValueError(
                f"PromptRegionInferer: the network must return one tensor [n, out_channels={self.k}, *window] = "
                f"{(window.shape[0], self.k, *window.shape[2:])}, got {got}."
            )
        return pred


# 3DSAM-adapter evaluation (patch centred on the clicks, as its official test does); every prompted bundle
# evaluates only the region around its prompts
class PromptRegionInferer(Inferer):
    """Sliding-window inference only around the prompts.

    For each batch item the guidance channels (those after ``num_image_channels``) are
    scanned; the region around all prompt voxels (see :func:`prompt_region`) is evaluated with
    ``monai.inferers.SlidingWindowInferer``; windows inside that region without any prompt
    voxel are not passed to the network but return background; everything outside the region
    is background too. Background is ``background_logit`` in channel 0 and
    ``foreground_logit`` in the other channels (use 1.0 / 0.0 when the network ends in a
    softmax). The number of windows run / skipped by the last call is kept in
    ``last_windows_run`` / ``last_windows_skipped``.

    Args:
        roi_size: window size, int or three ints.
        sw_batch_size: windows per network call.
        overlap: window overlap (as ``SlidingWindowInferer``).
        margin: voxels added around the prompts on each side, int or three ints.
        num_image_channels: leading image channels of the input; the rest are guidance.
        mode: blending, ``"gaussian"`` or ``"constant"``.
        sigma_scale: Gaussian blending sigma (as ``SlidingWindowInferer``).
        padding_mode: padding when the region is smaller than ``roi_size``.
        cval: padding value.
        sw_device: device of the windows (the network's device).
        device: device of the stitched output (e.g. ``"cpu"`` for big volumes).
        progress: show a progress bar.
        out_channels: K, channels the network returns (2 for one prompted object).
        background_logit: value written in channel 0 where the network does not run.
        foreground_logit: value written in channels 1.. where the network does not run.
        allow_no_prompt: without prompts, run a plain sliding window over the whole item
            instead of raising.

    Call:
        ``inferer(inputs [B, C, H, W, D], network, *args, **kwargs) -> [B, K, H, W, D]``.
    """

    def __init__(
        self,
        roi_size: int | Sequence[int],
        sw_batch_size: int = 1,
        overlap: float | Sequence[float] = 0.25,
        margin: int | Sequence[int] = 16,
        num_image_channels: int = 1,
        mode: str = "gaussian",
        sigma_scale: float | Sequence[float] = 0.125,
        padding_mode: str = "constant",
        cval: float = 0.0,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        out_channels: int = 2,
        background_logit: float = 10.0,
        foreground_logit: float = -10.0,
        allow_no_prompt: bool = False,
    ) -> None:
        super().__init__()
        self.roi_size = _triple(roi_size, "roi_size", 1)
        self.margin = _triple(margin, "margin", 0)
        if not isinstance(num_image_channels, int) or num_image_channels < 1:
            raise ValueError(f"num_image_channels must be an int >= 1, got {num_image_channels!r}.")
        if mode not in _BLEND:
            raise ValueError(f"mode must be one of {_BLEND}, got {mode!r}.")
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be an int >= 1, got {out_channels!r}.")
        if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be an int >= 1, got {sw_batch_size!r}.")
        self.num_image_channels = num_image_channels
        self.out_channels = out_channels
        self.background_logit = float(background_logit)
        self.foreground_logit = float(foreground_logit)
        self.allow_no_prompt = bool(allow_no_prompt)
        self.device = device
        self.sliding_window = SlidingWindowInferer(
            roi_size=self.roi_size,
            sw_batch_size=sw_batch_size,
            overlap=overlap,
            mode=mode,
            sigma_scale=sigma_scale,
            padding_mode=padding_mode,
            cval=cval,
            sw_device=sw_device,
            device=device,
            progress=progress,
        )
        self.last_windows_run = 0
        self.last_windows_skipped = 0

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Evaluate ``network`` around the prompts of each item.

        Args:
            inputs: ``[B, C, H, W, D]``: image channels then guidance channels.
            network: maps ``[n, C, *roi_size]`` windows to ``[n, K, *roi_size]``.
            args: extra positional arguments for ``network``.
            kwargs: extra keyword arguments for ``network``.

        Returns:
            ``[B, K, H, W, D]``, background outside the evaluated windows.
        """
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 5:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"PromptRegionInferer: inputs must be [B, C, H, W, D], got {shape}.")
        if inputs.shape[1] <= self.num_image_channels:
            raise ValueError(
                f"PromptRegionInferer: inputs have {inputs.shape[1]} channels but "
                f"num_image_channels={self.num_image_channels}; "
                "the guidance channels (clicks / box) must follow the image channels."
            )
        values = (self.num_image_channels, self.out_channels, self.background_logit, self.foreground_logit)
        windows = _PromptedWindows(network, *values)
        every_window = _PromptedWindows(network, *values, skip_empty=False)
        outputs = []
        for b in range(inputs.shape[0]):
            x = inputs[b : b + 1]
            occupied = (x[0, self.num_image_channels :] != 0).any(0)
            region = prompt_region(occupied, self.roi_size, self.margin)
            if region is None:
                if not self.allow_no_prompt:
                    raise ValueError(
                        f"PromptRegionInferer: batch item {b} has no prompt in the guidance channels; pass "
                        "foreground/background clicks or a box (or set allow_no_prompt=True)."
                    )
                pred = self.sliding_window(x, every_window, *args, **kwargs)
                outputs.append(pred.as_tensor() if isinstance(pred, MetaTensor) else pred)
                continue
            (i0, j0, k0), (i1, j1, k1) = region
            crop = x[:, :, i0:i1, j0:j1, k0:k1]
            pred = self.sliding_window(crop, windows, *args, **kwargs)
            pred = pred.as_tensor() if isinstance(pred, MetaTensor) else pred
            full = windows.fill(1, x.shape[2:], pred)
            full[:, :, i0:i1, j0:j1, k0:k1] = pred
            outputs.append(full)
        self.last_windows_run = windows.run + every_window.run
        self.last_windows_skipped = windows.skipped
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)  # no second full-size copy for one item
        if isinstance(inputs, MetaTensor):  # keep the input's meta, as SlidingWindowInferer does
            out = convert_to_dst_type(out, inputs, device=out.device)[0]
        return out
