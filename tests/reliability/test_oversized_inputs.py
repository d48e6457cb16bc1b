"""Oversized volumes are refused from their headers, before any voxel is allocated.

A NIfTI header can claim 4096^3 voxels in 352 bytes, and a ``.nii.gz`` of a few MB can inflate to many
GB. ``shared_nets.data.CheckVolumeSized`` (before ``LoadImaged`` in every bundle's inference and training
pipeline, limits in the config key ``input_limits``) must refuse both with one line naming the file,
keep the process's memory small while doing so, and let normal volumes through.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared_nets.data import DEFAULT_MAX_VOXELS, CheckVolumeSized, DataError, root_cause, volume_size
from tests.reliability.hostile_files import gzip_bomb, honest_gzip_bomb, huge_header_nifti

REPO = Path(__file__).resolve().parents[2]
BUNDLES = ["ma_sam", "med_sa", "sam3d_adapter", "s_sam", "h_sam"]

_MEASURE = r"""
import json, sys
from shared_nets.data import CheckVolumeSized, root_cause

def status(key):  # kB
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

check = CheckVolumeSized("image")
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current resident size
    f.write("5")
answers = {}
for fn in sys.argv[1:]:
    try:
        check({"image": fn})
        answers[fn] = "accepted"
    except Exception as e:
        answers[fn] = root_cause(e)
print(json.dumps({"answers": answers, "peak_rss_growth_kib": status("VmHWM:") - before}))
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    return {
        "huge": huge_header_nifti(tmp / "huge_header.nii"),
        "bomb": gzip_bomb(tmp / "bomb.nii.gz", zeros_gib=8),
        "honest": honest_gzip_bomb(tmp / "honest_bomb.nii.gz"),
    }


def test_hostile_files_are_what_they_claim(hostile):
    assert hostile["huge"].stat().st_size == 352 and volume_size(hostile["huge"])[0] == (4096, 4096, 4096)
    assert hostile["bomb"].stat().st_size < 20 << 20 and volume_size(hostile["bomb"])[0] == (64, 64, 64)
    assert hostile["honest"].stat().st_size < 20 << 20 and volume_size(hostile["honest"])[1] == 2048**3


def test_huge_header_and_gzip_bombs_are_refused_with_small_peak_memory(hostile):
    """In a fresh process: each file is refused with its name, and the peak resident memory (the kernel's
    high-water mark, reset before the checks) grows by less than 64 MiB over the checks (loading any of them
    would need 0.5 to 128 GiB)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident memory")
    files = [str(hostile[k]) for k in ("huge", "bomb", "honest")]
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *files],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    answers = result["answers"]
    huge, bomb, honest = (answers[f] for f in files)
    assert "huge_header.nii' (image) is too large" in huge and "68,719,476,736 voxels" in huge, huge
    assert "bomb.nii.gz' (image) decompresses to more than its header's 524,640 bytes" in bomb, bomb
    assert "honest_bomb.nii.gz' (image) is too large" in honest and "(max_voxels)" in honest, honest
    assert all("\n" not in a for a in answers.values())
    assert result["peak_rss_growth_kib"] < 64 * 1024, result


def test_normal_volumes_pass(demo_data, real_ct_file):
    check = CheckVolumeSized(["image", "label"])
    item = json.loads((demo_data / "datalist.json").read_text())["training"][0]
    item = {k: str(demo_data / v) for k, v in item.items() if k in ("image", "label")}
    assert check(item) == item
    assert check({"image": str(real_ct_file)}) == {"image": str(real_ct_file)}
    assert check({"image": np.zeros((1, 4, 4, 4))})["image"].shape == (1, 4, 4, 4)  # in-memory data pass


def test_the_limits_are_configurable_and_named(demo_data):
    fn = str(demo_data / json.loads((demo_data / "datalist.json").read_text())["training"][0]["image"])
    _, voxels, nbytes = volume_size(fn)
    CheckVolumeSized("image", max_voxels=voxels, max_bytes=nbytes)({"image": fn})  # the limits are inclusive
    with pytest.raises(DataError, match=r"the limit is 1,000 \(max_voxels\)"):
        CheckVolumeSized("image", max_voxels=1000)({"image": fn})
    with pytest.raises(DataError, match=r"bytes uncompressed; the limit is 1,000 \(max_bytes\)"):
        CheckVolumeSized("image", max_bytes=1000)({"image": fn})
    with pytest.raises(ValueError, match="max_voxels must be a positive integer"):
        CheckVolumeSized("image", max_voxels=0)
    assert DEFAULT_MAX_VOXELS == 512 * 512 * 2048


def test_truncated_gzip_is_left_to_the_loader(tmp_path, demo_data):
    """A cut ``.nii.gz`` is not the size check's business: it passes, and LoadImaged names it."""
    fn = demo_data / json.loads((demo_data / "datalist.json").read_text())["training"][0]["image"]
    blob = fn.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(blob[: len(blob) // 2])
    assert CheckVolumeSized("image")({"image": str(cut)}) == {"image": str(cut)}


def test_dicom_folder_is_bounded_by_rows_columns_and_files(tmp_path):
    from shared_nets.dicom import write_dicom_series

    folder = tmp_path / "series"
    write_dicom_series(np.zeros((32, 24, 6), np.int16), np.eye(4), folder)
    shape, voxels, nbytes = volume_size(folder)
    assert sorted(shape) == [6, 24, 32] and voxels == 32 * 24 * 6 and nbytes == voxels * 2
    CheckVolumeSized("image")({"image": str(folder)})
    with pytest.raises(DataError, match=r"series' \(image\) is too large.*4,608 voxels; the limit is 4,000"):
        CheckVolumeSized("image", max_voxels=4000)({"image": str(folder)})


@pytest.fixture(scope="module")
def real_ct_file() -> Path:
    from tests.conftest import REAL_CT

    if not (REAL_CT / "ct.nii.gz").is_file():
        pytest.skip("real CT example absent: no data/totalsegmentator_example/ct.nii.gz (nor a ../shared copy)")
    return REAL_CT / "ct.nii.gz"


# -- the bundles: the check stands before every loader, with the limits from one config key --------------
def _loaders(node, path=""):
    if isinstance(node, list):
        for i, t in enumerate(node):
            if isinstance(t, dict) and t.get("_target_") == "shared_nets.data.LoadImaged":
                yield f"{path}#{i}", (node[i - 1] if i else None), t
            yield from _loaders(t, f"{path}#{i}")
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _loaders(v, f"{path}#{k}" if path else k)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_loader_of_every_bundle_is_preceded_by_the_size_check(bundle):
    for name in ("inference.json", "train.json"):
        config = json.loads((REPO / "bundles" / bundle / "configs" / name).read_text())
        assert config["input_limits"] == {"max_voxels": 512 * 512 * 2048, "max_bytes": 4 * 1024**3}
        loaders = list(_loaders(config))
        assert loaders, f"{bundle}/{name} has no LoadImaged"
        for where, before, loader in loaders:
            assert before is not None and before.get("_target_") == "shared_nets.data.CheckVolumeSized", where
            assert before["keys"] == loader["keys"] and before.get("_disabled_") == loader.get("_disabled_"), where
            assert before["max_voxels"] == "@input_limits#max_voxels", where
            assert before["max_bytes"] == "@input_limits#max_bytes", where


@pytest.mark.parametrize("bundle", BUNDLES)
def test_training_preprocessing_refuses_a_huge_volume(bundle, demo_data, hostile):
    from monai.bundle import ConfigParser

    root = REPO / "bundles" / bundle
    parser = ConfigParser()
    parser.read_meta(str(root / "configs" / "metadata.json"))  # S-SAM reads its class names from it
    parser.read_config([str(root / "configs" / "train.json"), str(root / "configs" / "demo.json")])
    parser["bundle_root"], parser["dataset_dir"] = str(root), str(demo_data)
    item = json.loads((demo_data / "datalist.json").read_text())["training"][0]
    item = {k: str(demo_data / v) if isinstance(v, str) else v for k, v in item.items()}
    item["image"] = str(hostile["huge"])
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("train#preprocessing")(item)
    assert "huge_header.nii' (image) is too large" in root_cause(err.value)


def test_batch_inference_skips_a_huge_volume_and_writes_the_others(demo_data, hostile, tmp_path):
    """``monai.bundle run`` inference: the hostile files are reported in skipped.json with the reason, the
    good volumes are written."""
    import shutil

    from tests.bundle_harness import run_workflow, write_initial_model

    bundle = tmp_path / "ma_sam"
    shutil.copytree(REPO / "bundles" / "ma_sam", bundle, ignore=shutil.ignore_patterns("models", "eval"))
    good = str(demo_data / json.loads((demo_data / "datalist.json").read_text())["test"][0]["image"])
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps({"test": [{"image": str(hostile["huge"])}, {"image": str(hostile["bomb"])}, {"image": good}]})
    )
    write_initial_model(bundle)
    out = tmp_path / "out"
    run_workflow(
        bundle,
        ["inference.json", "demo.json"],
        "infer",
        {"dataset_dir": str(demo_data), "data_list_file_path": str(datalist), "output_dir": str(out)},
    )
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == [Path(good).name.replace(".nii.gz", "_seg.nii.gz")]
    report = json.loads((out / "skipped.json").read_text())["skipped"]
    assert [r["image"] for r in report] == [str(hostile["huge"]), str(hostile["bomb"])]
    assert "is too large" in report[0]["reason"] and "decompresses to more" in report[1]["reason"]
