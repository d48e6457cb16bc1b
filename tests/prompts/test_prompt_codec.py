"""Guidance-channel codec: AddGuidanceChannelsd encoding and decode_* round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor

from shared_nets.prompts import (
    AddGuidanceChannelsd,
    decode_box_3d,
    decode_boxes_2d,
    decode_points,
    decode_points_2d,
    scale_coords,
)

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def clicks_case(draw):
    b = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(3))
    nvox = int(np.prod(shape))
    items = []
    for _ in range(b):
        flat = draw(st.lists(st.integers(0, nvox - 1), unique=True, max_size=min(6, nvox)))
        split = draw(st.integers(0, len(flat)))
        pos = [list(np.unravel_index(f, shape)) for f in flat[:split]]
        neg = [list(np.unravel_index(f, shape)) for f in flat[split:]]
        items.append((pos, neg))
    max_points = draw(st.integers(1, 8))
    return shape, items, max_points


def _encode(shape, items) -> torch.Tensor:
    """Batch of guidance channels [B, 2, H, W, D] through AddGuidanceChannelsd."""
    out = []
    for pos, neg in items:
        img = MetaTensor(torch.zeros(1, *shape))
        d = AddGuidanceChannelsd(channels=("foreground", "background"))(
            {"image": img, "foreground": pos, "background": neg}
        )
        out.append(d["image"][1:])
    return torch.stack(out).as_tensor()


@SETTINGS
@given(clicks_case())
def test_decode_points_round_trip(case):
    shape, items, p = case
    coords, labels = decode_points(_encode(shape, items), p)
    assert coords.shape == (len(items), p, 3) and labels.shape == (len(items), p)
    assert coords.dtype == torch.float32 and labels.dtype == torch.long
    for b, (pos, neg) in enumerate(items):
        got_pos = {tuple(c) for c, l in zip(coords[b].long().tolist(), labels[b].tolist()) if l == 1}
        got_neg = {tuple(c) for c, l in zip(coords[b].long().tolist(), labels[b].tolist()) if l == 0}
        assert got_pos <= {tuple(map(int, c)) for c in pos}
        assert got_neg <= {tuple(map(int, c)) for c in neg}
        n = len(pos) + len(neg)
        assert (labels[b] >= 0).sum() == min(n, p)
        if n <= p:  # nothing dropped: exact round trip
            assert len(got_pos) == len(pos) and len(got_neg) == len(neg)
        else:  # both kinds represented whenever both exist and there is room
            if pos and neg and p >= 2:
                assert got_pos and got_neg
        # valid entries first, then padding with -1 and zero coordinates
        valid = labels[b] >= 0
        k = int(valid.sum())
        assert valid[:k].all() and not valid[k:].any()
        assert (coords[b, k:] == 0).all()


@SETTINGS
@given(clicks_case())
def test_decode_points_2d_round_trip_and_xy_order(case):
    shape, items, p = case
    h, w, dd = shape
    coords, labels = decode_points_2d(_encode(shape, items), p)
    assert coords.shape == (len(items) * dd, p, 2) and labels.shape == (len(items) * dd, p)
    for b, (pos, neg) in enumerate(items):
        for d in range(dd):
            row = b * dd + d
            want_pos = {(j, i) for i, j, k in pos if k == d}  # (x = W index, y = H index)
            want_neg = {(j, i) for i, j, k in neg if k == d}
            got = [(tuple(c), l) for c, l in zip(coords[row].long().tolist(), labels[row].tolist()) if l >= 0]
            assert {c for c, l in got if l == 1} <= want_pos
            assert {c for c, l in got if l == 0} <= want_neg
            assert len(got) == min(len(want_pos) + len(want_neg), p)
            if len(want_pos) + len(want_neg) <= p:
                assert {c for c, l in got if l == 1} == want_pos and {c for c, l in got if l == 0} == want_neg


def test_xy_order_explicit_and_padding():
    g = torch.zeros(1, 2, 5, 7, 3)
    g[0, 0, 1, 4, 2] = 1  # i=1 (H), j=4 (W), slice 2
    coords, labels = decode_points_2d(g, 3)
    assert coords[2, 0].tolist() == [4.0, 1.0]
    assert labels[2].tolist() == [1, -1, -1]
    assert (labels[:2] == -1).all()
    c3, l3 = decode_points(g, 2)
    assert c3[0, 0].tolist() == [1.0, 4.0, 2.0] and l3[0].tolist() == [1, -1]


def test_overflow_is_deterministic_and_strict_raises():
    g = torch.zeros(1, 2, 4, 4, 1)
    g[0, 0, 0, :, 0] = 1  # 4 positives in raster order
    g[0, 1, 3, :, 0] = 1  # 4 negatives
    coords, labels = decode_points(g, 3)
    assert labels[0].tolist() == [1, 1, 0]  # ceil(3/2) positives, then negatives
    assert coords[0].tolist() == [[0, 0, 0], [0, 1, 0], [3, 0, 0]]
    again = decode_points(g, 3)
    assert torch.equal(again[0], coords) and torch.equal(again[1], labels)
    with pytest.raises(ValueError, match="max_points"):
        decode_points(g, 3, strict=True)
    with pytest.raises(ValueError, match="max_points"):
        decode_points(g, 0)
    with pytest.raises(ValueError, match="guidance"):
        decode_points(torch.zeros(1, 3, 4, 4, 1), 2)


@st.composite
def boxes_case(draw):
    b = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 7)) for _ in range(3))
    boxes = []
    for _ in range(b):
        if draw(st.booleans()):
            boxes.append(None)
            continue
        lo = [draw(st.integers(0, s - 1)) for s in shape]
        hi = [draw(st.integers(l + 1, s)) for l, s in zip(lo, shape)]
        boxes.append(lo + hi)
    return shape, boxes


def _encode_boxes(shape, boxes) -> torch.Tensor:
    out = []
    for box in boxes:
        d = AddGuidanceChannelsd(channels=("roi",))({"image": MetaTensor(torch.zeros(1, *shape)), "roi": box or []})
        out.append(d["image"][1:])
    return torch.stack(out).as_tensor()


@SETTINGS
@given(boxes_case())
def test_box_round_trips(case):
    shape, boxes = case
    enc = _encode_boxes(shape, boxes)
    b3, v3 = decode_box_3d(enc)
    b2, v2 = decode_boxes_2d(enc)
    dd = shape[2]
    assert b3.shape == (len(boxes), 6) and b2.shape == (len(boxes) * dd, 4)
    for b, box in enumerate(boxes):
        assert bool(v3[b]) == (box is not None)
        if box is None:
            assert (b3[b] == 0).all() and not v2[b * dd : (b + 1) * dd].any()
            continue
        assert b3[b].long().tolist() == box
        i0, j0, k0, i1, j1, k1 = box
        for d in range(dd):
            row = b * dd + d
            inside = k0 <= d < k1
            assert bool(v2[row]) == inside
            assert b2[row].long().tolist() == ([j0, i0, j1, i1] if inside else [0, 0, 0, 0])


def test_add_guidance_channels_contents_and_meta():
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    img = MetaTensor(torch.rand(1, 6, 5, 4), affine=affine, meta={"filename_or_obj": "x.nii.gz"})
    d = {
        "image": img,
        "foreground": [[1, 2, 3], [5, 4, 0]],
        "roi": [[1, 1, 2, 3, 4, 3], [0, 0, 3, 2, 2, 4]],  # per-slice boxes as SimulateBoxd(mode="2d") writes
    }
    out = AddGuidanceChannelsd()(d)["image"]
    assert out.shape == (4, 6, 5, 4)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine)
    assert out.meta["filename_or_obj"] == "x.nii.gz"
    assert torch.equal(out[0], img[0])
    assert out[1].sum() == 2 and out[1, 1, 2, 3] == 1 and out[1, 5, 4, 0] == 1
    assert out[2].sum() == 0  # missing background key -> zero channel
    assert out[3].sum() == 2 * 3 + 2 * 2 and out[3, 2, 3, 2] == 1 and out[3, 1, 1, 3] == 1


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("foreground", [[6, 0, 0]], "'foreground'.*\\(6, 5, 4\\)"),
        ("background", [[0, -1, 0]], "'background'.*\\(6, 5, 4\\)"),
        ("roi", [0, 0, 0, 7, 5, 4], "'roi'.*\\(6, 5, 4\\)"),
        ("roi", [0, 0, 0, 1, 2], "'roi'"),
    ],
)
def test_add_guidance_rejects_outside_prompts(key, value, match):
    d = {"image": MetaTensor(torch.zeros(1, 6, 5, 4)), key: value}
    with pytest.raises(ValueError, match=match):
        AddGuidanceChannelsd()(d)


def test_scale_coords():
    pts = torch.tensor([[[3.0, 1.0]]])
    assert scale_coords(pts, (8, 4), (64, 64)).tolist() == [[[24.0, 16.0]]]
    box = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert scale_coords(box, (8, 4), (16, 16)).tolist() == [[2.0, 8.0, 6.0, 16.0]]
    assert scale_coords(torch.tensor([[2, 4, 6]]), 8, 16).tolist() == [[4.0, 8.0, 12.0]]
    with pytest.raises(ValueError, match="from_size"):
        scale_coords(pts, (8, 4, 2), (64, 64, 64))


def test_decoded_prompts_feed_sams_prompt_encoder():
    from shared_nets.sam import build_sam

    sam = build_sam("tiny", img_size=64)
    g = torch.zeros(1, 3, 16, 12, 2)
    g[0, 0, 3, 5, 0] = 1
    g[0, 1, 10, 2, 1] = 1
    g[0, 2, 2:9, 4:11, :] = 1
    coords, labels = decode_points_2d(g[:, :2], max_points=3)
    boxes, valid = decode_boxes_2d(g[:, 2:])
    assert valid.all()
    coords = scale_coords(coords, (12, 16), (64, 64))  # (x, y) frames: (W, H)
    boxes = scale_coords(boxes, (12, 16), (64, 64))
    assert torch.allclose(coords[0, 0], torch.tensor([5 * 64 / 12, 3 * 4.0]))
    assert torch.allclose(boxes[0], torch.tensor([4 * 64 / 12, 8.0, 11 * 64 / 12, 36.0]))
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=boxes, masks=None)
    assert sparse.shape == (2, 3 + 2, 32) and dense.shape[0] == 2
    # padding rows (label -1) get SAM's not-a-point embedding, not a positional encoding
    assert torch.allclose(sparse[0, 1], sam.prompt_encoder.not_a_point_embed.weight[0])
