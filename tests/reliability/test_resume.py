"""Kill-and-resume, determinism and training-health checks on the bundles' demo configs (tiny SAM, CPU).

* SIGKILL a training process mid-epoch, resume with ``resume=true``: the final weights equal those of an
  uninterrupted run with the same seed (bit-identical on CPU with ``num_workers=0``; docs/reliability.md,
  "Kill and resume").
* Same seed, same data: identical weights after a short run, for every bundle.
* A NaN loss stops the run with :class:`TrainingDiverged` and keeps the last good checkpoint.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bundle_harness import REPO, relabelled_datalist, run_workflow

BUNDLES = ["ma_sam", "med_sa", "sam3d_adapter", "s_sam", "h_sam"]
WORKER = Path(__file__).with_name("train_worker.py")


def _copy(bundle: str, dst: Path) -> Path:
    shutil.copytree(REPO / "bundles" / bundle, dst, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    return dst


@pytest.fixture(scope="module")
def data_dirs(demo_data, tmp_path_factory) -> dict[str, Path]:
    """Demo data per bundle (3DSAM-adapter trains on the ``tumour`` label files)."""
    tumour = relabelled_datalist(demo_data, tmp_path_factory.mktemp("tumour_data"), "tumour")
    return {b: (tumour if b == "sam3d_adapter" else demo_data) for b in BUNDLES}


def _train(root: Path, data: Path, max_epochs: int, **extra) -> None:
    run_workflow(
        root,
        ["train.json", "demo.json"],
        "train",
        {"dataset_dir": str(data), "max_epochs": max_epochs, "val_interval": 2, "num_workers": 0, **extra},
    )


def _final_weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


@pytest.mark.parametrize("bundle", ["ma_sam", "med_sa"])
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(bundle, data_dirs, tmp_path):
    data = data_dirs[bundle]
    reference = _copy(bundle, tmp_path / "reference")
    _train(reference, data, max_epochs=3)

    killed = _copy(bundle, tmp_path / "killed")
    # iteration 3 is inside epoch 2 (the demo epochs have 2 iterations): epoch 1's checkpoint exists, epoch 2 is lost
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(killed), str(data), "3", "--val-interval", "2", "--kill-at", "3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, f"worker was not killed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    left = sorted(p.name for p in (killed / "models").glob("*.pt"))
    assert left == ["checkpoint_checkpoint_epoch=1.pt"], left  # nothing truncated, nothing from the lost epoch

    _train(killed, data, max_epochs=3, resume=True)  # the documented command: ... --resume true
    assert _max_diff(_final_weights(reference), _final_weights(killed)) <= 1e-6
    ref_state = torch.load(reference / "models" / "checkpoint_final.pt", weights_only=True)
    res_state = torch.load(killed / "models" / "checkpoint_final.pt", weights_only=True)
    assert ref_state["trainer"]["iteration"] == res_state["trainer"]["iteration"]
    assert torch.equal(ref_state["rng"]["torch"], res_state["rng"]["torch"])


def test_resume_without_rng_state_would_differ(data_dirs, tmp_path, monkeypatch):
    """Control for the test above: resuming without restoring the transforms' generators draws other crops,
    so the comparison really depends on the saved random state."""
    from shared_nets import engine

    data = data_dirs["ma_sam"]
    reference = _copy("ma_sam", tmp_path / "reference")
    _train(reference, data, max_epochs=2)
    resumed = _copy("ma_sam", tmp_path / "resumed")
    _train(resumed, data, max_epochs=1)
    monkeypatch.setattr(engine.RNGState, "load_state_dict", lambda self, state: None)
    _train(resumed, data, max_epochs=2, resume=True)
    assert _max_diff(_final_weights(reference), _final_weights(resumed)) > 1e-4


@pytest.mark.parametrize("bundle", BUNDLES)
def test_same_seed_same_weights(bundle, data_dirs, tmp_path):
    runs = []
    for name in ("first", "second"):
        root = _copy(bundle, tmp_path / name)
        _train(root, data_dirs[bundle], max_epochs=1)
        runs.append(_final_weights(root))
    assert _max_diff(*runs) == 0.0
    assert _max_diff(runs[0], {k: torch.zeros_like(v) for k, v in runs[0].items()}) > 0  # weights are not trivial


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(data_dirs, tmp_path):
    from shared_nets.engine import TrainingDiverged, run_bundle_workflow

    root = _copy("ma_sam", tmp_path / "bundle")

    def poison(engine) -> None:  # after epoch 1's checkpoint, corrupt the weights: the next loss is NaN
        if engine.state.iteration == 3:
            with torch.no_grad():
                next(p for p in engine.network.parameters() if p.requires_grad).fill_(float("nan"))

    with pytest.raises(Exception) as err:  # MONAI's config runner wraps it in "Failed to evaluate ..."
        run_bundle_workflow(
            root,
            ["train.json", "demo.json"],
            "train",
            {"dataset_dir": str(data_dirs["ma_sam"]), "max_epochs": 3, "val_interval": 1, "num_workers": 0},
            on_iteration=poison,
        )
    cause = err.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, TrainingDiverged)
    msg = str(cause)
    assert "\n" not in msg and "loss is nan" in msg and "iteration 4" in msg and "checkpoint_epoch=1.pt" in msg
    files = sorted(p.name for p in (root / "models").glob("*.pt"))
    assert files == ["checkpoint_checkpoint_epoch=1.pt", "model.pt"], files  # no final save of the diverged model
    kept = torch.load(root / "models" / "checkpoint_checkpoint_epoch=1.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in kept.values())
    best = torch.load(root / "models" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in best.values())
