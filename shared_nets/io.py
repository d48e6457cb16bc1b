"""Atomic file writes: a temporary file in the target folder, then ``os.replace``.

A killed or failing writer never leaves a truncated file under the real name, and the
temporary file is removed on failure.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["atomic_write_text", "atomic_write_json"]


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` atomically (parent folders are created); returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(obj: Any, path: str | os.PathLike) -> str:
    """Write ``obj`` as indented JSON (trailing newline) to ``path`` atomically; returns the path."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
