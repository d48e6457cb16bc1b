"""SIGKILL MONAI Label's local datastore while it saves labels; report what the folder holds after each kill.

Run with the MONAI Label environment's Python::

    python datastore_kill_worker.py STUDIES MODULE_DIR ROUNDS OUT_JSON

It runs ``ROUNDS`` kills with MONAI Label's datastore as installed (the control), then imports the
app's ``sam_bundles_errors`` (from ``MODULE_DIR``), which makes the datastore's writes atomic, and runs
``ROUNDS`` more (one process: importing MONAI Label is the slow part). Each round forks a child that
saves two alternating label files (different sizes) for ``phantom_000`` as fast as it can, kills it
after a random delay, then records the label file under the real name (its SHA-256 and size), whether
``datastore_v2.json`` parses, and every file in the label folder. ``OUT_JSON`` gets
``{"monailabel": [...], "app": [...]}``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path


def _kill_rounds(datastore, sources: list[Path], label: Path, rounds: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    results = []
    for _ in range(rounds):
        pid = os.fork()
        if pid == 0:  # the writer: save labels until killed
            try:
                i = 0
                while True:
                    datastore.save_label("phantom_000", str(sources[i % 2]), "original", {})
                    i += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            json.loads(Path(datastore._datastore_config_path).read_text())
            json_ok = True
        except (OSError, ValueError):
            json_ok = False
        content = label.read_bytes() if label.exists() else None
        results.append(
            {
                "sha256": hashlib.sha256(content).hexdigest() if content is not None else None,
                "size": len(content) if content is not None else None,
                "json_ok": json_ok,
                "files": sorted(p.name for p in label.parent.iterdir()) if label.parent.exists() else [],
            }
        )
    return results


def main(studies: str, module_dir: str, rounds: str, out: str) -> None:
    # MONAI Label's own environment runs this file (not a dependency of this project): imported by name
    LocalDatastore = importlib.import_module("monailabel.datastore.local").LocalDatastore  # noqa: N806

    studies_path = Path(studies)
    sources = sorted((studies_path.parent / "label_sources").glob("*/phantom_000.nii.gz"))
    if len(sources) != 2:
        raise ValueError(f"expected two label sources under {studies_path.parent / 'label_sources'}, got {sources}.")
    datastore = LocalDatastore(studies, extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    label = studies_path / "labels" / "original" / "phantom_000.nii.gz"
    results = {"monailabel": _kill_rounds(datastore, sources, label, int(rounds), seed=0)}
    label.unlink(missing_ok=True)
    sys.path.insert(0, module_dir)
    importlib.import_module("sam_bundles_errors")  # the app's module: makes the datastore's writes atomic

    results["app"] = _kill_rounds(datastore, sources, label, int(rounds), seed=1)
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
