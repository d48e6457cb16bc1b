"""tools.init_model on a bundle whose network reads the metadata (S-SAM's channel_def)."""

from __future__ import annotations

import torch

from tests.bundle_harness import REPO


def test_initial_model_of_a_network_that_reads_channel_def_from_metadata(tmp_path):
    from tools.init_model import write_initial_model

    out = write_initial_model(
        REPO / "bundles" / "s_sam", configs=["inference.json", "demo.json"], out=tmp_path / "model.pt"
    )
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
