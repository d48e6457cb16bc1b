"""Write a bundle's initial ``models/model.pt``: SAM weights with every adapter at its identity start.

Command line (from the checkout)::

    python -m tools init_model --bundle bundles/ma_sam [--configs "['inference.json','demo.json']"] \
        [--sam_checkpoint models/sam_vit_h_4b8939.pth] [--out bundles/ma_sam/models/model.pt]

The network is built from the bundle's ``network_def`` (the configs are merged in order, later
files override earlier ones, as ``monai.bundle`` does) with ``checkpoint`` taken from
``--sam_checkpoint`` (``null`` gives the random initialisation that ``tiny`` uses), and its full
state dict is saved through a temporary file. Adapters start at identity (zero-initialised
up-projections / singular-value offsets), so the written model behaves like SAM and a bundle
(or a MONAI Label app) serves before any training. ``CheckpointLoader`` and MONAI Label both read
the plain state dict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["merged_config", "build_network", "write_initial_model", "main"]


def _as_list(value: str | Sequence[str] | None, name: str) -> list[str]:
    """Accept a list, a comma-separated string or a JSON/Python-style list string."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return [str(v) for v in json.loads(text.replace("'", '"'))]
            except json.JSONDecodeError as e:
                raise ValueError(f"{name} must be a list of file names, got {value!r}.") from e
        return [v.strip() for v in text.split(",") if v.strip()]
    if isinstance(value, Sequence):
        return [str(v) for v in value]
    raise ValueError(f"{name} must be a list of file names, got {value!r}.")


def merged_config(
    bundle: str | os.PathLike, configs: Sequence[str], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The bundle's ``configs/<name>`` files merged in order, then ``overrides`` (``a#b`` keys allowed).

    A ``"a#b"`` key of a later file whose parent ``a`` is absent from the earlier ones (e.g. a
    ``train#...`` key of ``demo.json`` merged onto ``inference.json``) is skipped, so one demo file
    can serve both the train and the inference config.

    Args:
        bundle: bundle folder (holding ``configs/``).
        configs: file names under ``configs/``; the first one must exist.
        overrides: extra ``{id: value}`` set last.

    Returns:
        The merged raw config (a plain dict, references unresolved).
    """
    from monai.bundle import ConfigParser

    root = Path(bundle)
    if not configs:
        raise ValueError(f"configs must name at least one file under {root / 'configs'}, got none.")
    files = [root / "configs" / c for c in configs]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle config file(s) not found: {', '.join(missing)}.")
    parser = ConfigParser()
    parser.read_config(str(files[0]))
    for f in files[1:]:
        for key, value in ConfigParser.load_config_file(str(f)).items():
            _set(parser, key, value, f)
    for key, value in (overrides or {}).items():
        _set(parser, key, value, None)
    return parser.config  # type: ignore[return-value]


def _set(parser: Any, key: str, value: Any, source: Path | None) -> None:
    try:
        parser[key] = value
    except (KeyError, TypeError, ValueError):
        if "#" not in key:
            raise
        if source is None:
            raise ValueError(f"override '{key}': its parent id is not in the merged config.") from None


def build_network(config: Mapping[str, Any], bundle: str | os.PathLike, metadata: Mapping[str, Any] | None = None):
    """Instantiate ``network_def`` of a merged config (``bundle_root`` set to ``bundle``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(dict(config))
    parser["bundle_root"] = str(bundle)
    if metadata is not None and not config.get("_meta_"):  # ConfigParser starts with an empty _meta_
        parser["_meta_"] = dict(metadata)
    if "network_def" not in parser.config:
        raise ValueError(f"bundle config of '{bundle}' has no 'network_def' to build.")
    return parser.get_parsed_content("network_def", instantiate=True)


def write_initial_model(
    bundle: str | os.PathLike,
    configs: str | Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    sam_checkpoint: str | None = None,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Build ``network_def`` from the bundle's configs and save its state dict as ``model.pt``.

    Args:
        bundle: bundle folder.
        configs: config files under ``configs/`` merged in order (default ``["inference.json"]``).
        out: file to write (default ``<bundle>/models/model.pt``); written atomically.
        sam_checkpoint: official SAM ``.pth`` the network loads before its adapters are added;
            ``None`` keeps the config's ``sam_checkpoint`` (``null`` in inference configs: random init).
        seed: torch seed for every randomly initialised weight (identical reruns).
        overrides: extra config ``{id: value}``.

    Returns:
        Path of the written checkpoint.
    """
    import torch

    from shared_nets.io import atomic_torch_save

    root = Path(bundle)
    names = _as_list(configs, "configs") or ["inference.json"]
    extra = dict(overrides or {})
    if sam_checkpoint is not None:
        if not Path(sam_checkpoint).is_file():
            raise FileNotFoundError(
                f"sam_checkpoint '{sam_checkpoint}' does not exist (get it with `python -m tools weights`)."
            )
        extra["sam_checkpoint"] = str(sam_checkpoint)
    config = merged_config(root, names, extra)
    meta_file = root / "configs" / "metadata.json"
    metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    torch.manual_seed(int(seed))
    network = build_network(config, root, metadata)
    target = Path(out) if out is not None else root / "models" / "model.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    return Path(atomic_torch_save(state, target))


def main(
    bundle: str,
    configs: str | Sequence[str] | None = None,
    out: str | None = None,
    sam_checkpoint: str | None = None,
    seed: int = 0,
) -> str:
    """``python -m tools init_model``: write the initial ``model.pt`` of one bundle; returns (fire prints) its path."""
    return str(write_initial_model(bundle, configs=configs, out=out, sam_checkpoint=sam_checkpoint, seed=seed))
