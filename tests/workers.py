"""How many CPU cores one test process may use when pytest-xdist runs the suite in several workers."""

from __future__ import annotations

import os


def cores_per_worker() -> int:
    """All the machine's cores, or an equal share of them under pytest-xdist (``pytest -n N``).

    Tests that use several threads, in process or in children (ViT-B paper-size runs, the phantom demo), take
    this count, so two xdist workers on CI's 2 cores do not oversubscribe them (OpenMP oversubscription was
    measured at 5-20x slower on this project's 2-core machines)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, (os.cpu_count() or 1) // max(1, workers))
