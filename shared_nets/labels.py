"""BTCV (Synapse multi-organ) label ids and names, defined once for the bundles, recipes and demo data.

The names are the bundles' ``metadata.json`` ``channel_def`` (MA-SAM, S-SAM). Two label conventions
derive from them:

* MA-SAM's official code trains 12 classes: the left adrenal gland (13) is relabelled as the right
  one (12), "adrenal glands" (:data:`ADRENAL_MERGE`, :func:`btcv_class_names`);
* TransUNet/SAMed/H-SAM evaluate 8 organs with their own ids (:data:`BTCV_TO_SYNAPSE`).
"""

from __future__ import annotations

__all__ = [
    "BTCV_LABELS",
    "ADRENAL_MERGE",
    "BTCV_TO_SYNAPSE",
    "MERGED_ADRENALS_NAME",
    "btcv_class_names",
    "btcv_foreground_labels",
    "btcv_num_classes",
]

#: BTCV label ids as distributed (0 background, 1..13 organs).
BTCV_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal vein and splenic vein",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}

#: MA-SAM's 12-class relabelling: left adrenal gland (13) → right adrenal gland (12); other ids unchanged
#: (the paper's Table 1 has 12 organ columns).
ADRENAL_MERGE: dict[int, int] = {**{i: i for i in range(13)}, 13: 12}

#: The name of class 12 once the two adrenal glands are merged.
MERGED_ADRENALS_NAME = "adrenal glands"

#: BTCV ids 0..13 → the 8-organ Synapse ids of TransUNet/SAMed/H-SAM (spleen 1, right kidney 2,
#: left kidney 3, gallbladder 4, liver 5, stomach 6, aorta 7, pancreas 8; other organs → 0).
BTCV_TO_SYNAPSE: list[int] = [0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0]


def btcv_num_classes(merge_adrenals: bool) -> int:
    """Foreground classes a BTCV bundle predicts: 12 with the adrenal glands merged, else 13."""
    return 12 if merge_adrenals else 13


def btcv_foreground_labels(merge_adrenals: bool) -> dict[int, str]:
    """``{class id: name}`` for the foreground classes 1..:func:`btcv_num_classes`, in id order.

    With ``merge_adrenals`` class 12 is "adrenal glands" and there is no class 13.
    """
    labels = {i: name for i, name in BTCV_LABELS.items() if 0 < i <= btcv_num_classes(merge_adrenals)}
    if merge_adrenals:
        labels[12] = MERGED_ADRENALS_NAME
    return labels


def btcv_class_names(merge_adrenals: bool) -> list[str]:
    """Foreground class names in id order (the metric table's columns): 13 names, or 12 ending in "adrenal glands"."""
    return list(btcv_foreground_labels(merge_adrenals).values())
