"""The bundle side of the Deploy app, free of the SDK (so CI without the SDK tests the same pieces).

The SDK's ``MonaiBundleInferenceOperator`` reads a bundle folder as ``configs/metadata.json`` plus
``configs/<name>.json`` for each config name, merged in order at the top level, and builds ``network``
(else ``network_def``) to load ``models/model.pt`` strictly (monai-deploy-app-sdk 4.0.0,
``monai/deploy/operators/monai_bundle_inference_operator.py``). :func:`bundle_parser` reads a bundle the
same way, with ``bundle_root`` set to the folder (the SDK leaves the configs' ``"."``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_CONFIGS", "bundle_parser", "segment_names"]

# inference.json, then deploy.json: the plain network (no Softmax) whose state dict is models/model.pt
DEFAULT_CONFIGS: tuple[str, ...] = ("inference", "deploy")


def _config_file(root: Path, name: str) -> Path:
    stem = name[:-5] if name.endswith(".json") else name
    return root / "configs" / f"{stem}.json"


def bundle_parser(bundle: str | os.PathLike, config_names: Sequence[str] = DEFAULT_CONFIGS) -> Any:
    """A ``monai.bundle.ConfigParser`` of ``bundle`` as the Deploy app reads it.

    Args:
        bundle: bundle folder (holding ``configs/`` and ``models/``).
        config_names: config names under ``configs/`` (with or without ``.json``), merged in order.

    Returns:
        The parser, ``_meta_`` read from ``configs/metadata.json`` and ``bundle_root`` set to ``bundle``.
    """
    from monai.bundle import ConfigParser

    root = Path(bundle).expanduser().resolve()
    if not config_names:
        raise ValueError(f"config_names must name at least one config of bundle '{root}', got none.")
    files = [_config_file(root, n) for n in ["metadata", *config_names]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle '{root}' lacks config file(s): {', '.join(missing)}.")
    parser = ConfigParser()
    parser.read_meta(str(files[0]))
    parser.read_config([str(f) for f in files[1:]])
    parser["bundle_root"] = str(root)
    return parser


def segment_names(parser: Any) -> list[str]:
    """Names of the DICOM SEG segments 1..K, one per label value of the bundle's predictions.

    The names come from the bundle itself: the ``channel_def`` of its ``shared_nets.dicom.SaveDicomSegd``
    post-processing step (the map of written label values to class names, e.g. H-SAM's BTCV ids when
    ``output_btcv_ids`` is on), else ``metadata.json``'s output ``channel_def``. The SDK's SEG writer
    numbers segments by label value, so the values must run 0..K without gaps.

    Args:
        parser: from :func:`bundle_parser`.

    Returns:
        ``[name of value 1, ..., name of value K]``.
    """
    channel_def = None
    steps = parser.get("postprocessing#transforms", [])
    for i, step in enumerate(steps):
        if isinstance(step, dict) and str(step.get("_target_", "")).endswith("SaveDicomSegd"):
            channel_def = parser.get_parsed_content(f"postprocessing#transforms#{i}#channel_def")
    if channel_def is None:
        channel_def = parser.get("_meta_#network_data_format#outputs#pred#channel_def")
    if not channel_def:
        raise ValueError(
            f"bundle '{parser.get('bundle_root')}' names no output classes: expected metadata.json "
            "network_data_format#outputs#pred#channel_def."
        )
    values = sorted(int(k) for k in channel_def)
    if values != list(range(len(values))):
        raise ValueError(
            f"bundle '{parser.get('bundle_root')}': the written label values {values} must run 0..K without gaps "
            "(the DICOM SEG writer numbers segments by label value); for H-SAM set output_btcv_ids to false."
        )
    return [str(channel_def[str(v)] if str(v) in channel_def else channel_def[v]) for v in values[1:]]
