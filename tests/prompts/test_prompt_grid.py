"""PointsToGridd: prompts from the original voxel grid land on the same anatomy after spatial transforms."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from monai.transforms import Compose, Orientationd, Resized, Spacingd, SpatialCropd

from shared_nets.prompts import AddGuidanceChannelsd, PointsToGridd

LPS = np.array([[-1.5, 0, 0, 12.0], [0, -1.5, 0, 30.0], [0, 0, 2.0, -7.0], [0, 0, 0, 1]])


def _meta(arr: np.ndarray, affine: np.ndarray) -> MetaTensor:
    a = torch.as_tensor(affine, dtype=torch.float64)
    return MetaTensor(torch.as_tensor(arr), affine=a, meta={"original_affine": a.clone()})


def _blobs() -> np.ndarray:
    lab = np.zeros((1, 30, 28, 12), np.float32)
    lab[0, 3:13, 4:14, 2:7] = 1
    lab[0, 16:27, 15:25, 6:11] = 2
    lab[0, 17:26, 3:11, 1:5] = 3
    return lab


def _orient_spacing_resize() -> Compose:
    keys = ["image", "label"]
    return Compose(
        [
            Orientationd(keys, axcodes="RAS", labels=None),
            Spacingd(keys, pixdim=(1.0, 1.0, 2.0), mode=("bilinear", "nearest")),
            Resized(keys, spatial_size=(48, 48, -1), mode=("trilinear", "nearest")),
        ]
    )


def test_clicks_and_box_follow_orientation_spacing_resize():
    lab = _blobs()
    clicks = [[8, 9, 4], [21, 20, 8], [21, 7, 3], [5, 6, 3], [25, 23, 9]]
    d = {
        "image": _meta(lab.copy(), LPS),
        "label": _meta(lab.copy(), LPS),
        "foreground": clicks,
        "roi": [16, 15, 6, 27, 25, 11],
    }
    out = PointsToGridd()(_orient_spacing_resize()(d))
    new_lab = out["label"][0]
    assert new_lab.shape[:2] == (48, 48)
    assert len(out["foreground"]) == len(clicks)
    for src, dst in zip(clicks, out["foreground"]):
        assert new_lab[tuple(dst)] == lab[0][tuple(src)], (src, dst)
    # the box of blob 2 maps onto blob 2's bounding box (to a voxel, nearest-neighbour labels)
    nz = torch.nonzero(new_lab == 2)
    want = nz.amin(0).tolist() + (nz.amax(0) + 1).tolist()
    assert np.abs(np.array(out["roi"]) - np.array(want)).max() <= 1
    assert all(isinstance(v, int) for v in out["roi"])
    # and the rasterised guidance keeps the image meta
    g = AddGuidanceChannelsd()(out)["image"]
    assert g.shape[0] == 4 and torch.equal(g.affine, out["image"].affine)


@settings(max_examples=20, deadline=None)
@given(
    perm=st.permutations([0, 1, 2]),
    signs=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
    shape=st.tuples(*[st.integers(2, 5)] * 3),
)
def test_orientation_is_exact_for_every_voxel(perm, signs, shape):
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[list(perm)].T * np.array(signs) * np.array([1.0, 2.0, 3.0])
    affine[:3, 3] = [5.0, -3.0, 1.0]
    ids = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(1, *shape)
    voxels = [list(v) for v in itertools.product(*[range(s) for s in shape])]
    d = {"label": _meta(ids, affine), "foreground": voxels}
    out = PointsToGridd(keys="foreground", ref_key="label")(Orientationd("label", axcodes="RAS", labels=None)(d))
    new = out["label"][0]
    assert [float(new[tuple(p)]) for p in out["foreground"]] == [float(ids[0][tuple(v)]) for v in voxels]


def test_crop_drops_or_raises(caplog):
    lab = _blobs()
    d = {"label": _meta(lab, np.eye(4)), "foreground": [[5, 5, 3], [25, 20, 8]], "roi": [0, 0, 0, 4, 4, 4]}
    crop = SpatialCropd("label", roi_start=(0, 0, 0), roi_end=(15, 28, 12))
    cropped = crop(d)
    with caplog.at_level(logging.WARNING):
        out = PointsToGridd(ref_key="label")(cropped)
    assert out["foreground"] == [[5, 5, 3]]
    assert out["roi"] == [0, 0, 0, 4, 4, 4]
    assert "outside" in caplog.text
    with pytest.raises(ValueError, match="'foreground'.*outside"):
        PointsToGridd(ref_key="label", on_outside="raise")(cropped)
    shifted = SpatialCropd("label", roi_start=(10, 2, 1), roi_end=(30, 28, 12))(d)
    out = PointsToGridd(ref_key="label")(shifted)
    assert out["foreground"] == [[15, 18, 7]] and out["roi"] == []


def test_passthrough_and_errors():
    img = MetaTensor(torch.zeros(1, 4, 4, 4))
    d = {"image": img, "foreground": [[1.0, 2.0, 3.0]], "background": []}
    out = PointsToGridd()(d)
    assert out["foreground"] == [[1, 2, 3]] and out["background"] == []
    with pytest.raises(ValueError, match="on_outside"):
        PointsToGridd(on_outside="clip")
    with pytest.raises(ValueError, match="MetaTensor"):
        PointsToGridd()({"image": np.zeros((1, 4, 4, 4)), "foreground": [[0, 0, 0]]})
    with pytest.raises(ValueError, match="'foreground'"):
        PointsToGridd()({"image": img, "foreground": [[0, 0]]})
    moved = Orientationd("image", axcodes="LPS", labels=None)({"image": img})["image"]
    moved.meta.pop("original_affine", None)
    with pytest.raises(ValueError, match="original_affine"):
        PointsToGridd()({"image": moved, "foreground": [[0, 0, 0]]})
