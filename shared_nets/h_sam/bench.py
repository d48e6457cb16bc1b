"""How ``python -m tools bench`` feeds and measures H-SAM (:class:`shared_nets.interface.BenchCase`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shared_nets.interface import BenchCase

__all__ = ["BENCH_CASE", "HSAMBenchCase"]


class HSAMBenchCase(BenchCase):
    """Automatic slice network whose training forward also takes the label (the stage-2 decoder's
    class-wise attention reads it, ``HSAM.forward(x, label)``)."""

    def train_forward(self, net: nn.Module, core: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
        return core(x, label=y)


BENCH_CASE = HSAMBenchCase()
