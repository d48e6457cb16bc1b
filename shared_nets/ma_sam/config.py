"""Named callables that MA-SAM's bundle configs (``bundles/ma_sam/configs``) reference instead of inline code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared_nets.labels import MERGED_ADRENALS_NAME
from shared_nets.metrics import foreground_names

__all__ = ["metric_class_names"]


def metric_class_names(channel_def: Mapping[Any, str], num_classes: int, merge_adrenals: bool) -> list[str]:
    """Column names of the evaluation's metric tables, one per foreground class.

    Args:
        channel_def: the bundle's output channel names (``metadata.json`` ``outputs#pred#channel_def``).
        num_classes: foreground classes the network predicts.
        merge_adrenals: MA-SAM's 12-class BTCV labels (official code): the first 11 names, then
            "adrenal glands" for class 12.
    """
    if merge_adrenals:
        return foreground_names(channel_def, 11) + [MERGED_ADRENALS_NAME]
    return foreground_names(channel_def, num_classes)
