"""The ``python -m tools`` commands that replaced per-module CLIs: few_shot, noise_var, text_embeddings."""

from __future__ import annotations

import json

import pytest

from tools.__main__ import COMMANDS, main


def test_few_shot_command_writes_the_subset(demo_data, tmp_path, capsys):
    out = tmp_path / "few.json"
    args = ["few_shot", "--datalist", str(demo_data / "datalist.json"), "--out", str(out), "--num_cases", "2"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["cases"] == 2
    assert len(json.loads(out.read_text())["training"]) == 2
    with pytest.raises(SystemExit) as info:  # bad arguments: one error line, status 1 (as before the move)
        main(["few_shot", "--datalist", str(demo_data / "datalist.json"), "--out", str(out), "--num_cases", "99"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: num_cases must be")


def test_noise_var_command_prints_one_variance_per_class(demo_data, capsys):
    assert main(["noise_var", "--datalist", str(demo_data / "datalist.json"), "--num_classes", "8"]) == 0
    variances = json.loads(capsys.readouterr().out)
    assert len(variances) == 9 and max(variances) == pytest.approx(0.1) and min(variances) >= 0


def test_text_embeddings_command_adds_and_shows(tmp_path, capsys):
    path = tmp_path / "emb.json"
    assert main(["text_embeddings", "add", str(path), "liver,spleen", "--encoder", "hash", "--dim", "16"]) == 0
    capsys.readouterr()
    assert main(["text_embeddings", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "liver" in shown and "spleen" in shown and "hash" in shown
    assert json.loads(path.read_text())["dim"] == 16


def test_old_module_clis_are_gone():
    """One CLI style: the modules no longer run as scripts; their commands are in tools/__main__.py."""
    from pathlib import Path

    import shared_nets.s_sam.text
    import tools.recipes.few_shot

    for module in (tools.recipes.few_shot, shared_nets.s_sam.text):
        assert "__main__" not in Path(module.__file__).read_text()
    assert {"few_shot", "noise_var", "text_embeddings"} <= set(COMMANDS)
