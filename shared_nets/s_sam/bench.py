"""How ``python -m tools bench`` feeds and measures S-SAM (:class:`shared_nets.interface.BenchCase`)."""

from __future__ import annotations

from shared_nets.interface import BenchCase

__all__ = ["BENCH_CASE"]

#: an automatic slice network (class-name text prompts are built in): the defaults fit
BENCH_CASE = BenchCase()
