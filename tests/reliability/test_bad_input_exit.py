"""A bundle run that meets a bad volume must end with exit code 1 and its one-line error, every time.

MONAI's ``CacheDataset`` fills its cache from a ``multiprocessing.pool.ThreadPool`` whose ``terminate()``
does not join thread workers: after one item raised :class:`shared_nets.data.DataError`, a worker kept
transforming the remaining items, and when the interpreter finalized with that daemon thread inside
torch's C++ code the process aborted (``terminate called without an active exception``, exit code 134)
in some of the runs. The bad volume comes first and the good ones after it, so that a cache-filling
thread is still busy when the error reaches the top; the run is repeated to catch an intermittent abort.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNS = 8  # before the fix 2 of 8 runs aborted (bad volume 2nd of 8), 2 of 6 with it 1st of 25 as here


@pytest.mark.slow
def test_training_on_a_truncated_volume_exits_1_every_time(demo_data, tmp_path):
    bundle = tmp_path / "ma_sam"
    shutil.copytree(REPO / "bundles" / "ma_sam", bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    content = json.loads((demo_data / "datalist.json").read_text())
    good = [{k: str(demo_data / v) for k, v in item.items()} for item in content["training"]]
    broken = tmp_path / "broken.nii.gz"
    blob = Path(good[0]["image"]).read_bytes()
    broken.write_bytes(blob[: len(blob) // 2])
    datalist = tmp_path / "datalist.json"
    validation = [{k: str(demo_data / v) for k, v in item.items()} for item in content["validation"]]
    datalist.write_text(json.dumps({"training": [{**good[0], "image": str(broken)}] + good * 4,
                                    "validation": validation}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/demo.json']",
           "--max_epochs", "1", "--dataset_dir", str(demo_data), "--data_list_file_path", str(datalist)]
    codes = []
    for _ in range(RUNS):
        proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=600, check=False)
        codes.append(proc.returncode)
        assert "terminate called" not in proc.stderr, f"runs so far: {codes}\n{proc.stderr[-2000:]}"
        errors = [line for line in proc.stderr.splitlines() if line.startswith("shared_nets.data.DataError: ")]
        assert len(errors) == 1, proc.stderr[-2000:]
        assert f"'{broken}'" in errors[0] and "could not be read" in errors[0], errors[0]
    assert codes == [1] * RUNS, codes
