"""Named callables that 3DSAM-adapter's bundle configs (``bundles/sam3d_adapter/configs``) reference instead of
inline code."""

from __future__ import annotations

import os
from typing import Any

from shared_nets.data import load_datalist

__all__ = ["inference_datalist"]


def inference_datalist(path: str | os.PathLike, label_key: str, use_label_prompts: bool) -> list[dict[str, Any]]:
    """Batch inference items: the datalist's ``test`` entries.

    Files are not checked here (``check_files=False``): the inference dataset skips and reports a missing one.

    Args:
        path: the decathlon-style datalist JSON.
        label_key: the entry key of the label file (e.g. the tumour-only label of a recipe).
        use_label_prompts: prompts are simulated from labels: every entry must have ``label_key``, copied
            to ``label``; otherwise only ``image`` is required and the entries are returned as read.
    """
    if not use_label_prompts:
        return load_datalist(path, "test", check_files=False, keys=["image"])
    items = load_datalist(path, "test", check_files=False, keys=["image", label_key])
    return [dict(item, label=item[label_key]) for item in items]
