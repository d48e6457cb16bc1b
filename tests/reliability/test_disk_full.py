"""A full disk: a checkpoint, a prediction or a metrics write that gets ``ENOSPC`` keeps the previous file,
leaves no temporary file, and stops with one line naming the file (``shared_nets.io.DiskFullError``).

The unit tests inject the error into the writers in-process; the ``monai.bundle run`` tests run a bundle in
a child process (``enospc_worker.py``) whose ``os.fsync`` of the chosen file fails, as a full disk does
when the data is flushed, and check the exit code, stderr and the folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_nets.io import DiskFullError, atomic_path, atomic_torch_save, atomic_write_json

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("enospc_worker.py")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".metrics."))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _check_one_line(err: DiskFullError, path: Path) -> None:
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert "\n" not in err.strerror and f"'{path}'" in err.strerror and "previous file was kept" in err.strerror


# -- the writers, in-process ------------------------------------------------------------------------------
def test_atomic_path_full_while_writing_keeps_the_previous_file(tmp_path):
    target = tmp_path / "notes.json"
    atomic_write_json({"v": 1}, target)
    with pytest.raises(DiskFullError) as err, atomic_path(target) as tmp, open(tmp, "w") as f:
        f.write('{"v": 2, "half')  # a partial write, then the disk is full
        _enospc()
    _check_one_line(err.value, target)
    assert json.loads(target.read_text()) == {"v": 1} and _leftovers(tmp_path) == []


def test_checkpoint_full_at_fsync_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(3)}, target)
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(DiskFullError) as err:
        atomic_torch_save({"w": torch.zeros(1000)}, target)
    _check_one_line(err.value, target)
    assert torch.equal(torch.load(target)["w"], torch.ones(3)) and _leftovers(tmp_path) == []


def test_prediction_full_keeps_the_previous_prediction(tmp_path, monkeypatch):
    import nibabel as nib

    from shared_nets.io import AtomicNibabelWriter

    target = tmp_path / "case_seg.nii.gz"

    def write(value: int) -> None:
        writer = AtomicNibabelWriter(output_dtype=np.uint8)
        writer.set_data_array(torch.full((4, 4, 4), value, dtype=torch.uint8), channel_dim=None)
        writer.set_metadata({"affine": np.eye(4), "original_affine": np.eye(4)}, resample=False)
        writer.write(str(target))

    write(1)
    monkeypatch.setattr(nib, "save", _enospc)
    with pytest.raises(DiskFullError) as err:
        write(2)
    _check_one_line(err.value, target)
    assert np.all(np.asarray(nib.load(str(target)).dataobj) == 1) and _leftovers(tmp_path) == []


def test_metrics_full_keeps_the_previous_reports(tmp_path, monkeypatch):
    import monai.handlers.metrics_saver as metrics_saver
    from ignite.engine import Engine

    from shared_nets.io import AtomicMetricsSaver

    def engine_with(value: float) -> Engine:
        engine = Engine(lambda e, b: None)
        engine.state.metrics = {"mean_dice": value}
        engine.state.metric_details = {}
        return engine

    AtomicMetricsSaver(save_dir=str(tmp_path), metrics="*")(engine_with(0.5))
    before = (tmp_path / "metrics.csv").read_text()
    real = metrics_saver.write_metrics_reports

    def half_then_full(save_dir, **kwargs):
        real(save_dir=save_dir, **kwargs)  # the files are written into the temporary folder ...
        _enospc()  # ... then the disk is full

    monkeypatch.setattr(metrics_saver, "write_metrics_reports", half_then_full)
    with pytest.raises(DiskFullError) as err:
        AtomicMetricsSaver(save_dir=str(tmp_path), metrics="*")(engine_with(0.9))
    assert "metrics" in err.value.strerror and "\n" not in err.value.strerror
    assert (tmp_path / "metrics.csv").read_text() == before and _leftovers(tmp_path) == []


# -- monai.bundle run in a child process ------------------------------------------------------------------
def _bundle_run(bundle: Path, pattern: str, allowed: int, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, str(WORKER), pattern, str(allowed), "run", *args, "--bundle_root", str(bundle)]
    return subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=900, env=env, check=False)


def _assert_stopped_with_one_line(proc: subprocess.CompletedProcess, name: str) -> str:
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left on device writing '") and name in last, last
    assert "previous file was kept" in last
    return last


@pytest.mark.slow
def test_training_stops_with_one_line_when_a_checkpoint_hits_a_full_disk(demo_data, tmp_path):
    bundle = tmp_path / "ma_sam"
    shutil.copytree(REPO / "bundles" / "ma_sam", bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    proc = _bundle_run(
        bundle,
        "checkpoint_checkpoint_epoch",
        1,
        "--config_file",
        "['configs/train.json','configs/demo.json']",
        "--dataset_dir",
        str(demo_data),
        "--max_epochs",
        "3",
        "--num_workers",
        "0",
    )
    _assert_stopped_with_one_line(proc, "checkpoint_checkpoint_epoch=2.pt")
    models = bundle / "models"
    assert (models / "checkpoint_checkpoint_epoch=1.pt").is_file(), sorted(p.name for p in models.iterdir())
    assert not (models / "checkpoint_checkpoint_epoch=2.pt").exists()
    state = torch.load(models / "checkpoint_checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert "model" in state or any("model" in k for k in state), sorted(state)[:10]
    assert _leftovers(bundle) == []


@pytest.mark.slow
def test_inference_stops_with_one_line_when_a_prediction_hits_a_full_disk(demo_data, tmp_path):
    from tests.bundle_harness import write_initial_model

    bundle = tmp_path / "ma_sam"
    shutil.copytree(REPO / "bundles" / "ma_sam", bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    write_initial_model(bundle)
    out = tmp_path / "out"
    args = (
        "--config_file",
        "['configs/inference.json','configs/demo.json']",
        "--dataset_dir",
        str(demo_data),
        "--output_dir",
        str(out),
    )
    first = _bundle_run(bundle, "no file has this name", 0, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: _md5(p) for p in out.glob("*_seg.nii.gz")}
    assert before
    proc = _bundle_run(bundle, "_seg.nii.gz", 0, *args)
    _assert_stopped_with_one_line(proc, "_seg.nii.gz")
    assert {p.name: _md5(p) for p in out.glob("*_seg.nii.gz")} == before
    assert _leftovers(out) == []


def test_save_imaged_flattening_still_gives_the_one_line(tmp_path, monkeypatch):
    """MONAI's ``SaveImage`` re-raises a writer's error as the text of a new RuntimeError (no ``__cause__``); the
    line printed at exit is still the disk-full one."""
    import nibabel as nib
    from monai.data import MetaTensor
    from monai.transforms import SaveImaged

    from shared_nets.io import _disk_full_line

    save = SaveImaged(
        "pred",
        output_dir=str(tmp_path),
        output_postfix="seg",
        writer="shared_nets.io.AtomicNibabelWriter",
        separate_folder=False,
        print_log=False,
    )
    img = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "case.nii.gz", "affine": torch.eye(4)})
    monkeypatch.setattr(nib, "save", _enospc)
    with pytest.raises(RuntimeError) as err:
        save({"pred": img})
    assert not isinstance(err.value, DiskFullError)
    line = _disk_full_line(err.value)
    assert line is not None and line.startswith("no space left on device writing '") and "case_seg.nii.gz" in line
    assert _leftovers(tmp_path) == []
