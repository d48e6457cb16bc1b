"""How ``python -m tools bench`` feeds and measures MA-SAM (:class:`shared_nets.interface.BenchCase`)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from shared_nets.interface import BenchCase

__all__ = ["BENCH_CASE", "MASAMBenchCase"]


class MASAMBenchCase(BenchCase):
    """Automatic slice network; an optional box prompt arrives as a ``roi`` guidance channel."""

    #: real-size training memory at a 24 GB target: ViT-B, 512², 5 slices (train.json overrides)
    memory_target: ClassVar[dict[str, Any]] = {"variant": "vit_b", "img_size": 512, "num_slices": 5}

    def prompt_channels(self, net: nn.Module) -> tuple[str, ...]:
        return ("roi",) if getattr(net, "use_box_prompt", False) else ()


BENCH_CASE = MASAMBenchCase()
