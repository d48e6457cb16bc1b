"""Med-SA evaluation data: one (volume, class) item per class present, the unit of its per-object metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["object_datalist"]


def object_datalist(
    datalist: Sequence[Mapping[str, Any]],
    class_ids: Sequence[int],
    label_key: str = "label",
    object_key: str = "object_id",
    label_map: Mapping[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One evaluation item per (volume, class present in its label).

    Args:
        datalist: items with a label file path (or array) under ``label_key``.
        class_ids: classes to evaluate.
        label_key: key of the label.
        object_key: key that receives the class id.
        label_map: ``{file id: class id}`` applied to the label's ids before the presence test, as the
            pre-processing's ``MapLabelValued`` does (e.g. ``{13: 12}``: BTCV's adrenal glands merged).

    Returns:
        New items ``dict(item, object_id=c)`` for every class ``c`` of ``class_ids`` present.
    """
    from monai.transforms import LoadImage

    ids = [int(c) for c in class_ids]
    if not ids or any(c <= 0 for c in ids):
        raise ValueError(f"class_ids must be a non-empty list of positive class ids, got {class_ids!r}.")
    loader = LoadImage(image_only=True)
    out = []
    for item in datalist:
        if label_key not in item:
            raise ValueError(f"object_datalist: item {dict(item)!r} has no '{label_key}'.")
        lab = item[label_key]
        arr = np.asarray(loader(lab) if isinstance(lab, str) else lab)
        present = set(np.unique(np.rint(arr)).astype(int).tolist())
        if label_map:
            present = {int(label_map.get(c, c)) for c in present}
        out.extend(dict(item, **{object_key: c}) for c in ids if c in present)
    return out
