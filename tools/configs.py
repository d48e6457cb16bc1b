"""Keep the values a bundle's train and inference configs share in one place: ``configs/common.json``.

``python -m tools configs sync`` copies every key of ``bundles/<m>/configs/common.json`` into that bundle's
``train.json`` and ``inference.json``; ``python -m tools configs check`` reports each copy that differs.

Why copies: MONAI bundles have no include directive, and each of ``train.json`` and ``inference.json`` must
run alone (``python -m monai.bundle run --config_file configs/inference.json``; MONAI Label loads the
inference config by itself). So ``common.json`` is where a shared value is edited, and the two run configs
hold verbatim copies that ``sync`` writes and ``check`` (and ``tests/bundles/test_config_agreement.py``)
verifies. A key is kept in the position it already has; a new key goes after the common key before it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from shared_nets.io import atomic_write_text

__all__ = [
    "COMMON",
    "TARGETS",
    "bundle_dirs",
    "read_config",
    "dump_config",
    "synced",
    "differences",
    "sync",
    "check",
    "main",
]

REPO = Path(__file__).resolve().parents[1]
#: The file with the canonical shared values, relative to a bundle folder.
COMMON = "configs/common.json"
#: The run configs that hold copies of them.
TARGETS = ("configs/train.json", "configs/inference.json")


def bundle_dirs(bundle: str | None = None, root: str | Path | None = None) -> list[Path]:
    """The bundle folders with a ``configs/common.json`` (all under ``<root>/bundles``, or the one named)."""
    base = Path(root) if root is not None else REPO / "bundles"
    if bundle is not None:
        path = base / bundle
        if not (path / COMMON).is_file():
            raise ValueError(
                f"bundle '{bundle}': '{path / COMMON}' does not exist; expected a bundle folder with {COMMON}."
            )
        return [path]
    return sorted(p for p in base.iterdir() if (p / COMMON).is_file())


def read_config(path: str | Path) -> dict[str, Any]:
    """A JSON config as an ordered dict; a clear error naming the file when it is not a JSON object."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"'{path}' is not a readable JSON config ({e}).") from None
    if not isinstance(content, dict):
        raise ValueError(f"'{path}' holds {type(content).__name__}; expected a JSON object of config keys.")
    return content


def dump_config(config: dict[str, Any], like: str = "") -> str:
    """The text the bundles' configs are written in: 4-space indent, a trailing newline; non-ASCII characters
    stay as they are when the file they replace (``like``) has them unescaped."""
    ascii_only = not any(ord(ch) > 127 for ch in like)
    return json.dumps(config, indent=4, ensure_ascii=ascii_only) + "\n"


def synced(common: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every key of ``common`` set to common's value (existing keys keep their place; a missing
    key goes right after the common key that precedes it, or at the end)."""
    out = dict(config)
    for k, v in common.items():
        out[k] = v
    order = list(config)
    last = None
    for k in common:
        if k in config:
            last = k
            continue
        order.insert(order.index(last) + 1 if last is not None else len(order), k)
        last = k
    return {k: out[k] for k in order}


def differences(bundle_dir: str | Path) -> list[str]:
    """One line per common key whose copy in ``train.json`` / ``inference.json`` is missing or differs."""
    bundle_dir = Path(bundle_dir)
    common = read_config(bundle_dir / COMMON)
    lines = []
    for rel in TARGETS:
        config = read_config(bundle_dir / rel)
        for k, v in common.items():
            if k not in config:
                lines.append(f"{bundle_dir / rel}: lacks '{k}'; expected {json.dumps(v)} as in {COMMON}.")
            elif config[k] != v:
                lines.append(
                    f"{bundle_dir / rel}: '{k}' is {json.dumps(config[k])}; expected {json.dumps(v)} as in {COMMON}."
                )
    return lines


def sync(bundle: str | None = None, root: str | Path | None = None) -> list[str]:
    """Copy the values of each bundle's ``common.json`` into its train and inference configs.

    Args:
        bundle: one bundle folder name (default: every bundle with a ``common.json``).
        root: the folder holding the bundles (default: the repository's ``bundles/``).

    Returns:
        The files it rewrote (a file already in sync is left untouched).
    """
    written = []
    for bundle_dir in bundle_dirs(bundle, root):
        common = read_config(bundle_dir / COMMON)
        for rel in TARGETS:
            path = bundle_dir / rel
            text = path.read_text()
            new = dump_config(synced(common, read_config(path)), like=text)
            if json.loads(new) != json.loads(text) or new.rstrip("\n") != text.rstrip("\n"):
                atomic_write_text(path, new)
                written.append(str(path))
    return written


def check(bundle: str | None = None, root: str | Path | None = None) -> list[str]:
    """The lines of :func:`differences` for each bundle (empty when every copy agrees with ``common.json``)."""
    return [line for bundle_dir in bundle_dirs(bundle, root) for line in differences(bundle_dir)]


def main(action: str = "check", bundle: str | None = None, root: str | None = None) -> None:
    """``python -m tools configs check|sync [--bundle NAME]``.

    Args:
        action: ``check`` (report copies that differ from ``common.json``; exit status 1 if any) or ``sync``
            (rewrite them).
        bundle: one bundle folder name (default: all).
        root: the folder holding the bundles (default: the repository's ``bundles/``).
    """
    if action == "sync":
        for path in sync(bundle, root):
            print(f"updated {path}")
        return
    if action != "check":
        raise ValueError(f"configs: action must be 'check' or 'sync', got {action!r}.")
    lines = check(bundle, root)
    for line in lines:
        print(line, file=sys.stderr)
    if lines:
        sys.exit(1)
    print("train.json and inference.json agree with common.json.")
