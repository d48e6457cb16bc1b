"""Throughput of sharded batch inference (``configs/multi_gpu_inference.json``) with 1, 2, ... processes.

Command line (from the checkout)::

    python -m tools bench_sharded --bundle ma_sam --nproc 1,2 --cases 12            # CPU, tiny demo model
    python -m tools bench_sharded --bundle ma_sam --nproc 1,2,4,8 --demo false --shape 512,512,64   # GPUs

Phantom volumes (``tools.demo_data``) are written to a temporary folder, the bundle is copied there
with an initial ``model.pt`` (random SAM weights: speed only), and for each process count
``torchrun --standalone --nproc_per_node N`` runs the sharded inference into a fresh output folder.
Reported per count: the command's wall time (start-up included) and cases per minute between the
first case's start and the last case's end, taken from ``manifest.jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["run_sharded", "main"]

REPO = Path(__file__).resolve().parents[1]


def _ints(value: str | int | Sequence[int], name: str) -> list[int]:
    if isinstance(value, int):
        return [value]
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = [int(v) for v in items]
    except ValueError:
        raise ValueError(f"{name} must be integers separated by commas, got {value!r}.") from None
    if not out or min(out) < 1:
        raise ValueError(f"{name} must be positive integers, got {value!r}.")
    return out


def run_sharded(root: Path, data: Path, out: Path, nproc: int, demo: bool, overrides: dict) -> dict:
    """One ``torchrun`` of the bundle's sharded inference; returns wall seconds and manifest throughput."""
    from shared_nets.distributed import read_manifest

    configs = ["inference.json", "multi_gpu_inference.json"] + (["demo.json"] if demo else [])
    files = "[" + ",".join(f"'{root / 'configs' / c}'" for c in configs) + "]"
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        files,
        "--meta_file",
        str(root / "configs" / "metadata.json"),
        "--logging_file",
        str(root / "configs" / "logging.conf"),
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
    ]
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(args, check=False, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun with {nproc} process(es) failed:\n{proc.stderr[-2000:]}")
    done = [r for r in read_manifest(out) if r["status"] == "done" and r.get("seconds") is not None]
    first = min(r["time"] - r["seconds"] for r in done)
    span = max(r["time"] for r in done) - first
    return {
        "nproc": nproc,
        "cases": len(done),
        "wall_s": wall,
        "span_s": span,
        "cases_per_min": 60.0 * len(done) / span if span > 0 else float("nan"),
    }


def main(
    bundle: str = "ma_sam",
    nproc: str | int = "1,2",
    cases: int = 12,
    demo: bool = True,
    shape: str = "64,64,24",
    keep: str | None = None,
) -> str:
    """Benchmark sharded inference of ``bundle`` on ``cases`` phantoms with each process count in ``nproc``.

    Args:
        bundle: folder name under ``bundles/``.
        nproc: process counts, e.g. ``1,2`` (CPU) or ``1,2,4,8`` (one per GPU).
        cases: phantom volumes in the test list.
        demo: merge ``demo.json`` (tiny SAM, CPU); ``false`` runs the real inference settings (GPU).
        shape: phantom volume shape ``H,W,D``.
        keep: folder to keep the data and outputs in (default: a temporary folder, removed).

    Returns:
        A markdown table (printed by the command line).
    """
    from tools.demo_data import write_demo_dataset
    from tools.init_model import merged_config, write_initial_model

    counts = _ints(nproc, "nproc")
    size = _ints(shape, "shape")
    if len(size) != 3:
        raise ValueError(f"shape must be H,W,D, got {shape!r}.")
    if int(cases) < 3:
        raise ValueError(f"cases must be at least 3, got {cases}.")
    src = REPO / "bundles" / bundle
    if not (src / "configs" / "multi_gpu_inference.json").is_file():
        raise ValueError(f"bundle '{bundle}' has no configs/multi_gpu_inference.json under {REPO / 'bundles'}.")
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench_sharded."))
    try:
        data = work / "data"
        write_demo_dataset(data, num=int(cases), seed=0, shape=tuple(size), progress=False)
        content = json.loads((data / "datalist.json").read_text())
        content["test"] = content["training"] + content["validation"] + content["test"]
        (data / "datalist.json").write_text(json.dumps(content))
        # the phantoms' label as demo.json names it (e.g. a tumour mask, not the organs), with or without --demo
        phantom_cfgs = [c for c in ("inference.json", "demo.json") if (src / "configs" / c).is_file()]
        label_key = merged_config(src, phantom_cfgs).get("label_key", "label")
        if label_key != "label":
            for item in content["test"]:
                item["label"] = item[label_key]
            (data / "datalist.json").write_text(json.dumps(content))
        root = work / bundle
        shutil.copytree(src, root, ignore=shutil.ignore_patterns("models", "eval", "runs"), dirs_exist_ok=True)
        configs = ["inference.json"] + (["demo.json"] if demo else [])
        write_initial_model(root, configs=configs, overrides={"dataset_dir": str(data)})
        rows = [run_sharded(root, data, work / f"out_{n}", n, bool(demo), {}) for n in counts]
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["cases_per_min"]
    lines = ["| processes | cases | wall s (start-up incl.) | cases / min | × 1st row |", "|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {r['nproc']} | {r['cases']} | {r['wall_s']:.1f} | {r['cases_per_min']:.1f} | "
        f"{r['cases_per_min'] / base:.2f}× |"
        for r in rows
    ]
    return "\n".join(lines)
