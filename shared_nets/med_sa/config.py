"""Named callables that Med-SA's bundle configs (``bundles/med_sa/configs``) reference instead of inline code."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from shared_nets.data import checked_datalist, load_datalist
from shared_nets.labels import btcv_foreground_labels

__all__ = ["class_names", "inference_datalist", "object_datalist_from_file", "object_meta"]


def object_datalist_from_file(
    path: str | os.PathLike, split: str, class_ids: Sequence[int], min_depth: int, channels: int, merge_adrenals: bool
) -> list[dict[str, Any]]:
    """Med-SA's evaluation items: one per (volume, class of ``class_ids`` present in its label).

    The datalist is read and checked with :func:`shared_nets.data.checked_datalist` (``min_depth`` slices,
    ``channels`` image channels), then split per object with
    :func:`shared_nets.med_sa.data.object_datalist`.

    Args:
        path: the decathlon-style datalist JSON.
        split: the list to read (``validation``, ``test``).
        class_ids: the classes to evaluate.
        min_depth: at least this many slices per volume.
        channels: image channels.
        merge_adrenals: BTCV's left adrenal gland (13) counts as class 12, as the pre-processing relabels it.
    """
    from shared_nets.med_sa.data import object_datalist

    items = checked_datalist(path, split, min_depth=min_depth, channels=channels)
    return object_datalist(items, class_ids, label_map={13: 12} if merge_adrenals else None)


def inference_datalist(path: str | os.PathLike, object_id: int, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Batch inference items: the datalist's ``test`` entries, each prompted for the object ``object_id``.

    Files are not checked here (``check_files=False``): the inference dataset skips and reports a missing one.

    Args:
        path: the decathlon-style datalist JSON.
        object_id: the class every case is prompted for (``infer_object_id``).
        keys: entry keys each item must have (``image``, plus ``label`` when prompts come from labels).
    """
    return [dict(d, object_id=object_id) for d in load_datalist(path, "test", check_files=False, keys=keys)]


def object_meta(batch: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-item metadata for the evaluation's ``MetricsSaver``: the image meta plus the item's ``object_id``,
    so each per-object metric row names its case and class."""
    return [dict(x["image"].meta, object_id=int(x["object_id"])) for x in batch]


def class_names(merge_adrenals: bool) -> dict[str, str]:
    """``{class id as a string: name}`` of the BTCV classes Med-SA evaluates (13, or 12 with the adrenal glands
    merged into class 12, "adrenal glands")."""
    return {str(k): v for k, v in btcv_foreground_labels(merge_adrenals).items()}
