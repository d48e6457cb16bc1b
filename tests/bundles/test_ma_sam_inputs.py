"""MA-SAM bundle: bad input fails before training with a message naming the file; box-prompt path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from shared_nets.engine import run_bundle_workflow
from shared_nets.sam import build_sam

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "ma_sam"
QUICK = {"img_size": 64, "max_epochs": 1, "val_interval": 1, "val_sw_batch_size": 8, "sw_batch_size": 8}


@pytest.fixture()
def bundle(tmp_path) -> Path:
    dst = tmp_path / "ma_sam"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("models", "eval"))
    return dst


def _dataset(tmp_path: Path, demo_data: Path, edit) -> Path:
    """Copy of the demo datalist whose first training case is replaced by ``edit(image, label, affine, out)``."""
    out = tmp_path / "data"
    out.mkdir()
    content = json.loads((demo_data / "datalist.json").read_text())
    for entry in demo_data.iterdir():
        if entry.name != "datalist.json":
            (out / entry.name).symlink_to(entry.resolve())
    first = content["training"][0]
    img = nib.load(str(demo_data / first["image"]))
    lab = nib.load(str(demo_data / first["label"]))
    edit(np.asarray(img.dataobj), np.asarray(lab.dataobj), img.affine, out, first)
    (out / "datalist.json").write_text(json.dumps(content))
    return out


def _chain(error: BaseException) -> list[str]:
    """Messages of an exception and its causes (MONAI wraps config errors in RuntimeError)."""
    out = []
    while error is not None:
        out.append(str(error))
        error = error.__cause__ or error.__context__
    return out


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> str:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path.name


def _few_slices(img, lab, aff, out, item):
    item["image"] = _save(img[..., :3], aff, out / "short_img.nii.gz")
    item["label"] = _save(lab[..., :3], aff, out / "short_lab.nii.gz")


def _two_d(img, lab, aff, out, item):
    item["image"] = _save(img[..., 10], aff, out / "flat_img.nii.gz")
    item["label"] = _save(lab[..., 10], aff, out / "flat_lab.nii.gz")


def _bad_label(img, lab, aff, out, item):
    lab = lab.copy()
    lab[0, 0, 0] = 20
    item["label"] = _save(lab, aff, out / "bad_lab.nii.gz")


def _missing(img, lab, aff, out, item):
    item["image"] = "imagesTr/does_not_exist.nii.gz"


def _shape_mismatch(img, lab, aff, out, item):
    item["label"] = _save(lab[:32], aff, out / "half_lab.nii.gz")


@pytest.mark.parametrize(
    "edit, match",
    [
        (_few_slices, r"short_img\.nii\.gz' has 3 slices along the last axis; expected at least 5"),
        (_two_d, r"flat_img\.nii\.gz' has shape \(64, 64\); expected a 3D volume"),
        (_bad_label, r"bad_lab\.nii\.gz' has values .*expected integers in \[0, 13\]"),
        (_missing, r"image file '.*does_not_exist\.nii\.gz' does not exist"),
        (_shape_mismatch, r"half_lab\.nii\.gz' has shape \(32, 64, 24\); expected the image's \(64, 64, 24\)"),
    ],
)
def test_bad_training_data_fails_before_training(bundle, demo_data, tmp_path, edit, match):
    data = _dataset(tmp_path, demo_data, edit)
    with pytest.raises(Exception) as info:
        run_bundle_workflow(bundle, ["train.json", "demo.json"], "train", {"dataset_dir": str(data), **QUICK})
    chain = _chain(info.value)
    assert any(re.search(match, m) for m in chain), chain[-1]
    assert not (bundle / "models" / "model.pt").exists()


def test_missing_datalist(bundle, tmp_path):
    with pytest.raises(Exception) as info:
        run_bundle_workflow(
            bundle, ["train.json", "demo.json"], "train", {"dataset_dir": str(tmp_path / "nowhere"), **QUICK}
        )
    assert any("datalist.json' does not exist" in m for m in _chain(info.value))


def test_checkpoint_of_another_variant(bundle, demo_data, tmp_path):
    ckpt = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny", img_size=64).state_dict(), ckpt)
    over = {"dataset_dir": str(demo_data), **QUICK, "variant": "vit_b", "patch_size": 16, "sam_checkpoint": str(ckpt)}
    with pytest.raises(Exception) as info:
        run_bundle_workflow(bundle, ["train.json", "demo.json"], "train", over)
    assert any("is a tiny checkpoint; expected a vit_b checkpoint" in m for m in _chain(info.value))


def test_box_prompt_overlay_trains_and_infers_with_a_user_box(bundle, demo_data, tmp_path):
    """Paper's tumour setting (Table 4): binary tumour label, one 3D box per volume as a guidance channel."""
    data = tmp_path / "tumour"
    data.mkdir()
    content = json.loads((demo_data / "datalist.json").read_text())
    for split in ("training", "validation", "test"):
        for item in content[split]:
            item["label"] = item["tumour"]
            t = np.argwhere(np.asarray(nib.load(str(demo_data / item["tumour"])).dataobj) > 0)
            item["roi"] = [*t.min(0).tolist(), *(t.max(0) + 1).tolist()]  # MONAI Label style box, input voxels
    for entry in demo_data.iterdir():
        if entry.name != "datalist.json":
            (data / entry.name).symlink_to(entry.resolve())
    (data / "datalist.json").write_text(json.dumps(content))
    over = {"dataset_dir": str(data), **QUICK}
    run_bundle_workflow(bundle, ["train.json", "box_prompt.json", "demo.json"], "train", over)
    out = tmp_path / "pred"
    run_bundle_workflow(
        bundle, ["inference.json", "box_prompt.json", "demo.json"], "infer", {**over, "output_dir": str(out)}
    )
    for item in content["test"]:
        pred = nib.load(str(out / Path(item["image"]).name.replace(".nii.gz", "_seg.nii.gz")))
        src = nib.load(str(demo_data / item["image"]))
        assert pred.shape == src.shape
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}


def test_finetune_overlay_starts_from_the_given_weights(tmp_path):
    """configs/finetune.json (MA-SAM Fig. 6, 5-shot AMOS): training starts from a trained model's weights."""
    from ignite.engine import Engine
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in ("train.json", "finetune.json", "demo.json")])
    parser.update(
        {
            "bundle_root": str(BUNDLE),
            "dataset_dir": str(tmp_path),
            "img_size": 64,
            "finetune_from": str(tmp_path / "btcv.pt"),
        }
    )
    handlers = parser["train#handlers"]
    assert handlers[-1]["_target_"] == "CheckpointLoader"
    network = parser.get_parsed_content("network")
    trained = {k: v + 1.0 if v.is_floating_point() else v for k, v in network.state_dict().items()}
    torch.save(trained, tmp_path / "btcv.pt")
    loader = parser.get_parsed_content(f"train#handlers#{len(handlers) - 1}")
    loader(Engine(lambda engine, batch: None))
    for k, v in network.state_dict().items():
        torch.testing.assert_close(v, trained[k])
