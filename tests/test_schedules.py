"""Learning-rate schedules: the official formulas, and the bundle switches that build them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from shared_nets.schedules import LR_SCHEDULES, build_lr_scheduler

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _rates(scheduler, optimizer, n: int) -> list[float]:
    """Learning rate used at iterations 0..n-1 (the bundles step once per iteration)."""
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_poly_matches_the_official_ma_sam_trainer():
    """cchen-cc/MA-SAM MA-SAM/trainer.py: a linear warm-up from base / warmup_period to base, then
    base * (1 - shift_iter / max_iterations) ** lr_exp with shift_iter counted from the end of the warm-up
    and max_iterations the whole run (lr_exp 7 in train.py). The official loop sets each rate after the
    optimizer step, i.e. one iteration later than a scheduler; the values are the same."""
    base, warmup, total, power = 8e-4, 5, 40, 7.0
    opt = _optimizer(base)
    sched = build_lr_scheduler(opt, "poly", total, warmup_iters=warmup, warmup_start_factor=1.0 / warmup, power=power)
    got = _rates(sched, opt, total)
    assert got[0] == pytest.approx(base / warmup)
    assert got[: warmup + 1] == pytest.approx(sorted(got[: warmup + 1]))  # rising to base
    assert got[warmup:] == pytest.approx(
        [base * (1.0 - (i - warmup) / total) ** power for i in range(warmup, total)], rel=1e-6
    )


def test_exponential_reaches_the_final_fraction_and_step_halves():
    opt = _optimizer()
    got = _rates(build_lr_scheduler(opt, "exponential", 30, warmup_iters=10, final_lr_fraction=0.01), opt, 31)
    assert got[0] == pytest.approx(0.01) and got[10] == pytest.approx(1.0) and got[30] == pytest.approx(0.01)
    opt = _optimizer()
    got = _rates(build_lr_scheduler(opt, "step", 100, step_size=10, gamma=0.5), opt, 25)
    assert got[9] == 1.0 and got[10] == 0.5 and got[20] == 0.25
    opt = _optimizer()
    assert set(_rates(build_lr_scheduler(opt, "constant", 20), opt, 20)) == {1.0}


def test_bad_schedule_names_the_choices():
    with pytest.raises(ValueError, match="lr schedule must be one of"):
        build_lr_scheduler(_optimizer(), "linear", 10)
    with pytest.raises(ValueError, match="total_iters"):
        build_lr_scheduler(_optimizer(), "cosine", 0)


def _bundle_scheduler(bundle: str, iters_per_epoch: int, **overrides):
    """The bundle's ``lr_scheduler`` from its train.json, with a stand-in network and data loader."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    parser.update(
        {"network": "$torch.nn.Linear(2, 2)", "train#dataloader": f"$list(range({iters_per_epoch}))", **overrides}
    )
    return parser.get_parsed_content("lr_scheduler"), parser.get_parsed_content("optimizer")


def test_ma_sam_switch_builds_the_official_polynomial_schedule():
    sched, opt = _bundle_scheduler("ma_sam", 10, max_epochs=4, warmup_iters=5)
    assert isinstance(sched._schedulers[1], torch.optim.lr_scheduler.ExponentialLR)  # paper: default
    sched, opt = _bundle_scheduler("ma_sam", 10, max_epochs=4, warmup_iters=5, lr_schedule="poly")
    main = sched._schedulers[1]
    assert isinstance(main, torch.optim.lr_scheduler.PolynomialLR)
    assert main.power == 7.0 and main.total_iters == 40
    assert sched._schedulers[0].start_factor == pytest.approx(1 / 5)
    got = _rates(sched, opt, 40)
    base = 8e-4
    assert got[5:] == pytest.approx([base * (1 - (i - 5) / 40) ** 7 for i in range(5, 40)], rel=1e-6)


@pytest.mark.parametrize(
    "schedule, kind", [("cosine", "CosineAnnealingLR"), ("step", "StepLR"), ("constant", "ConstantLR")]
)
def test_med_sa_switch_builds_each_schedule(schedule, kind):
    sched, opt = _bundle_scheduler("med_sa", 3, max_epochs=30, lr_schedule=schedule)
    assert type(sched).__name__ == kind
    if schedule == "step":  # official train.py: StepLR(step_size=10, gamma=0.5) in epochs
        assert sched.step_size == 30 and sched.gamma == 0.5
        got = _rates(sched, opt, 61)
        assert got[29] == 1e-4 and got[30] == pytest.approx(5e-5) and got[60] == pytest.approx(2.5e-5)


def test_every_schedule_is_listed():
    assert LR_SCHEDULES == ("exponential", "poly", "cosine", "step", "constant")
