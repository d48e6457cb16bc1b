"""Learning-rate schedules of the papers and their official code, as one config switch.

The bundles step their scheduler once per iteration (MONAI ``LrScheduleHandler`` with
``epoch_level=False``). :func:`build_lr_scheduler` returns plain ``torch.optim.lr_scheduler``
objects (a ``SequentialLR`` when there is a warm-up), so checkpoints and ``--resume`` keep
working with the stock ``state_dict``.

Schedules (``schedule``):

* ``exponential``: exponential decay to ``final_lr_fraction`` of the base rate at the end of the
  run (MA-SAM paper sec. 4.2: "increase the learning rate linearly to the specific value and then
  exponentially decrease it towards the end of training").
* ``poly``: ``(1 - t / total_iters) ** power`` with ``t`` counted from the end of the warm-up and
  ``total_iters`` the whole run, i.e. cchen-cc/MA-SAM ``MA-SAM/trainer.py``:
  ``base_lr * (1.0 - shift_iter / max_iterations) ** args.lr_exp`` (``lr_exp`` 7 in ``train.py``).
* ``cosine``: cosine annealing over the iterations after the warm-up.
* ``step``: ×``gamma`` every ``step_size`` iterations (``torch.optim.lr_scheduler.StepLR``).
* ``constant``: the base rate throughout.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    ExponentialLR,
    LinearLR,
    LRScheduler,
    PolynomialLR,
    SequentialLR,
    StepLR,
)

__all__ = ["LR_SCHEDULES", "build_lr_scheduler", "warmup_start_factor"]

LR_SCHEDULES = ("exponential", "poly", "cosine", "step", "constant")


def _positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def build_lr_scheduler(
    optimizer: Optimizer,
    schedule: str,
    total_iters: int,
    warmup_iters: int = 0,
    warmup_start_factor: float = 0.01,
    final_lr_fraction: float = 0.01,
    power: float = 1.0,
    step_size: int = 1,
    gamma: float = 0.1,
) -> LRScheduler:
    """A per-iteration learning-rate scheduler: optional linear warm-up, then ``schedule``.

    Args:
        optimizer: the optimizer whose base rates are scheduled.
        schedule: one of :data:`LR_SCHEDULES` (see the module docstring).
        total_iters: iterations of the whole run (epochs × iterations per epoch).
        warmup_iters: linear warm-up iterations (0: none), from ``warmup_start_factor`` × base rate.
        warmup_start_factor: first warm-up factor, in (0, 1].
        final_lr_fraction: ``exponential``: rate at the end of the run as a fraction of the base rate.
        power: ``poly``: exponent.
        step_size: ``step``: iterations between decays.
        gamma: ``step``: decay factor.

    Returns:
        The scheduler (a ``SequentialLR`` of ``LinearLR`` and the schedule when ``warmup_iters`` > 0).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}.")
    total_iters = _positive_int(total_iters, "total_iters")
    warmup_iters = _positive_int(warmup_iters, "warmup_iters", minimum=0)
    if not 0.0 < warmup_start_factor <= 1.0:
        raise ValueError(f"warmup_start_factor must be in (0, 1], got {warmup_start_factor!r}.")
    if not 0.0 < final_lr_fraction <= 1.0:
        raise ValueError(f"final_lr_fraction must be in (0, 1], got {final_lr_fraction!r}.")
    decay_iters = max(1, total_iters - warmup_iters)
    warmup = LinearLR(optimizer, start_factor=warmup_start_factor, total_iters=warmup_iters) if warmup_iters else None
    if schedule == "exponential":
        main: LRScheduler = ExponentialLR(optimizer, gamma=final_lr_fraction ** (1.0 / decay_iters))
    elif schedule == "poly":
        # the official MA-SAM divides by the whole run, not by the iterations after warm-up
        main = PolynomialLR(optimizer, total_iters=total_iters, power=power)
    elif schedule == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=decay_iters)
    elif schedule == "step":
        main = StepLR(optimizer, step_size=_positive_int(step_size, "step_size"), gamma=gamma)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup is None:
        return main
    return SequentialLR(optimizer, schedulers=[warmup, main], milestones=[warmup_iters])


def warmup_start_factor(schedule: str, warmup_iters: int, default: float = 0.01) -> float:
    """The first warm-up factor of :func:`build_lr_scheduler` for a schedule.

    ``poly`` follows cchen-cc/MA-SAM ``MA-SAM/trainer.py`` (``base_lr * (iter_num + 1) / warmup_period``):
    the warm-up starts at ``1 / warmup_iters`` of the base rate. Other schedules start at ``default``.

    Args:
        schedule: one of :data:`LR_SCHEDULES`.
        warmup_iters: linear warm-up iterations (0: none; the factor is then unused).
        default: the factor of the other schedules.
    """
    return 1.0 / max(1, warmup_iters) if schedule == "poly" else default
