"""H-SAM data: the BTCV to Synapse label map of its 8-organ abdominal setting.

Few-shot datalists (the paper's sec. 4.1 settings) are written by ``python -m tools few_shot``
(``tools/recipes/few_shot.py``); :class:`shared_nets.h_sam.transforms.SelectSlicesd` keeps the
slices they list.
"""

from __future__ import annotations

# The bundle's train.json names SelectSlicesd by this module's path; its home is shared_nets.h_sam.transforms.
from .transforms import SelectSlicesd  # noqa: F401

__all__ = ["BTCV_TO_SYNAPSE"]

#: BTCV ids 0..13 → the 8-organ Synapse ids of TransUNet/SAMed/H-SAM (spleen 1, right kidney 2,
#: left kidney 3, gallbladder 4, liver 5, stomach 6, aorta 7, pancreas 8; other organs → 0).
BTCV_TO_SYNAPSE: list[int] = [0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0]
