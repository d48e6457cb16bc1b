"""Bad input, clear errors, nothing lost: a table of bad inputs across the data checks, transforms,
networks, checkpoints, prompts and tools. Each must fail with ONE line (the innermost error, which is
what MONAI's wrappers chain to) that names the file or key and says what was expected.

The same case ids make up the table in ``docs/reliability.md`` (checked below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from shared_nets.data import root_cause

REPO = Path(__file__).resolve().parents[2]
SHAPE = (16, 16, 8)


def _nii(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _pair(tmp: Path, image: np.ndarray | None = None, label: np.ndarray | None = None, label_affine=None) -> dict:
    image = np.zeros(SHAPE, np.float32) if image is None else image
    label = np.zeros(image.shape[:3], np.uint8) if label is None else label
    return {"image": _nii(tmp / "img.nii.gz", image), "label": _nii(tmp / "lab.nii.gz", label, label_affine)}


def _meta(arr: np.ndarray, name: str = "/data/case_7.nii.gz"):
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(arr), meta={"filename_or_obj": name})


# -- the cases: (id, description for the docs, function(tmp) that must raise, substrings of the message) --
def datalist_missing(tmp):
    from shared_nets.data import load_datalist

    load_datalist(tmp / "nope.json")


def datalist_not_json(tmp):
    from shared_nets.data import load_datalist

    (tmp / "bad.json").write_text("{ not json")
    load_datalist(tmp / "bad.json")


def datalist_no_split(tmp):
    from shared_nets.data import load_datalist

    (tmp / "d.json").write_text(json.dumps({"validation": []}))
    load_datalist(tmp / "d.json", "training")


def datalist_entry_without_label(tmp):
    from shared_nets.data import load_datalist

    item = _pair(tmp)
    (tmp / "d.json").write_text(json.dumps({"training": [{"image": item["image"]}]}))
    load_datalist(tmp / "d.json", "training", keys=["image", "label"])


def datalist_file_does_not_exist(tmp):
    from shared_nets.data import load_datalist

    (tmp / "d.json").write_text(json.dumps({"training": [{"image": "gone/case_1.nii.gz"}]}))
    load_datalist(tmp / "d.json", "training")


def image_not_nifti(tmp):
    from shared_nets.data import check_volumes

    (tmp / "junk.nii.gz").write_bytes(b"this is not an image" * 10)
    check_volumes([{"image": str(tmp / "junk.nii.gz")}], label_key=None)


def image_truncated(tmp):
    from shared_nets.data import LoadImaged

    path = _nii(tmp / "cut.nii.gz", np.random.default_rng(0).random((32, 32, 32), dtype=np.float32))
    blob = Path(path).read_bytes()
    Path(path).write_bytes(blob[: len(blob) // 2])  # header intact, data cut: only a full read notices
    LoadImaged(keys="image")({"image": path})


def image_2d_for_3d_bundle(tmp):
    from shared_nets.data import check_volumes

    check_volumes([{"image": _nii(tmp / "slice.nii.gz", np.zeros((16, 16), np.float32))}], label_key=None)


def image_wrong_channel_count(tmp):
    from shared_nets.data import check_volumes

    check_volumes([{"image": _nii(tmp / "two.nii.gz", np.zeros((*SHAPE, 2), np.float32))}], label_key=None)


def image_empty(tmp):
    from shared_nets.data import check_volumes

    check_volumes([{"image": _nii(tmp / "empty.nii.gz", np.zeros((16, 16, 0), np.float32))}], label_key=None)


def image_too_few_slices(tmp):
    from shared_nets.data import check_volumes

    check_volumes([_pair(tmp, np.zeros((16, 16, 3), np.float32))], min_depth=5)


def label_shape_mismatch(tmp):
    from shared_nets.data import check_volumes

    check_volumes([_pair(tmp, label=np.zeros((16, 16, 7), np.uint8))])


def label_affine_mismatch(tmp):
    from shared_nets.data import check_volumes

    shifted = np.eye(4)
    shifted[:3, 3] = [0, 0, 2.5]
    check_volumes([_pair(tmp, label_affine=shifted)])


def label_values_outside_num_classes(tmp):
    from shared_nets.data import check_volumes

    lab = np.zeros(SHAPE, np.uint8)
    lab[2, 2, 2] = 5
    check_volumes([_pair(tmp, label=lab)], num_classes=3)


def label_not_integer(tmp):
    from shared_nets.data import CheckLabelRanged

    lab = np.zeros((1, *SHAPE), np.float32)
    lab[0, 1, 1, 1] = 0.5
    CheckLabelRanged("label", num_classes=3)({"label": _meta(lab, "/data/lab_7.nii.gz")})


def image_nan(tmp):
    from shared_nets.data import CheckFinited

    img = np.zeros((1, *SHAPE), np.float32)
    img[0, 3, 3, 3] = np.nan
    CheckFinited("image")({"image": _meta(img)})


def image_inf(tmp):
    from shared_nets.data import CheckFinited

    img = np.zeros((1, *SHAPE), np.float32)
    img[0, 3, 3, 3] = -np.inf
    CheckFinited("image")({"image": _meta(img)})


def sam_checkpoint_of_another_variant(tmp):
    from shared_nets.sam import build_sam

    state = build_sam("tiny", None, img_size=64).state_dict()
    state["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)  # a ViT-B patch embedding
    torch.save(state, tmp / "sam_vit_b.pth")
    build_sam("tiny", str(tmp / "sam_vit_b.pth"), img_size=64)


def _load_into_masam(tmp, path):
    from ignite.engine import Engine

    from shared_nets.engine import CheckpointLoader
    from shared_nets.ma_sam import build_ma_sam

    net = build_ma_sam(variant="tiny", checkpoint=None, img_size=64, num_classes=3, patch_size=8)
    engine = Engine(lambda e, b: None)
    CheckpointLoader(load_path=str(path), load_dict={"model": net}).attach(engine)
    engine.run([0], max_epochs=1)


def model_checkpoint_of_another_method(tmp):
    from shared_nets.h_sam import build_h_sam

    torch.save(build_h_sam(variant="tiny", checkpoint=None, img_size=64, num_classes=3).state_dict(), tmp / "model.pt")
    _load_into_masam(tmp, tmp / "model.pt")


def model_checkpoint_other_num_classes(tmp):
    from shared_nets.ma_sam import build_ma_sam

    other = build_ma_sam(variant="tiny", checkpoint=None, img_size=64, num_classes=5, patch_size=8)
    torch.save(other.state_dict(), tmp / "model.pt")
    _load_into_masam(tmp, tmp / "model.pt")


def model_checkpoint_corrupt(tmp):
    (tmp / "model.pt").write_bytes(b"PK\x03\x04 truncated")
    _load_into_masam(tmp, tmp / "model.pt")


def model_checkpoint_missing(tmp):
    _load_into_masam(tmp, tmp / "models" / "model.pt")


def prompt_wrong_format(tmp):
    from monai.data import MetaTensor

    from shared_nets.prompts import PointsToGridd

    img = MetaTensor(torch.zeros(1, *SHAPE), affine=torch.eye(4))
    PointsToGridd(keys=["foreground"], ref_key="image")({"image": img, "foreground": [1, 2]})


def prompt_outside_the_image(tmp):
    from monai.data import MetaTensor

    from shared_nets.prompts import PointsToGridd

    img = MetaTensor(torch.zeros(1, *SHAPE), affine=torch.eye(4))
    PointsToGridd(keys=["foreground"], ref_key="image", on_outside="raise")({"image": img, "foreground": [[40, 2, 2]]})


def override_wrong_type(tmp):
    from shared_nets.ma_sam import build_ma_sam

    build_ma_sam(variant="tiny", checkpoint=None, img_size="512px", num_classes=3)  # `--img_size 512px`


def override_unknown_variant(tmp):
    from shared_nets.h_sam import build_h_sam

    build_h_sam(variant="vit_xl", checkpoint=None, img_size=64, num_classes=3)  # `--variant vit_xl`


def tool_unknown_dataset(tmp):
    proc = subprocess.run(
        [sys.executable, "-m", "tools", "prepare", "brats99", "--src", str(tmp), "--out", str(tmp / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.returncode else "no error")


def _dicom_series(tmp, name: str = "series", slices: int = 6):
    from shared_nets.dicom import write_dicom_series

    write_dicom_series(np.zeros((8, 8, slices), np.int16), np.diag([1.0, 1.0, 2.0, 1.0]), tmp / name)
    return tmp / name


def dicom_series_missing_slice(tmp):
    from shared_nets.dicom import CheckDicomSeriesd

    folder = _dicom_series(tmp)
    (folder / "slice_0002.dcm").unlink()
    CheckDicomSeriesd("image")({"image": str(folder)})


def dicom_series_inconsistent(tmp):
    import pydicom

    from shared_nets.dicom import CheckDicomSeriesd

    folder = _dicom_series(tmp)
    ds = pydicom.dcmread(str(folder / "slice_0003.dcm"))
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(str(folder / "slice_0003.dcm"))
    CheckDicomSeriesd("image")({"image": str(folder)})


def dicom_series_mixed(tmp):
    import shutil

    from shared_nets.dicom import CheckDicomSeriesd

    folder = _dicom_series(tmp)
    other = _dicom_series(tmp, "other", slices=2)
    shutil.copy(other / "slice_0000.dcm", folder / "other_0000.dcm")
    CheckDicomSeriesd("image")({"image": str(folder)})


def dicom_seg_for_a_nifti_input(tmp):
    from shared_nets.dicom import CheckDicomSeriesd

    CheckDicomSeriesd("image", require_series=True)({"image": _nii(tmp / "ct.nii.gz", np.zeros(SHAPE, np.float32))})


def image_too_large(tmp):
    from shared_nets.data import CheckVolumeSized
    from tests.reliability.hostile_files import huge_header_nifti

    CheckVolumeSized("image")({"image": str(huge_header_nifti(tmp / "huge.nii"))})


def image_gzip_bomb(tmp):
    from shared_nets.data import CheckVolumeSized
    from tests.reliability.hostile_files import gzip_bomb

    CheckVolumeSized("image")({"image": str(gzip_bomb(tmp / "bomb.nii.gz", zeros_gib=1))})


CASES = [
    ("datalist_missing", datalist_missing, ["nope.json", "does not exist"]),
    ("datalist_not_json", datalist_not_json, ["bad.json", "not readable JSON"]),
    ("datalist_no_split", datalist_no_split, ["d.json", "'training'"]),
    ("datalist_entry_without_label", datalist_entry_without_label, ["entry 0", "'label'"]),
    ("datalist_file_does_not_exist", datalist_file_does_not_exist, ["case_1.nii.gz", "does not exist"]),
    ("image_not_nifti", image_not_nifti, ["junk.nii.gz", "not a readable NIfTI"]),
    ("image_truncated", image_truncated, ["cut.nii.gz", "could not be read"]),
    ("image_2d_for_3d_bundle", image_2d_for_3d_bundle, ["slice.nii.gz", "expected a 3D volume"]),
    ("image_wrong_channel_count", image_wrong_channel_count, ["two.nii.gz", "2 channels", "1 channel"]),
    ("image_empty", image_empty, ["empty.nii.gz", "is empty"]),
    ("image_too_few_slices", image_too_few_slices, ["img.nii.gz", "at least 5"]),
    ("label_shape_mismatch", label_shape_mismatch, ["lab.nii.gz", "expected the image's"]),
    ("label_affine_mismatch", label_affine_mismatch, ["lab.nii.gz", "img.nii.gz", "affine"]),
    ("label_values_outside_num_classes", label_values_outside_num_classes, ["lab.nii.gz", "[0, 2]"]),
    ("label_not_integer", label_not_integer, ["lab_7.nii.gz", "expected integers"]),
    ("image_nan", image_nan, ["case_7.nii.gz", "NaN or Inf"]),
    ("image_inf", image_inf, ["case_7.nii.gz", "NaN or Inf"]),
    ("sam_checkpoint_of_another_variant", sam_checkpoint_of_another_variant, ["sam_vit_b.pth", "expected a tiny"]),
    ("model_checkpoint_of_another_method", model_checkpoint_of_another_method, ["model.pt", "does not fit"]),
    ("model_checkpoint_other_num_classes", model_checkpoint_other_num_classes, ["model.pt", "mis-shaped"]),
    ("model_checkpoint_corrupt", model_checkpoint_corrupt, ["model.pt", "not a readable PyTorch checkpoint"]),
    ("model_checkpoint_missing", model_checkpoint_missing, ["model.pt", "does not exist"]),
    ("prompt_wrong_format", prompt_wrong_format, ["'foreground'", "[i, j, k]"]),
    ("prompt_outside_the_image", prompt_outside_the_image, ["'foreground'", "[40, 2, 2]", "outside"]),
    ("override_wrong_type", override_wrong_type, ["img_size", "'512px'"]),
    ("override_unknown_variant", override_unknown_variant, ["variant", "vit_xl"]),
    ("tool_unknown_dataset", tool_unknown_dataset, ["brats99", "must be one of"]),
    ("dicom_series_missing_slice", dicom_series_missing_slice, ["DICOM series folder '", "series'", "gap of 4 mm"]),
    ("dicom_series_inconsistent", dicom_series_inconsistent, ["series'", "inconsistent slices", "PixelSpacing"]),
    ("dicom_series_mixed", dicom_series_mixed, ["series'", "mixes 2 series"]),
    ("image_too_large", image_too_large, ["huge.nii", "is too large", "(4096, 4096, 4096)", "(max_voxels)"]),
    ("image_gzip_bomb", image_gzip_bomb, ["bomb.nii.gz", "decompresses to more than its header's"]),
    ("dicom_seg_for_a_nifti_input", dicom_seg_for_a_nifti_input, ["output_dicom_seg", "ct.nii.gz", "is not one"]),
]


@pytest.mark.parametrize("case, func, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(case, func, expected, tmp_path):
    with pytest.raises(Exception) as err:
        func(tmp_path)
    line = root_cause(err.value)
    assert "\n" not in line and len(line) < 400, line
    for text in expected:
        assert text in line, f"{case}: {text!r} not in {line!r}"


def test_the_docs_table_lists_every_case():
    doc = (REPO / "docs" / "reliability.md").read_text()
    missing = [c[0] for c in CASES if f"`{c[0]}`" not in doc]
    assert not missing, f"docs/reliability.md lacks rows for {missing}"
    assert len(CASES) >= 20


# -- batch inference: one bad volume is reported and skipped, the others are written ---------------------
def test_batch_inference_skips_and_reports_a_bad_volume(demo_data, tmp_path):
    import shutil

    from tests.bundle_harness import run_workflow, write_initial_model

    bundle = tmp_path / "ma_sam"
    shutil.copytree(REPO / "bundles" / "ma_sam", bundle, ignore=shutil.ignore_patterns("models", "eval"))
    content = json.loads((demo_data / "datalist.json").read_text())
    good = [str(demo_data / item["image"]) for item in content["validation"][:1] + content["test"][:1]]
    broken = tmp_path / "broken.nii.gz"
    blob = Path(good[0]).read_bytes()
    broken.write_bytes(blob[: len(blob) // 3])
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps(
            {
                "test": [
                    {"image": good[0]},
                    {"image": str(broken)},
                    {"image": str(tmp_path / "missing.nii.gz")},
                    {"image": good[1]},
                ]
            }
        )
    )
    write_initial_model(bundle)

    out = tmp_path / "out"
    run_workflow(
        bundle,
        ["inference.json", "demo.json"],
        "infer",
        {"dataset_dir": str(demo_data), "data_list_file_path": str(datalist), "output_dir": str(out)},
    )
    written = sorted(p.name for p in out.glob("*_seg.nii.gz"))
    assert written == sorted(Path(g).name.replace(".nii.gz", "_seg.nii.gz") for g in good)
    report = json.loads((out / "skipped.json").read_text())["skipped"]
    assert [r["image"] for r in report] == [str(broken), str(tmp_path / "missing.nii.gz")]
    assert "could not be read" in report[0]["reason"] and "missing.nii.gz" in report[1]["reason"]


# -- a bad volume while the cache is filled: exit 1 with the error, never abort -------------------------
def test_failed_cache_fill_leaves_no_worker_thread_running():
    """The root cause of the aborts: MONAI's cache filling let its (daemon) worker thread run on after an
    item failed; the interpreter then shut down under it. Ours joins the pool before the error goes up."""
    import threading

    from monai.transforms import Compose, Lambdad

    from shared_nets.data import CheckFinited, DataError, build_dataset

    release = threading.Event()  # the second item's transform waits for it: the worker is busy when item 0 fails
    items = [
        {"image": _meta(np.full((1, 4, 4, 4), np.nan, np.float32), "/data/bad.nii.gz")},
        {"image": _meta(np.zeros((1, 4, 4, 4), np.float32), "/data/good.nii.gz")},
    ]
    transform = Compose([CheckFinited("image"), Lambdad("image", lambda x: release.wait(30) and x)])
    before = set(threading.enumerate())
    timer = threading.Timer(1.0, release.set)  # lets the busy worker finish, so the join can end
    timer.start()
    try:
        with pytest.raises(RuntimeError) as err:  # MONAI's "applying transform" around our DataError
            build_dataset("CacheDataset", items, transform, num_workers=0)
        assert isinstance(err.value.__cause__, DataError) and "bad.nii.gz" in root_cause(err.value)
        left = [
            t.name
            for t in set(threading.enumerate()) - before - {timer}
            if t.is_alive() and type(t).__name__ != "TMonitor"
        ]  # tqdm's idle monitor is harmless
    finally:
        release.set()
        timer.join()
    assert not left, f"threads still running after the cache fill failed: {left}"


def test_every_bundle_caches_with_the_joining_cache_dataset():
    """The validation datasets are cached too: they must use the same class, not MONAI's."""
    for config in sorted(REPO.glob("bundles/*/configs/*.json")):
        text = config.read_text()
        assert '"_target_": "CacheDataset"' not in text, f"{config} uses MONAI's CacheDataset"


@pytest.mark.slow
def test_bad_volume_during_cache_fill_exits_1_every_time(tmp_path):
    """Field report: a NaN/truncated volume printed its DataError and then aborted with "terminate called
    without an active exception" (exit 134) in about half of the runs. Three runs of a worker that keeps
    the cache thread inside torch at exit aborted 5 of 6 times before the fix; each must exit 1."""
    worker = REPO / "tests" / "reliability" / "bad_cache_worker.py"
    for run in range(3):
        proc = subprocess.run(
            [sys.executable, str(worker), str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 1, f"run {run}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        assert "bad.nii.gz' (image) contains NaN or Inf values" in proc.stderr
        assert "terminate called" not in proc.stderr


# -- inference: a volume with the wrong channel count is named up front, not inside the network ---------
@pytest.mark.parametrize("bundle", ["ma_sam", "med_sa", "sam3d_adapter", "s_sam", "h_sam"])
def test_inference_names_a_volume_with_the_wrong_channel_count(bundle, demo_data, tmp_path):
    """Field report: a 2-channel image reached the network and failed there with a sliding window's shape
    (``expected 1 input channel(s) ... got 2 in shape (4, 2, 64, 64, 5)``) and no file name. Each bundle's
    inference preprocessing must stop at the file, as ``check_volumes`` does for training."""
    from monai.bundle import ConfigParser

    root = REPO / "bundles" / bundle
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "inference.json"), str(root / "configs" / "demo.json")])
    parser["bundle_root"], parser["dataset_dir"] = str(root), str(demo_data)
    item = dict(parser.get_parsed_content("datalist")[0])  # the bundle's own test item (prompts, object id...)
    one = nib.load(item["image"])
    item["image"] = _nii(
        tmp_path / "two_channels.nii.gz", np.stack([one.get_fdata(dtype=np.float32)] * 2, -1), one.affine
    )
    preprocessing = parser.get_parsed_content("preprocessing")
    with pytest.raises(Exception) as err:
        preprocessing(item)
    line = root_cause(err.value)
    assert (
        "two_channels.nii.gz" in line and "has 2 channels" in line and "expected a 3D volume with 1 channel" in line
    ), line
