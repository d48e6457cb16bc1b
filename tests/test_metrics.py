"""shared_nets.metrics: distances in mm from each case's affine, NSD tolerances in mm, the papers'
empty-case conventions, and the per-class markdown/CSV summary (tiny synthetic arrays)."""

from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from shared_nets.metrics import (
    ConventionDiceMetric,
    HausdorffDistanceMM,
    MetricsSummary,
    SurfaceDiceMM,
    apply_empty_case,
    foreground_names,
    format_names,
    markdown_summary,
    resolve_convention,
    spacing_from_meta,
    summarise,
)

SPACING = (3.0, 1.0, 0.5)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on every empty mask
        yield


def _onehot(*masks: torch.Tensor) -> torch.Tensor:
    """(1, 1 + len(masks), *spatial) one-hot from foreground masks of classes 1..n."""
    fg = torch.stack([m.float() for m in masks])
    return torch.cat([(fg.sum(0, keepdim=True) == 0).float(), fg])[None]


def _meta(x: torch.Tensor, spacing=SPACING) -> MetaTensor:
    return MetaTensor(x, affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))


def _cube(shift_axis: int | None = None, size: int = 12) -> torch.Tensor:
    m = torch.zeros(size, size, size)
    m[3:8, 3:8, 3:8] = 1
    return m if shift_axis is None else torch.roll(m, 1, shift_axis)


@pytest.mark.parametrize("axis, expected_mm", [(0, 3.0), (1, 1.0), (2, 0.5)])
def test_hd95_of_a_one_voxel_shift_is_that_axis_spacing(axis, expected_mm):
    pred, label = _meta(_onehot(_cube(axis))), _meta(_onehot(_cube()))
    assert HausdorffDistanceMM(percentile=95)(pred, label).item() == pytest.approx(expected_mm)
    assert HausdorffDistanceMM(percentile=None)(pred, label).item() == pytest.approx(expected_mm)


def test_hd95_reads_the_spacing_of_each_case_in_a_list():
    """The ignite handlers pass decollated lists of channel-first MetaTensors."""
    metric = HausdorffDistanceMM()
    metric(
        [_meta(_onehot(_cube(0)))[0], _meta(_onehot(_cube(0)), spacing=(2.0, 1.0, 1.0))[0]],
        [_meta(_onehot(_cube()))[0], _meta(_onehot(_cube()), spacing=(2.0, 1.0, 1.0))[0]],
    )
    assert metric.get_buffer().reshape(-1).tolist() == pytest.approx([3.0, 2.0])


def test_spacing_from_batched_affines_and_plain_tensors():
    batch = MetaTensor(torch.zeros(2, 2, 4, 4, 4))
    batch.affine = torch.stack([torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0])), torch.eye(4)]).double()
    batch.is_batch = True
    assert spacing_from_meta(batch) == [pytest.approx([0.8, 0.8, 2.5]), [1.0, 1.0, 1.0]]
    assert spacing_from_meta(torch.zeros(1, 2, 4, 4, 4)) is None
    with pytest.raises(ValueError, match="no voxel spacing"):
        HausdorffDistanceMM()(_onehot(_cube(0)), _onehot(_cube()))
    # an explicit spacing wins over none
    assert (
        HausdorffDistanceMM()._compute_tensor(_onehot(_cube(0)), _onehot(_cube()), spacing=[4.0, 1.0, 1.0]).item()
        == 4.0
    )


@pytest.mark.parametrize("axis, below, above", [(0, 2.9, 3.0), (2, 0.4, 0.5)])
def test_nsd_tolerance_is_in_mm(axis, below, above):
    pred, label = _meta(_onehot(_cube(axis))), _meta(_onehot(_cube()))
    assert SurfaceDiceMM(above)(pred, label).item() == pytest.approx(1.0)
    part = SurfaceDiceMM(below)(pred, label).item()
    assert 0.3 < part < 1.0


def test_nsd_per_class_tolerances_and_bad_values():
    pred = _meta(
        _onehot(
            _cube(0), torch.roll(_cube(0), 4, 1) * 0 + (torch.arange(12)[None, None, :] > 9).float().expand(12, 12, 12)
        )
    )
    label = _meta(_onehot(_cube(), (torch.arange(12)[None, None, :] > 9).float().expand(12, 12, 12)))
    values = SurfaceDiceMM([1.0, 1.0])(pred, label)[0]
    assert values[0].item() < 1.0 and values[1].item() == pytest.approx(1.0)
    assert SurfaceDiceMM([3.0, 0.0])(pred, label)[0].tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="3 tolerances for 2 classes"):
        SurfaceDiceMM([1.0, 1.0, 1.0])(pred, label)
    with pytest.raises(ValueError, match="nsd_tolerance_mm"):
        SurfaceDiceMM(-1.0)


def _empty_cases():
    """Class 1: present in both; 2: absent from both; 3: predicted only; 4: missed."""
    a, b = _cube(), torch.zeros(12, 12, 12)
    far = torch.zeros(12, 12, 12)
    far[0:2, 0:2, 0:2] = 1
    label = _meta(_onehot(a, b, b, far))
    pred = _meta(_onehot(a, b, far, b))
    return pred, label


@pytest.mark.parametrize(
    "convention, dice, hd, nsd",
    [
        ("monai", [1, math.nan, math.nan, 0], [0, math.nan, math.nan, math.nan], [1, math.nan, 0, 0]),
        ("blank_is_one", [1, 1, 0, 0], [0, 0, math.nan, math.nan], [1, 1, 0, 0]),
        ("transunet", [1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]),
    ],
)
def test_empty_case_conventions(convention, dice, hd, nsd):
    pred, label = _empty_cases()
    got = {
        "dice": ConventionDiceMetric(empty_case=convention)(pred, label)[0],
        "hd": HausdorffDistanceMM(empty_case=convention)(pred, label)[0],
        "nsd": SurfaceDiceMM(1.0, empty_case=convention)(pred, label)[0],
    }
    for name, want in (("dice", dice), ("hd", hd), ("nsd", nsd)):
        np.testing.assert_allclose(got[name].numpy(), np.array(want, dtype=float), err_msg=f"{convention} {name}")


@pytest.mark.parametrize("convention", ["monai", "blank_is_one", "transunet"])
def test_full_hausdorff_of_an_empty_side_is_nan_as_hd95(convention):
    """``percentile=None`` (``val_hd_mm``): MONAI returns inf for a class predicted but absent from the
    label (and for a miss); it must score like HD95 (NaN under ``monai``), so no inf reaches ``metrics.csv``."""
    pred, label = _empty_cases()
    hd = HausdorffDistanceMM(empty_case=convention, percentile=None)(pred, label)[0].numpy()
    hd95 = HausdorffDistanceMM(empty_case=convention)(pred, label)[0].numpy()
    assert not np.isinf(hd).any(), hd
    np.testing.assert_array_equal(np.isnan(hd), np.isnan(hd95))
    np.testing.assert_array_equal(hd[1:], hd95[1:])  # the empty classes: both conventions' fixed values


def test_monai_convention_is_monai_unchanged():
    from monai.metrics import DiceMetric

    pred, label = _empty_cases()
    np.testing.assert_array_equal(
        ConventionDiceMetric()(pred, label).numpy(), DiceMetric(include_background=False)(pred, label).numpy()
    )


def test_convention_names():
    assert resolve_convention("paper", "transunet") == "transunet"
    assert resolve_convention("monai", "transunet") == "monai"
    with pytest.raises(ValueError, match="empty_case_convention"):
        resolve_convention("medpy")
    with pytest.raises(ValueError, match="kind"):
        apply_empty_case(torch.zeros(1, 1), torch.ones(1, 1, dtype=bool), torch.ones(1, 1, dtype=bool), "monai", "x")


def test_metric_names_and_class_names():
    assert list(format_names({"val_hd95_mm": 1, "val_nsd_{tol}mm": 2}, 2.0)) == ["val_hd95_mm", "val_nsd_2mm"]
    assert list(format_names({"val_nsd_{tol}mm": 2}, [0.5, 0.5])) == ["val_nsd_0.5mm"]
    assert list(format_names({"val_nsd_{tol}mm": 2}, [1, 2])) == ["val_nsd_perclassmm"]
    channel_def = {"0": "background", "1": "spleen", "2": "liver"}
    assert foreground_names(channel_def) == ["spleen", "liver"]
    assert foreground_names(channel_def, 3) == ["spleen", "liver", "class_3"]


def test_summary_per_class_mean_std_and_mean_of_classes():
    details = {
        "val_mean_dice": torch.tensor([[1.0, 0.5], [0.5, float("nan")]]),
        "val_hd95_mm": torch.tensor([[2.0, 4.0], [4.0, 6.0]]),
    }
    s = summarise(details, ["spleen", "liver"])
    d = s["metrics"]["val_mean_dice"]
    assert s["classes"] == ["spleen", "liver"]
    assert d["mean"] == pytest.approx([0.75, 0.5]) and d["std"] == pytest.approx([0.25, 0.0]) and d["n"] == [2, 1]
    assert d["overall"] == pytest.approx(0.625)  # mean of the class means, not of all cells (0.6667)
    md = markdown_summary(s, notes=["note line"])
    assert "- note line" in md
    assert "| spleen | 0.7500 ± 0.2500 (2) | 3.0000 ± 1.0000 (2) |" in md
    assert md.rstrip().endswith("| **mean of classes** | **0.6250** | **4.0000** |")


def test_summary_groups_single_channel_items_by_class_id():
    s = summarise(
        {"val_mean_dice": torch.tensor([[0.2], [0.4], [0.9]])}, groups=[6, 6, 1], group_names={1: "spleen", 6: "liver"}
    )
    assert s["classes"] == ["spleen", "liver"]
    assert s["metrics"]["val_mean_dice"]["mean"] == pytest.approx([0.9, 0.3])


def test_metrics_summary_handler_writes_md_and_csv_atomically(tmp_path):
    from ignite.engine import Engine, Events

    def step(engine, batch):
        return batch

    engine = Engine(step)
    handler = MetricsSummary(
        str(tmp_path / "out"), class_names={"0": "background", "1": "spleen", "2": "liver"}, notes=["HD in mm"]
    )
    handler.attach(engine)

    @engine.on(Events.EPOCH_COMPLETED)
    def _details(e):  # what IgniteMetricHandler(save_details=True) leaves behind
        e.state.metric_details = {"val_mean_dice": torch.tensor([[0.8, 0.6], [1.0, 0.4]])}

    engine.run([0, 1], max_epochs=1)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.md", "metrics_per_class.csv"]
    md = (out / "metrics.md").read_text()
    assert "| liver | 0.5000 ± 0.1000 (2) |" in md and "**0.7000**" in md
    rows = list(csv.reader(open(out / "metrics_per_class.csv")))
    assert rows[0] == ["metric", "class", "mean", "std", "n"]
    assert rows[1][:3] == ["val_mean_dice", "spleen", "0.900000"]
    assert rows[-1][:3] == ["val_mean_dice", "mean_of_classes", "0.700000"]
