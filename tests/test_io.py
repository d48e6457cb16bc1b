"""shared_nets.io: atomic writes leave the old file or the new one, never a partial one or a temp file."""

from __future__ import annotations

import json

import pytest

from shared_nets.io import atomic_write_json, atomic_write_text


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json({"x": 1}, path)
    atomic_write_json({"x": 2}, path)
    assert json.loads(path.read_text()) == {"x": 2} and path.read_text().endswith("\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "dice.md"
    atomic_write_text(path, "old\n")
    with pytest.raises(TypeError):
        atomic_write_json({"x": object()}, path)  # not JSON-serialisable: fails before anything is written
    with pytest.raises(TypeError):
        atomic_write_text(path, 123)  # fails inside the temporary file
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dice.md"]
