"""A MONAI Label datastore killed while it saves a label never shows a half-written label.

MONAI Label's local datastore copies a saved label (an infer with ``save_label``) in place and
rewrites ``datastore_v2.json`` in place. The app written by ``python -m tools label_app`` makes both
writes atomic (``sam_bundles_errors``). ``tests/reliability/datastore_kill_worker.py`` SIGKILLs a
process in the middle of saving labels, many times, with MONAI Label's own datastore (the control:
truncated labels) and with the app's.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.label_server import require_monailabel_python

WORKER = Path(__file__).with_name("datastore_kill_worker.py")
ROUNDS = 12


pytestmark = pytest.mark.slow  # about 20-50 s: the worker imports MONAI Label (torch, MONAI) once for 24 kills


@pytest.fixture(scope="module")
def kills(tmp_path_factory) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """The worker's reports (control, then with the app's datastore writes) and the label versions it saved.

    The two label files are incompressible, 4 and 6 MiB, so that a copy takes a while.
    """
    python = require_monailabel_python()
    from tools.label_app import ERRORS_MODULE, ERRORS_SOURCE

    root = tmp_path_factory.mktemp("datastore_kill")
    versions = {}
    for name, mib in (("a", 4), ("b", 6)):
        path = root / "label_sources" / name / "phantom_000.nii.gz"
        path.parent.mkdir(parents=True)
        data = np.random.default_rng(mib).bytes(mib << 20)
        path.write_bytes(data)
        versions[hashlib.sha256(data).hexdigest()] = len(data)
    studies = root / "studies"
    studies.mkdir()
    (studies / "phantom_000.nii.gz").write_bytes(b"an image")
    module_dir = root / "app"
    module_dir.mkdir()
    (module_dir / f"{ERRORS_MODULE}.py").write_text(ERRORS_SOURCE)
    out = root / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MONAI_LABEL_APP_DIR": str(module_dir)}
    done = subprocess.run(
        [python, str(WORKER), str(studies), str(module_dir), str(ROUNDS), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=root,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), versions


def test_killed_label_save_leaves_a_whole_label_and_readable_json(kills):
    results, versions = kills[0]["app"], kills[1]
    for i, r in enumerate(results):
        assert r["json_ok"], f"kill {i}: datastore_v2.json does not parse"
        assert r["sha256"] is None or r["sha256"] in versions, f"kill {i}: a half-written label ({r['size']} bytes)"
        visible = [f for f in r["files"] if f.endswith((".nii.gz", ".nii"))]
        assert visible in ([], ["phantom_000.nii.gz"]), f"kill {i}: files that look like labels: {visible}"
    assert sum(r["sha256"] is not None for r in results) >= ROUNDS // 2, "the writer hardly ever saved a label"
    temporary = [f for f in results[-1]["files"] if f.endswith(".tmp")]
    print(f"\nwith the app: {len(results)} kills, every label whole; {len(temporary)} .tmp files left in the end")


def test_control_monailabel_alone_leaves_half_written_labels(kills):
    """The same kills against MONAI Label's own in-place copy: a truncated label under the real name."""
    results, versions = kills[0]["monailabel"], kills[1]
    torn = [r["size"] for r in results if r["sha256"] is not None and r["sha256"] not in versions]
    print(f"\nMONAI Label alone: {len(torn)} of {len(results)} kills left a truncated label under the real name")
    assert torn, f"no kill caught MONAI Label's in-place copy: sizes {[r['size'] for r in results]}"
