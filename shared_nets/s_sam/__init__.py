"""S-SAM: SVD-based fine-tuning of SAM with text prompts (Paranjape et al., 2024).

Singular-value tuning of a frozen SAM and a Text-Affine Layer (TAL) that turns class-name
embeddings into prompt tokens. See ``bundles/s_sam``.
"""

from . import bench, builder, network, text
from .builder import build_s_sam
from .network import S_SAM_MODES, SSAM, TAL_TYPES, TextAffineLayer

__all__ = ["SSAM", "S_SAM_MODES", "TAL_TYPES", "TextAffineLayer", "bench", "build_s_sam", "builder", "network", "text"]
