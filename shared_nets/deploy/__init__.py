"""A MONAI Deploy App SDK application for the automatic bundles (MA-SAM, H-SAM, S-SAM).

* :mod:`shared_nets.deploy.bundle` (no SDK needed): the bundle config as the SDK's bundle inference
  operator reads it, and the segment names of the DICOM SEG it writes.
* :mod:`shared_nets.deploy.app` (needs ``monai-deploy-app-sdk``, the ``deploy`` extra):
  :class:`~shared_nets.deploy.app.BundleSegApp`, DICOM series folder in, DICOM SEG out, built from the
  bundle folder itself (its configs and ``models/model.pt``).

``python -m tools deploy_app --bundle bundles/ma_sam --input <series folder> --output <folder>`` runs it.
"""

from __future__ import annotations

from shared_nets.deploy.bundle import DEFAULT_CONFIGS, bundle_parser, segment_names

__all__ = ["DEFAULT_CONFIGS", "bundle_parser", "segment_names"]
