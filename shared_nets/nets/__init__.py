"""Method networks, one public model per module (see docs/architecture.md).

Each maps ``[B, C, H, W, D]`` to ``[B, K, H, W, D]`` logits at the input's size.
"""

from .h_sam import HSAM
from .ma_sam import MASAM
from .med_sa import MEDSA_OFFICIAL_CODE_SETTINGS, MedSA
from .s_sam import SSAM, TextAffineLayer
from .sam3d_adapter import SAM3DAdapter

__all__ = ["HSAM", "MASAM", "MEDSA_OFFICIAL_CODE_SETTINGS", "MedSA", "SAM3DAdapter", "SSAM", "TextAffineLayer"]
