"""Dataset recipes behind ``python -m tools prepare``: one module per dataset family.

``common`` holds the shared pieces (layout errors, reading/writing volumes, label look-up tables,
seeded hold-outs, the decathlon datalist writer); ``abdomen`` (BTCV, Synapse), ``tumour`` (MSD
pancreas/colon, KiTS21, LiTS17), ``prostate`` (PROMISE12, the 6-site set) and ``heart`` (LA) each
turn a dataset's published folder layout into a datalist. ``tools.prepare`` dispatches by name.
"""

from __future__ import annotations

__all__: list[str] = []
