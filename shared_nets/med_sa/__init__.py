"""Med-SA: Medical SAM Adapter (Wu et al., 2023).

Adapters in a frozen SAM (SD-Trans depth branch, HyP-Adpt prompt-conditioned decoder adapters),
prompt settings and click interaction. See ``bundles/med_sa``.
"""

from . import bench, blocks, builder, config, data, interactive, network, transforms
from .builder import build_med_sa
from .network import MEDSA_OFFICIAL_CODE_SETTINGS, PROMPT_SCOPES, MedSA

__all__ = [
    "MEDSA_OFFICIAL_CODE_SETTINGS",
    "MedSA",
    "PROMPT_SCOPES",
    "bench",
    "blocks",
    "build_med_sa",
    "builder",
    "config",
    "data",
    "interactive",
    "network",
    "transforms",
]
