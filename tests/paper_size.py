"""Paper-size smoke runs of the five bundles: one training iteration and one inference at ViT-B.

Each run uses the bundle's own ``configs/train.json`` / ``configs/inference.json`` through
``monai.bundle`` (:func:`shared_nets.engine.run_bundle_workflow`), with the paper's image size,
random weights (``sam_checkpoint: null``), ``variant: vit_b``, batch size 1, one sample per volume,
one epoch and no validation, on a real abdominal CT cropped to a few slices (the bundles' own
transforms resize it in-plane to the paper's size). Training and inference each run in their own
child process, so the peak RSS read from ``os.wait4`` (through a small launcher,
``tests/peak_rss.py``) is that run's alone; the training child
saves the trained network as ``models/model.pt`` and the inference child loads it from there.

Used by ``tests/test_paper_size.py`` (CI) and, as a script, to take the numbers written in the
bundle READMEs::

    python -m tests.paper_size ma_sam med_sa ...        # CI settings, prints a table
    python -m tests.paper_size med_sa --full            # the paper's setting without CI's cuts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.peak_rss import run_with_peak_rss

REPO = Path(__file__).resolve().parents[1]
# shipped in the repository (data/); ../shared beside the checkout holds the same files
REAL_CT = REPO / "data" / "totalsegmentator_example"
if not (REAL_CT / "ct.nii.gz").is_file():
    REAL_CT = REPO.parent / "shared" / "data" / "totalsegmentator_example"
# TotalSegmentator v2 "total" ids -> BTCV ids (organs both label; everything else -> background)
TOTALSEG_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 7, 7: 11, 8: 12, 9: 13, 52: 8, 63: 9, 64: 10}
MIB = 1024 * 1024


@dataclass(frozen=True)
class PaperSetting:
    """How one bundle is run at paper size.

    Attributes:
        paper: the paper's setting in words (for the README table).
        slices: slices of the cropped CT (the training/inference depth the run sees).
        slices_key: the config key that holds the network's slice count, if any.
        crop_xy: in-plane crop ``(row0, row1, col0, col1)`` of the CT (3 mm voxels), or None.
        overrides: bundle-specific config overrides (both workflows).
        infer_overrides: overrides for the inference workflow only.
        ci_overrides: cuts for CI's time and memory budget (both workflows), dropped by ``full``.
        full_slices: slices of the paper's full setting (default ``slices``).
        full_crop_xy: in-plane crop of the full setting (default ``crop_xy``).
    """

    paper: str
    slices: int
    slices_key: str | None = None
    crop_xy: tuple[int, int, int, int] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    infer_overrides: dict[str, Any] = field(default_factory=dict)
    ci_overrides: dict[str, Any] = field(default_factory=dict)
    full_slices: int | None = None
    full_crop_xy: tuple[int, int, int, int] | None = None


SETTINGS: dict[str, PaperSetting] = {
    "ma_sam": PaperSetting("512 x 512, 5 slices", 5, "num_slices"),
    # the paper's 16-slice chunks at 1024 px take minutes on 2 CPU cores: CI uses 2 (SD-Trans still mixes
    # slices), with gradient checkpointing (2 slices without it peak at 19.5 GiB RSS)
    "med_sa": PaperSetting(
        "1024 x 1024, 16 slices",
        2,
        "num_slices",
        infer_overrides={"prompt_source": "label"},
        ci_overrides={"gradient_checkpointing": True},
        full_slices=16,
    ),
    # a 128^3 cube at 1 mm (126 mm of CT) around the right kidney (KiTS21 target class 2 = BTCV right
    # kidney). The token grid is set by sam_input_size (each slice resized to it, 16-px patches): the
    # paper's 512 gives 32^3 tokens and takes many minutes on 2 CPU cores; CI runs SAM at 256 (16^3 tokens)
    "sam3d_adapter": PaperSetting(
        "128 x 128 x 128 at 1 mm, SAM at 512",
        30,
        crop_xy=(60, 102, 19, 61),
        infer_overrides={"prompt_source": "label"},
        ci_overrides={"sam_input_size": 256},
    ),
    # 2D methods: 2 slices, so inference also stitches slices back in order (the README rows were taken on 1)
    "s_sam": PaperSetting("256 x 256, 2D", 2),
    "h_sam": PaperSetting("512 x 512, 2D", 2),
}
FIRST_SLICE = 8  # slices 8.. of the example hold the liver, spleen, both kidneys, stomach and aorta


def write_case(out: Path, slices: int, crop_xy: tuple[int, int, int, int] | None = None) -> Path:
    """The real CT cropped to ``slices`` slices (and ``crop_xy``), BTCV labels, as a one-case datalist."""
    import nibabel as nib
    import numpy as np

    if not (REAL_CT / "ct.nii.gz").is_file():
        raise FileNotFoundError(f"real CT example not found at {REAL_CT}")
    ct, seg = nib.load(str(REAL_CT / "ct.nii.gz")), nib.load(str(REAL_CT / "seg.nii.gz"))
    z0 = min(FIRST_SLICE, ct.shape[2] - slices)
    r0, r1, c0, c1 = crop_xy or (0, ct.shape[0], 0, ct.shape[1])
    box = (slice(r0, r1), slice(c0, c1), slice(z0, z0 + slices))
    affine = ct.affine.copy()
    affine[:3, 3] = ct.affine[:3, :3] @ np.array([r0, c0, z0]) + ct.affine[:3, 3]
    img = np.asarray(ct.dataobj)[box]
    ts = np.asarray(seg.dataobj)[box]
    btcv = np.zeros(ts.shape, np.uint8)
    for src, dst in TOTALSEG_TO_BTCV.items():
        btcv[ts == src] = dst
    out.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img, affine), str(out / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(btcv, affine), str(out / "ct_label.nii.gz"))
    item = {"image": "ct.nii.gz", "label": "ct_label.nii.gz"}
    content = {
        "name": "totalsegmentator_example",
        "labels": {},
        "training": [item],
        "validation": [item],
        "test": [item],
    }
    (out / "datalist.json").write_text(json.dumps(content))
    return out


def overrides_for(
    bundle: str, data_dir: Path, workflow: str, slices: int | None = None, full: bool = False
) -> dict[str, Any]:
    """Config overrides of a paper-size run (``slices`` replaces the setting's depth if given;
    ``full``: the paper's setting, without CI's cuts)."""
    s = SETTINGS[bundle]
    slices = slices or ((s.full_slices or s.slices) if full else s.slices)
    over: dict[str, Any] = {
        "dataset_dir": str(data_dir),
        "device": "$torch.device('cpu')",
        "variant": "vit_b",
        "sam_checkpoint": None,
        "num_workers": 0,
        **s.overrides,
        **({} if full else s.ci_overrides),
    }
    if s.slices_key:
        over[s.slices_key] = slices
    if workflow == "train":
        over.update({"batch_size": 1, "num_samples": 1, "max_epochs": 1, "val_interval": 1000})
    else:
        over.update({"output_dir": str(data_dir / "pred"), **s.infer_overrides})
    return over


def child_main(argv: list[str]) -> int:
    """Child process: run one workflow, write ``{"time_s", "losses", "sdpa", ...}`` to the result file."""
    bundle, workflow, bundle_root, result_file, over_json = argv
    import torch

    from shared_nets.engine import run_bundle_workflow
    from shared_nets.sam import is_sdpa_enabled

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    losses: list[float] = []

    def collect(engine) -> None:
        out = engine.state.output
        losses.append(float((out[0] if isinstance(out, list) else out)["loss"]))

    start = time.perf_counter()
    wf = run_bundle_workflow(
        bundle_root, ["train.json" if workflow == "train" else "inference.json"], workflow, json.loads(over_json),
        on_iteration=collect if workflow == "train" else None,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    net = wf.parser.get_parsed_content("network_def")
    if workflow == "train":
        (Path(bundle_root) / "models").mkdir(exist_ok=True)
        torch.save(net.state_dict(), str(Path(bundle_root) / "models" / "model.pt"))
    result = {"time_s": elapsed, "losses": losses, "sdpa": is_sdpa_enabled(net), "threads": torch.get_num_threads()}
    Path(result_file).write_text(json.dumps(result))
    return 0


def run_measured(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> tuple[int, int, float]:
    """Run ``cmd``; returns ``(exit status, peak RSS in bytes of that run alone, wall seconds)`` (-9 on timeout)."""
    start = time.monotonic()
    try:
        return run_with_peak_rss(cmd, log, env, timeout, cwd=REPO)
    except TimeoutError:
        return -9, 0, time.monotonic() - start


def run_bundle(
    bundle: str, work: Path, slices: int | None = None, threads: int = 2, timeout: float = 600, full: bool = False
) -> dict:
    """Train one iteration then infer, each in a child process; returns both runs' measurements.

    Returns:
        ``{"train": {...}, "infer": {...}, "slices", "data_dir", "bundle_root"}``; each run has
        ``status``, ``peak_rss_mib``, ``wall_s`` (child process, imports included), ``time_s``
        (the workflow alone), ``log`` and what the child reported (``losses``, ``sdpa``).
    """
    s = SETTINGS[bundle]
    depth = slices or ((s.full_slices or s.slices) if full else s.slices)
    crop = (s.full_crop_xy or s.crop_xy) if full else s.crop_xy
    data_dir = write_case(work / "data", depth, crop)
    root = work / bundle
    shutil.copytree(REPO / "bundles" / bundle, root, ignore=shutil.ignore_patterns("models", "eval", "runs", "cache"))
    threads_env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **threads_env, "PYTHONPATH": path}
    out: dict[str, Any] = {"slices": depth, "data_dir": str(data_dir), "bundle_root": str(root)}
    for workflow in ("train", "infer"):
        result_file = work / f"{workflow}.json"
        over = overrides_for(bundle, data_dir, workflow, depth, full)
        cmd = [
            sys.executable,
            "-m",
            "tests.paper_size",
            "--child",
            bundle,
            workflow,
            str(root),
            str(result_file),
            json.dumps(over),
        ]
        log = work / f"{workflow}.log"
        status, peak, wall = run_measured(cmd, log, env, timeout)
        run = {"status": status, "peak_rss_mib": peak / MIB, "wall_s": wall, "log": str(log)}
        if status == 0:
            run.update(json.loads(result_file.read_text()))
        out[workflow] = run
        if status != 0:
            break
    return out


def machine() -> str:
    """CPU model, cores and load, for the README tables."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} cores, load {load:.1f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", default=list(SETTINGS))
    ap.add_argument("--slices", type=int, default=None, help="depth instead of the CI setting's")
    ap.add_argument("--full", action="store_true", help="the paper's setting, without CI's cuts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    args = ap.parse_args(argv)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for bundle in args.bundles:
            res = run_bundle(bundle, Path(tmp) / bundle, args.slices, args.threads, args.timeout, args.full)
            for wf in ("train", "infer"):
                r = res.get(wf, {"status": "not run"})
                rows.append(
                    (
                        bundle,
                        wf,
                        res["slices"],
                        r.get("status"),
                        r.get("peak_rss_mib", 0),
                        r.get("wall_s", 0),
                        r.get("time_s", float("nan")),
                    )
                )
                print(json.dumps({"bundle": bundle, "workflow": wf, "slices": res["slices"], **r}), flush=True)
                if r.get("status") not in (0, "not run"):
                    print(Path(r["log"]).read_text()[-3000:], file=sys.stderr)
    print(f"\nmachine: {machine()}, threads {args.threads}")
    print("| bundle | run | slices | status | peak RSS (MiB) | child wall (s) | workflow (s) |")
    print("|---|---|---|---|---|---|---|")
    for b, wf, sl, st, rss, wall, t in rows:
        print(f"| {b} | {wf} | {sl} | {st} | {rss:.0f} | {wall:.0f} | {t:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
