"""Named callables that H-SAM's bundle configs (``bundles/h_sam/configs``) reference instead of inline code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["add_depth_axis", "final_stage", "output_channel_def"]


def add_depth_axis(x: torch.Tensor) -> torch.Tensor:
    """A trailing depth axis of size 1: a 2D slice ``[C, H, W]`` becomes ``[C, H, W, 1]``.

    H-SAM trains on single slices; the training transforms after the slice sampler expect 3D tensors
    (``train#random_transforms``, a ``Lambdad`` on ``image`` and ``label``).
    """
    return x.unsqueeze(-1)


def final_stage(x: Any) -> Any:
    """The last stage's output of H-SAM's list of stage logits; any other output unchanged.

    In training H-SAM returns one output per decoder stage (deep supervision); the metrics of the
    training post-processing read the final stage only.
    """
    return x[-1] if isinstance(x, (list, tuple)) else x


def output_channel_def(channel_def: Mapping[str, str], label_map: Sequence[int], output_btcv_ids: bool) -> Mapping:
    """The ``channel_def`` of the saved predictions.

    Args:
        channel_def: the bundle's output channel names (``metadata.json`` ``outputs#pred#channel_def``,
            Synapse ids as strings).
        label_map: BTCV id → Synapse id (``shared_nets.labels.BTCV_TO_SYNAPSE``).
        output_btcv_ids: when true the predictions are written with BTCV ids: each BTCV id that maps to a
            Synapse organ gets that organ's name (unmapped ids are left out).

    Returns:
        ``channel_def`` itself, or ``{str(btcv_id): name}``.
    """
    if not output_btcv_ids:
        return channel_def
    return {str(b): channel_def[str(s)] for b, s in enumerate(label_map) if s}
