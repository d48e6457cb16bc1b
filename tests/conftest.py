"""Session fixtures shared by all tests (phantom data is generated once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

# small phantoms for bundle tests: BTCV label ids plus a binary tumour file per case
DEMO_SHAPE = (64, 64, 24)
DEMO_NUM = 6


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A phantom dataset written once per test session; returns the folder holding ``datalist.json``."""
    from tools.demo_data import write_demo_dataset

    out = tmp_path_factory.mktemp("demo_data")
    write_demo_dataset(out, num=DEMO_NUM, seed=0, shape=DEMO_SHAPE, progress=False)
    return out
