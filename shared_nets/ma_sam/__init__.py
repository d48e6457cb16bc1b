"""MA-SAM: modality-agnostic SAM adaptation for 3D medical images (Chen et al., 2024).

FacT-tuned SAM encoder with 3D adapters, a progressive-upsampling mask decoder, one volume in,
one volume of logits out. See ``bundles/ma_sam``.
"""

from . import bench, blocks, builder, config, network
from .builder import build_ma_sam
from .network import ADAPTER_POSITIONS, DECODERS, FINETUNE_MODES, MASAM, MultiScaleFusion

__all__ = [
    "ADAPTER_POSITIONS",
    "DECODERS",
    "FINETUNE_MODES",
    "MASAM",
    "MultiScaleFusion",
    "bench",
    "blocks",
    "build_ma_sam",
    "builder",
    "config",
    "network",
]
