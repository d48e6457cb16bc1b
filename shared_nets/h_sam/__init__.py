"""H-SAM: hierarchical SAM decoding for few-shot medical segmentation (Cheng et al., CVPR 2024).

LoRA-tuned SAM encoder, SAM's decoder as stage 1 and a mask-guided hierarchical stage-2 decoder,
with the two-stage loss. See ``bundles/h_sam``.
"""

from . import bench, builder, config, decoder, loss, network, transforms
from .builder import build_h_sam
from .network import ENSEMBLE_MODES, FINETUNE_MODES, HSAM

__all__ = [
    "ENSEMBLE_MODES",
    "FINETUNE_MODES",
    "HSAM",
    "bench",
    "build_h_sam",
    "builder",
    "config",
    "decoder",
    "loss",
    "network",
    "transforms",
]
