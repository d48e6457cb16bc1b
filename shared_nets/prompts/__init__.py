"""Prompts: simulation from labels, mapping to the current grid, guidance channels, prompted inference.

Prompts travel as extra input channels after the image channels, ``[image..., positive clicks,
negative clicks, box]``, as MONAI's DeepGrow/DeepEdit guidance does; see docs/architecture.md
("Tensor contract" and ``shared_nets.prompts``).
"""

from __future__ import annotations

from .guidance import (
    AddGuidanceChannelsd,
    decode_box_3d,
    decode_boxes_2d,
    decode_points,
    decode_points_2d,
    scale_coords,
)
from .inferer import PromptRegionInferer, prompt_region
from .points import PointsToGridd, map_boxes, map_points, parse_prompt
from .simulate import SelectObjectd, SimulateBoxd, SimulateClicksd, box_iou

__all__ = [
    "AddGuidanceChannelsd",
    "PointsToGridd",
    "PromptRegionInferer",
    "SelectObjectd",
    "SimulateBoxd",
    "SimulateClicksd",
    "box_iou",
    "decode_box_3d",
    "decode_boxes_2d",
    "decode_points",
    "decode_points_2d",
    "map_boxes",
    "map_points",
    "parse_prompt",
    "prompt_region",
    "scale_coords",
]
