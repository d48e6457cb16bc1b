"""3DSAM-adapter: holistic adaptation of SAM from 2D to 3D for tumour segmentation (Gong et al., 2024).

SAM's ViT run on 3D patches with spatial adapters, a 3D prompt encoder and a multi-level 3D decoder.
See ``bundles/sam3d_adapter``.
"""

from . import bench, builder, config, data, encoder, heads, network, transforms
from .builder import build_sam3d_adapter
from .network import NO_POSITIVE_MODES, PROMPT_ENCODER_MODES, SAM3D_TRAINABLE_PATTERNS, SAM3DAdapter

__all__ = [
    "NO_POSITIVE_MODES",
    "PROMPT_ENCODER_MODES",
    "SAM3DAdapter",
    "SAM3D_TRAINABLE_PATTERNS",
    "bench",
    "build_sam3d_adapter",
    "builder",
    "config",
    "data",
    "encoder",
    "heads",
    "network",
    "transforms",
]
