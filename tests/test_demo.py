"""The README's main job end to end: phantoms → MA-SAM (tiny, CPU) → inference → Dice ≥ 0.80."""

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
    mean_dice = run_demo(out=str(tmp_path), max_epochs=SHORT_EPOCHS)
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
