"""H-SAM's two-stage loss weighting (sec. 3.4 "Training Loss") as an ignite handler for MONAI's ``DeepSupervisionLoss``.

The network returns ``[stage-1 logits, stage-2 logits]`` in training; ``DeepSupervisionLoss``
resizes the label to each output (nearest) and sums ``weights[i] · loss(output_i)``. This
handler rewrites ``weights`` at the start of every epoch:

* ``paper``: ``λ·L1 + (1−λ)·L2`` with ``λ = start · exp(−decay · epoch)`` (λ "gradually decreases
  from 0.8 by exponential decay with coefficient 0.005");
* ``official``: the released trainer's ``(1−w)·L1 + w·L2`` with ``w = 0.6 ** (0.99 ** epoch)``.

Each stage's loss (:func:`stage_loss`, ``loss_type``):

* ``softmax`` (default): softmax cross-entropy + softmax Dice over the ``K + 1`` channels, as the
  released code (Cccccczh404/H-SAM ``trainer.py``: ``CrossEntropyLoss()`` and ``utils.DiceLoss``
  with ``softmax=True``, ``loss = (1 - dice_param) * ce + dice_param * dice``, ``dice_param`` 0.9 in
  ``train.py``) and the implementation details of the paper (sec. 4.1: "a combination of
  Cross-Entropy loss and Dice loss"). It is the default because the network itself is softmax-based:
  the stage-2 decoder is guided by the *softmax* of the stage-1 logits (CMAttn, mask attention) and
  the two stages are ensembled as averaged softmax probabilities.
* ``sigmoid``: the literal eq. (4) of sec. 3.4, "binary cross-entropy loss and dice loss": every
  channel is a binary mask (sigmoid), BCE-with-logits on the one-hot label plus sigmoid Dice. Built
  as MONAI ``DiceFocalLoss`` with focal ``gamma=0`` and no ``alpha``, which is exactly BCE-with-logits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from monai.utils import optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", name="Engine")

__all__ = ["STAGE_WEIGHT_SCHEDULES", "STAGE_LOSS_TYPES", "stage_weights", "stage_loss", "HSAMStageWeights"]

STAGE_WEIGHT_SCHEDULES = ("paper", "official")
STAGE_LOSS_TYPES = ("softmax", "sigmoid")


def stage_loss(loss_type: str = "softmax", lambda_dice: float = 0.9, lambda_ce: float = 0.1):
    """The loss of one decoder stage, ``lambda_ce · CE + lambda_dice · Dice`` (see the module docstring).

    Args:
        loss_type: ``softmax`` (released code; default) or ``sigmoid`` (the paper's binary cross-entropy).
        lambda_dice: weight of the Dice term (released ``dice_param`` 0.9).
        lambda_ce: weight of the (binary) cross-entropy term (released ``1 - dice_param``).

    Returns:
        A MONAI loss taking logits ``[B, K, ...]`` and an integer label ``[B, 1, ...]``.
    """
    from monai.losses import DiceCELoss, DiceFocalLoss

    if loss_type == "softmax":
        return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
    if loss_type == "sigmoid":
        return DiceFocalLoss(
            to_onehot_y=True, sigmoid=True, gamma=0.0, alpha=None, lambda_dice=lambda_dice, lambda_focal=lambda_ce
        )
    raise ValueError(f"loss_type must be one of {STAGE_LOSS_TYPES}, got {loss_type!r}.")


def stage_weights(epoch: int, schedule: str = "paper", start: float = 0.8, decay: float = 0.005) -> list[float]:
    """Loss weights ``[stage 1, stage 2]`` for a 0-based ``epoch`` (sec. 3.4).

    Args:
        epoch: completed epochs (0 for the first).
        schedule: ``paper`` or ``official`` (see the module docstring).
        start: the paper's initial λ (0.8).
        decay: the paper's decay coefficient (0.005 per epoch).

    Returns:
        Two non-negative weights summing to 1.
    """
    if schedule not in STAGE_WEIGHT_SCHEDULES:
        raise ValueError(f"schedule must be one of {STAGE_WEIGHT_SCHEDULES}, got {schedule!r}.")
    if not 0.0 <= start <= 1.0:
        raise ValueError(f"start must be in [0, 1], got {start!r}.")
    if not decay >= 0.0:
        raise ValueError(f"decay must be >= 0, got {decay!r}.")
    epoch = max(int(epoch), 0)
    if schedule == "paper":
        lam = start * math.exp(-decay * epoch)
        return [lam, 1.0 - lam]
    w = 0.6 ** (0.99**epoch)
    return [1.0 - w, w]


class HSAMStageWeights:
    """Ignite handler: set ``loss.weights`` of a ``DeepSupervisionLoss`` from the epoch (sec. 3.4).

    Args:
        loss: a ``monai.losses.DeepSupervisionLoss`` (anything with a ``weights`` attribute).
        schedule: ``paper`` or ``official``.
        start: initial stage-1 weight λ of the paper schedule.
        decay: exponential decay coefficient of the paper schedule.

    The weights for epoch 0 are set at construction, so the loss is usable before attaching.
    """

    def __init__(self, loss: object, schedule: str = "paper", start: float = 0.8, decay: float = 0.005) -> None:
        if not hasattr(loss, "weights"):
            raise ValueError(
                f"loss must be a monai DeepSupervisionLoss (with a `weights` attribute), got {type(loss).__name__}."
            )
        stage_weights(0, schedule, start, decay)  # validates the arguments
        self.loss, self.schedule, self.start, self.decay = loss, schedule, start, decay
        self.loss.weights = stage_weights(0, schedule, start, decay)

    def attach(self, engine: Engine) -> None:
        """Update the weights at every ``EPOCH_STARTED`` of ``engine``."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        # ignite counts epochs from 1; the schedules from 0
        self.loss.weights = stage_weights(engine.state.epoch - 1, self.schedule, self.start, self.decay)
