"""Prompt simulation transforms: SelectObjectd, SimulateClicksd, SimulateBoxd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from shared_nets.prompts import SelectObjectd, SimulateBoxd, SimulateClicksd, box_iou


def _label() -> MetaTensor:
    lab = torch.zeros(1, 24, 26, 12)
    lab[0, 4:16, 6:20, 3:9] = 3
    lab[0, 18:23, 2:6, 1:4] = 5
    return MetaTensor(lab, affine=torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0])))


def _binary(class_id: int = 3) -> MetaTensor:
    return (_label() == class_id).float()


def test_select_object_binary_and_restricted():
    seen = set()
    for seed in range(12):
        t = SelectObjectd()
        t.set_random_state(seed)
        out = t({"label": _label()})
        cid = out["object_id"]
        seen.add(cid)
        assert cid in (3, 5)
        assert torch.equal(out["label"], (_label() == cid).float())
        assert isinstance(out["label"], MetaTensor) and torch.equal(out["label"].affine, _label().affine)
    assert seen == {3, 5}
    t = SelectObjectd(class_ids=[5, 7])
    assert t({"label": _label()})["object_id"] == 5
    empty = SelectObjectd(class_ids=[7])({"label": _label()})
    assert empty["object_id"] == 0 and empty["label"].sum() == 0
    with pytest.raises(ValueError, match="class_ids"):
        SelectObjectd(class_ids=[0])


@pytest.mark.parametrize("sampling", ["edt", "uniform"])
def test_clicks_3d_positive_inside_negative_outside(sampling):
    lab = _binary()
    obj = lab[0] > 0
    t = SimulateClicksd(num_positive=(2, 5), num_negative=4, sampling=sampling)
    for seed in range(5):
        t.set_random_state(seed)
        out = t({"label": lab})
        pos, neg = out["foreground"], out["background"]
        assert 2 <= len(pos) <= 5 and len(neg) == 4
        assert len({tuple(p) for p in pos}) == len(pos)
        assert all(bool(obj[tuple(p)]) for p in pos)
        assert all(not bool(obj[tuple(n)]) for n in neg)
        # "near": inside the bounding box dilated by the default margin 5
        assert all(-1 <= n[0] <= 20 and 1 <= n[1] <= 24 and 0 <= n[2] <= 13 for n in neg)
        assert all(isinstance(v, int) for p in pos + neg for v in p)


def test_edt_sampling_prefers_interior():
    lab = _binary()
    t = SimulateClicksd(num_positive=1)
    t.set_random_state(0)
    dist_to_edge = []
    for _ in range(200):
        i, j, k = t({"label": lab})["foreground"][0]
        dist_to_edge.append(min(i - 4, 15 - i, j - 6, 19 - j, k - 3, 8 - k))
    # the outer shell is 528 of the 1008 voxels of this 12x14x6 box (52 % under uniform sampling);
    # weights proportional to the distance (1, 2, 3 by layer) give it 528 / 1648 = 32 %
    assert np.mean(np.array(dist_to_edge) == 0) < 0.42


def test_clicks_2d_one_per_slice_and_jitter_keeps_labels_truthful():
    lab = _binary()
    obj = lab[0] > 0
    t = SimulateClicksd(num_positive=2, num_negative=1, mode="2d", jitter=3)
    t.set_random_state(3)
    out = t({"label": lab})
    pos, neg = out["foreground"], out["background"]
    assert sorted({p[2] for p in pos}) == list(range(3, 9))
    assert len(pos) == 2 * 6 and len(neg) == 6
    assert all(bool(obj[tuple(p)]) for p in pos) and all(not bool(obj[tuple(n)]) for n in neg)
    assert sorted(n[2] for n in neg) == list(range(3, 9))


def test_clicks_empty_label():
    lab = torch.zeros(1, 8, 8, 4)
    out = SimulateClicksd(num_positive=3, num_negative=2)({"label": lab})
    assert out["foreground"] == [] and len(out["background"]) == 2
    out = SimulateClicksd(num_positive=3, num_negative=2, mode="2d")({"label": lab})
    assert out["foreground"] == [] and out["background"] == []


def test_tight_box_equals_label_bbox():
    lab = _binary()
    assert SimulateBoxd()({"label": lab})["roi"] == [4, 6, 3, 16, 20, 9]
    boxes = SimulateBoxd(mode="2d")({"label": lab})["roi"]
    assert boxes == [[4, 6, k, 16, 20, k + 1] for k in range(3, 9)]
    assert SimulateBoxd()({"label": torch.zeros(1, 4, 4, 4)})["roi"] == []


@pytest.mark.parametrize("target", [0.5, 0.75])
def test_box_iou_target(target):
    lab = _binary()
    tight = [4, 6, 3, 16, 20, 9]
    for seed in range(8):
        t = SimulateBoxd(iou=target)
        t.set_random_state(seed)
        box = t({"label": lab})["roi"]
        assert abs(box_iou(box, tight) - target) <= 0.05
        assert all(0 <= v for v in box) and box[3] <= 24 and box[4] <= 26 and box[5] <= 12
    for box in SimulateBoxd(iou=target, mode="2d")({"label": lab})["roi"]:
        assert abs(box_iou(box, [4, 6, box[2], 16, 20, box[2] + 1]) - target) <= 0.05


def test_relaxed_box_contains_object():
    lab = _binary()
    t = SimulateBoxd(jitter=0.2)
    grew = False
    for seed in range(6):
        t.set_random_state(seed)
        b = t({"label": lab})["roi"]
        assert b[0] <= 4 and b[1] <= 6 and b[2] <= 3 and b[3] >= 16 and b[4] >= 20 and b[5] >= 9
        assert max(4 - b[0], b[3] - 16) <= round(0.2 * 12)
        grew |= b != [4, 6, 3, 16, 20, 9]
    assert grew


def test_determinism_under_set_random_state():
    pipe = Compose(
        [
            SelectObjectd(),
            SimulateClicksd(num_positive=(1, 4), num_negative=(0, 3), jitter=1),
            SimulateBoxd(jitter=0.1),
        ]
    )
    results = []
    for seed in (7, 7, 8):
        pipe.set_random_state(seed)
        out = pipe({"label": _label()})
        results.append((out["object_id"], out["foreground"], out["background"], out["roi"]))
    assert results[0] == results[1]
    assert results[0] != results[2]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_positive": -1}, "num_positive"),
        ({"num_positive": (3, 1)}, "num_positive"),
        ({"mode": "4d"}, "mode"),
        ({"jitter": -2}, "jitter"),
        ({"sampling": "gauss"}, "sampling"),
    ],
)
def test_click_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimulateClicksd(**kwargs)


def test_box_argument_errors():
    with pytest.raises(ValueError, match="iou"):
        SimulateBoxd(iou=1.5)
    with pytest.raises(ValueError, match="jitter or iou"):
        SimulateBoxd(iou=0.5, jitter=0.1)
    with pytest.raises(ValueError, match="label"):
        SimulateBoxd()({"label": torch.zeros(4, 4, 4)})
