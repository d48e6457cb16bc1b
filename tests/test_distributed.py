"""Sharded, resumable inference and evaluation (``shared_nets.distributed``, ``configs/multi_gpu_*.json``).

Unit tests of the manifest, the shard and the output check, then ``torchrun --nproc_per_node 2`` on CPU
(gloo) for every bundle: the union of the ranks' predictions equals a single-process run voxel for voxel,
the metric reports are the same files, every case is run once; a job killed halfway and rerun runs only
the cases that were not finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shared_nets import distributed as D
from tests.bundle_harness import REPO, child_env, relabelled_datalist, torchrun_bundle_command

# per bundle: (overrides for quick CPU runs, datalist key of its label)
BUNDLES = {
    "ma_sam": ({"img_size": 64, "sw_batch_size": 8, "val_sw_batch_size": 8}, "label"),
    "med_sa": ({}, "label"),
    "sam3d_adapter": ({}, "tumour"),
    "s_sam": ({"img_size": 64, "sw_batch_size": 24, "val_sw_batch_size": 24}, "label"),
    "h_sam": ({}, "label"),
}
EVALUATE_BUNDLES = ["ma_sam", "med_sa", "sam3d_adapter", "s_sam", "h_sam"]
NUM_CASES = 3  # odd: the two ranks get 2 and 1 cases (no padding)


# -- unit tests --------------------------------------------------------------------------------------
def test_case_name_strips_the_extension_and_adds_extra_keys():
    assert D.case_name({"image": "/d/imagesTr/case_01.nii.gz"}) == "case_01"
    item = {"image": ["/d/a/x.nii", "/d/b/y.nii"], "object_id": 3}
    assert D.case_name(item, extra_keys=["object_id"]) == "x_object_id-3"
    with pytest.raises(ValueError, match="'image'"):
        D.case_name({"label": "a.nii.gz"})


def test_manifest_reader_skips_a_line_cut_by_a_kill_and_the_next_append_stays_whole(tmp_path):
    w = D.ManifestWriter(tmp_path, rank=1)
    w.append({"case": "a", "status": "done", "seconds": 1.0})
    with open(w.path, "ab") as f:
        f.write(b'{"case": "b", "status": "do')  # a kill in the middle of a write
    assert [r["case"] for r in D.read_manifest(tmp_path)] == ["a"]
    w.append({"case": "c", "status": "skipped", "error": "bad file"})
    recs = D.read_manifest(tmp_path)
    assert [(r["case"], r["status"], r["rank"]) for r in recs] == [("a", "done", 1), ("c", "skipped", 1)]
    assert set(recs[1]) >= {"case", "rank", "status", "seconds", "error"}


def _fake_world(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(D, "rank_and_world", lambda: (rank, world))
    monkeypatch.setattr(D, "_all_gather", lambda mine: [{n: False for n in range(100)}])


class _NothingDone:
    def problem(self, item, record):
        return "no output"

    def record(self, item):
        return {}


@pytest.mark.parametrize("world", [2, 3, 4, 8])  # 8 > 5 cases: a resumed run with few left
def test_shards_cover_every_case_once_without_padding(monkeypatch, tmp_path, world):
    items = [{"image": f"/d/c{i}.nii.gz"} for i in range(5)]
    seen = []
    for rank in range(world):
        _fake_world(monkeypatch, rank, world)
        seen += [D.case_name(i) for i in D.CaseRunner(tmp_path, output_check=_NothingDone()).shard(items)]
    assert sorted(seen) == sorted(D.case_name(i) for i in items)  # each once: no duplicate padding


def test_duplicate_case_names_are_an_error(tmp_path, monkeypatch):
    _fake_world(monkeypatch, 0, 1)
    with pytest.raises(ValueError, match="both case 'x'"):
        D.CaseRunner(tmp_path, output_check=_NothingDone()).shard([{"image": "/a/x.nii.gz"}, {"image": "/b/x.nii.gz"}])


def test_nifti_output_check_accepts_whole_outputs_only(tmp_path):
    from monai.transforms import Compose, SaveImaged

    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    src = tmp_path / "in" / "case.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 4), np.float32), affine), str(src))
    post = Compose(
        [
            SaveImaged(
                keys="pred",
                output_dir=str(tmp_path / "out"),
                output_postfix="seg",
                separate_folder=False,
                resample=False,
            )
        ]
    )
    check = D.NiftiOutputCheck(post)
    item = {"image": str(src)}
    out = Path(check.output_path(item))
    assert out == tmp_path / "out" / "case_seg.nii.gz"
    assert "no output" in check.problem(item, None)
    out.parent.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((8, 9, 4), np.uint8), affine), str(out))
    assert check.problem(item, None) is None
    rec = {"status": "done", **check.record(item)}
    assert check.problem(item, rec) is None
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])  # cut: does not decompress, checksum differs
    assert "not a readable" in check.problem(item, None)
    assert "checksum" in check.problem(item, rec)
    nib.save(nib.Nifti1Image(np.ones((8, 9, 5), np.uint8), affine), str(out))
    assert "shape" in check.problem(item, None)
    nib.save(nib.Nifti1Image(np.ones((8, 9, 4), np.uint8), np.eye(4)), str(out))
    assert "affine" in check.problem(item, None)


# -- bundles under torchrun ---------------------------------------------------------------------------
def _data(demo_data: Path, out: Path, label_key: str, copies: int = 1) -> Path:
    """A datalist whose test list holds NUM_CASES phantoms (``copies`` times, under new names)."""
    out.mkdir(parents=True, exist_ok=True)
    relabelled_datalist(demo_data, out, label_key)
    content = json.loads((out / "datalist.json").read_text())
    pool = (content["training"] + content["validation"] + content["test"])[:NUM_CASES]
    test = []
    for k in range(copies):
        for item in pool:
            if copies == 1:
                test.append(item)
                continue
            new = {}
            for key, rel in item.items():
                link = Path(f"{key}_copies") / Path(rel).name.replace("phantom_", f"copy{k}_")
                (out / link).parent.mkdir(exist_ok=True)
                (out / link).symlink_to((demo_data / rel).resolve())
                new[key] = str(link)
            test.append(new)
    content["test"] = test
    (out / "datalist.json").write_text(json.dumps(content))
    return out


def _bundle(tmp_path: Path, name: str, overrides: dict, data: Path) -> Path:
    import shutil

    from tools.init_model import write_initial_model

    root = tmp_path / name
    shutil.copytree(REPO / "bundles" / name, root, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    write_initial_model(
        root, configs=["inference.json", "demo.json"], overrides={"dataset_dir": str(data), **overrides}
    )
    return root


def _torchrun_args(root: Path, configs: list[str], overrides: dict) -> list[str]:
    return torchrun_bundle_command(root, configs, overrides)


def _env() -> dict:
    return child_env()


def _torchrun(root: Path, configs: list[str], overrides: dict) -> None:
    proc = subprocess.run(
        _torchrun_args(root, configs, overrides),
        check=False,
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _predictions(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*_seg.nii.gz"))}


def _done_counts(folder: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in D.read_manifest(folder):
        if rec["status"] == "done":
            counts[rec["case"]] = counts.get(rec["case"], 0) + 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_two_rank_inference_and_evaluation_equal_a_single_process_run(name, demo_data, tmp_path):
    from shared_nets.engine import run_bundle_workflow

    overrides, label_key = BUNDLES[name]
    data = _data(demo_data, tmp_path / "data", label_key)
    root = _bundle(tmp_path, name, overrides, data)
    over = {"dataset_dir": str(data), **overrides}

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    run_bundle_workflow(root, ["inference.json", "demo.json"], "infer", {**over, "output_dir": str(single)})
    _torchrun(root, ["inference.json", "multi_gpu_inference.json", "demo.json"], {**over, "output_dir": str(sharded)})
    ref, got = _predictions(single), _predictions(sharded)
    assert len(ref) == NUM_CASES and sorted(got) == sorted(ref)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{name}: {key} differs")
    counts = _done_counts(sharded)
    assert counts == {k.replace("_seg.nii.gz", ""): 1 for k in ref}, counts
    assert {r["rank"] for r in D.read_manifest(sharded)} == {0, 1}
    assert not list(sharded.glob("manifest.rank*.jsonl"))  # merged into manifest.jsonl

    if name not in EVALUATE_BUNDLES:
        return
    single_ev, sharded_ev = tmp_path / "single_ev", tmp_path / "sharded_ev"
    run_bundle_workflow(
        root, ["train.json", "evaluate.json", "demo.json"], "infer", {**over, "output_dir": str(single_ev)}
    )
    _torchrun(
        root,
        ["train.json", "evaluate.json", "multi_gpu_evaluate.json", "demo.json"],
        {**over, "output_dir": str(sharded_ev)},
    )
    reports = _reports(single_ev)
    # Med-SA: one evaluation per prompt setting in its own folder, plus the settings summary
    folders = sorted(p.parent.relative_to(single_ev) for p in single_ev.rglob("metrics.csv"))
    assert folders and all(str(f / r) in reports for f in folders for r in ("metrics.md", "val_mean_dice_raw.csv"))
    assert _reports(sharded_ev) == reports
    for report in reports:
        assert (sharded_ev / report).read_text() == (single_ev / report).read_text(), f"{name}: {report} differs"
    for folder in folders:
        counts = _done_counts(sharded_ev / folder)
        assert counts and set(counts.values()) == {1}, counts
        assert {r["rank"] for r in D.read_manifest(sharded_ev / folder)} == {0, 1}
        assert not list((sharded_ev / folder).glob("manifest.rank*.jsonl"))
    if name == "med_sa":  # items are (volume, class present) pairs; every pair once
        assert all(len(_done_counts(sharded_ev / f)) > NUM_CASES for f in folders)
        assert {"prompt_settings.md", "prompt_settings_summary.csv", "1-point/refinement_curve.csv"} <= set(reports)
    else:
        assert len(_done_counts(sharded_ev)) == NUM_CASES


def _reports(folder: Path) -> list[str]:
    """The report files (CSV, markdown, JSON summaries) under ``folder``, relative, without the manifest."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.suffix in (".csv", ".md", ".json") and p.name != "manifest.jsonl" and not p.name.startswith(".")
    )


def _kill_after_first_case(root, configs, over, out):
    """Start a 2-rank torchrun job and SIGKILL the whole job (torchrun and both workers) once a case is done."""
    proc = subprocess.Popen(
        _torchrun_args(root, configs, over),
        cwd=root,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_first_case(out, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for_first_case(folder: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if any(r["status"] == "done" for r in D.read_manifest(folder)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no case finished before the job ended/timed out (rc {proc.poll()})")


@pytest.mark.slow
def test_killed_inference_reruns_only_the_unfinished_cases(demo_data, tmp_path):
    from shared_nets.engine import run_bundle_workflow

    overrides, label_key = BUNDLES["ma_sam"]
    ref_data = _data(demo_data, tmp_path / "ref_data", label_key)
    data = _data(demo_data, tmp_path / "data", label_key, copies=4)  # 12 cases
    root = _bundle(tmp_path, "ma_sam", overrides, data)
    reference = _predictions_of(root, ref_data, overrides, tmp_path / "single", run_bundle_workflow)

    out = tmp_path / "sharded"
    configs = ["inference.json", "multi_gpu_inference.json", "demo.json"]
    over = {"dataset_dir": str(data), "output_dir": str(out), **overrides}
    _kill_after_first_case(root, configs, over, out)
    before = _done_counts(out)
    assert 0 < len(before) < 12, f"kill came too late to test a rerun: {before}"
    assert not (out / "manifest.jsonl").exists()  # killed before the merge: only per-rank files

    _torchrun(root, configs, over)
    after = _done_counts(out)
    assert len(after) == 12 and set(after.values()) == {1}, after  # every case done exactly once over both runs
    rerun = {r["case"] for r in D.read_manifest(out) if r["status"] == "done" and r["case"] not in before}
    assert rerun == set(after) - set(before)
    got = _predictions(out)
    assert len(got) == 12
    for key, arr in got.items():
        original = "phantom_" + key.split("_", 1)[1]
        np.testing.assert_array_equal(arr, reference[original], err_msg=key)


def _predictions_of(root, data, overrides, out, run) -> dict[str, np.ndarray]:
    run(root, ["inference.json", "demo.json"], "infer", {"dataset_dir": str(data), "output_dir": str(out), **overrides})
    return _predictions(out)


def test_bad_input_is_skipped_with_its_reason_and_retried_on_rerun(demo_data, tmp_path):
    """One process without torchrun (the configs run as a world of one): a missing volume gets a ``skipped``
    manifest line with its reason, the others are written; a rerun runs only the skipped case again."""
    from shared_nets.engine import run_bundle_workflow

    overrides, label_key = BUNDLES["ma_sam"]
    data = _data(demo_data, tmp_path / "data", label_key)
    content = json.loads((data / "datalist.json").read_text())
    content["test"].append({"image": "imagesTr/missing_case.nii.gz", "label": content["test"][0]["label"]})
    (data / "datalist.json").write_text(json.dumps(content))
    root = _bundle(tmp_path, "ma_sam", overrides, data)
    out = tmp_path / "out"
    configs = ["inference.json", "multi_gpu_inference.json", "demo.json"]
    over = {"dataset_dir": str(data), "output_dir": str(out), **overrides}
    run_bundle_workflow(root, configs, "infer", over)
    first = D.read_manifest(out)
    status = {r["case"]: r["status"] for r in first}
    assert status.pop("missing_case") == "skipped" and set(status.values()) == {"done"} and len(status) == NUM_CASES
    bad = next(r for r in first if r["case"] == "missing_case")
    assert "missing_case.nii.gz" in bad["error"] and "\n" not in bad["error"]
    assert len(_predictions(out)) == NUM_CASES

    run_bundle_workflow(root, configs, "infer", over)
    second = D.read_manifest(out)[len(first) :]
    assert [(r["case"], r["status"]) for r in second] == [("missing_case", "skipped")]


@pytest.mark.slow
def test_killed_evaluation_reruns_only_the_unfinished_cases_and_reports_all(demo_data, tmp_path):
    from shared_nets.engine import run_bundle_workflow

    overrides, label_key = BUNDLES["h_sam"]
    data = _data(demo_data, tmp_path / "data", label_key, copies=3)  # 9 cases
    root = _bundle(tmp_path, "h_sam", overrides, data)
    single = tmp_path / "single"
    run_bundle_workflow(
        root,
        ["train.json", "evaluate.json", "demo.json"],
        "infer",
        {"dataset_dir": str(data), "output_dir": str(single), **overrides},
    )
    out = tmp_path / "sharded"
    configs = ["train.json", "evaluate.json", "multi_gpu_evaluate.json", "demo.json"]
    over = {"dataset_dir": str(data), "output_dir": str(out), **overrides}
    _kill_after_first_case(root, configs, over, out)
    before = _done_counts(out)
    assert 0 < len(before) < 9, f"kill came too late to test a rerun: {before}"
    assert not (out / "metrics.csv").exists()

    _torchrun(root, configs, over)
    after = _done_counts(out)
    assert len(after) == 9 and set(after.values()) == {1}, after
    for report in sorted(p.name for p in single.iterdir() if p.suffix in (".csv", ".md")):
        assert (out / report).read_text() == (single / report).read_text(), report


def test_seeded_datasets_draw_the_same_for_a_case_at_any_position():
    """Per-case seeds: a case's random preprocessing does not depend on what came before it (or on the rank)."""
    from monai.transforms import Compose, RandGaussianNoised

    from shared_nets.data import CaseSeededDataset, SkippingDataset

    items = [{"image": f"/d/c{i}.nii.gz", "x": np.zeros((1, 8), np.float32)} for i in range(3)]

    def make(cls, data, **kw):
        return cls(data, Compose([RandGaussianNoised(keys="x", prob=1.0)]), seed=7, **kw)

    for cls in (SkippingDataset, CaseSeededDataset):
        full = make(cls, items)
        alone = make(cls, items[2:])
        np.testing.assert_array_equal(np.asarray(full[2]["x"]), np.asarray(alone[0]["x"]))
        assert not np.array_equal(np.asarray(full[0]["x"]), np.asarray(full[1]["x"]))
    plain = SkippingDataset(items, Compose([RandGaussianNoised(keys="x", prob=1.0)]))  # no seed: one stream
    plain.transform.set_random_state(seed=0)
    first = np.asarray(plain[0]["x"])
    assert not np.array_equal(first, np.asarray(plain[0]["x"]))


@pytest.mark.slow
def test_med_sa_evaluation_resumes_per_prompt_setting(demo_data, tmp_path):
    """Med-SA's sharded evaluation as a world of one: a run cut short in one prompt setting (its last records
    lost, its reports not yet written) reruns only those items there, none of the finished settings', and
    ends with the same reports."""
    from shared_nets.engine import run_bundle_workflow

    overrides, label_key = BUNDLES["med_sa"]
    data = _data(demo_data, tmp_path / "data", label_key)
    root = _bundle(tmp_path, "med_sa", overrides, data)
    out = tmp_path / "out"
    configs = ["train.json", "evaluate.json", "multi_gpu_evaluate.json", "demo.json"]
    over = {"dataset_dir": str(data), "output_dir": str(out), "prompt_settings": ["1-point", "bbox0.75"], **overrides}
    run_bundle_workflow(root, configs, "infer", over)
    first = {name: (out / name).read_text() for name in _reports(out)}
    cut = out / "bbox0.75"
    lines = (cut / "manifest.jsonl").read_text().splitlines(keepends=True)
    lost = {json.loads(line)["case"] for line in lines[-2:]}
    (cut / "manifest.jsonl").write_text("".join(lines[:-2]))
    for report in cut.glob("*.csv"):
        report.unlink()
    run_bundle_workflow(root, configs, "infer", over)
    rerun = [r for r in D.read_manifest(cut) if r["status"] == "done"][len(lines) - 2 :]
    assert {r["case"] for r in rerun} == lost and len(rerun) == 2
    assert len(D.read_manifest(out / "1-point")) == len(lines)  # nothing rerun in the finished setting
    assert {name: (out / name).read_text() for name in _reports(out)} == first
