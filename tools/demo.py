"""The main job: phantom data → train a bundle (tiny SAM, CPU) → sliding-window inference → Dice.

``python -m tools demo --out demo_output`` writes:

* ``data/``: the phantom dataset and ``datalist.json``;
* ``models/``: ``model.pt`` (best validation Dice) and the resumable ``checkpoint*.pt``;
* ``predictions/``: one NIfTI label map per held-out volume, in the input's space;
* ``overlays/``: PNGs of a few slices per held-out volume (image | ground truth | prediction);
* ``dice.md`` / ``dice.json``: per-class Dice on the held-out volumes (also printed);
* ``eval/runs``: TensorBoard logs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from shared_nets.io import atomic_write_json, atomic_write_text

__all__ = ["main", "dice_table", "write_overlays"]

REPO = Path(__file__).resolve().parents[1]

# RGB colours for BTCV ids in overlays (others get a hashed colour)
_COLOURS = {1: (255, 160, 0), 2: (0, 200, 255), 3: (0, 120, 255), 6: (200, 60, 60), 7: (120, 220, 90), 8: (255, 60, 200)}


def _colour(label: int) -> tuple[int, int, int]:
    return _COLOURS.get(label, ((label * 97) % 255, (label * 57) % 255, (label * 37) % 255))


def dice_table(pairs: list[tuple[Path, Path]], class_names: dict[int, str]) -> dict:
    """Per-class Dice over ``(prediction, ground truth)`` NIfTI pairs (classes present in the ground truth).

    Returns:
        ``{"per_case": {case: {class: dice}}, "per_class": {class: mean}, "mean": mean over classes}``.
    """
    per_case: dict[str, dict[str, float]] = {}
    for pred_file, gt_file in pairs:
        pred = np.asarray(nib.load(str(pred_file)).dataobj).astype(np.int64)
        gt = np.asarray(nib.load(str(gt_file)).dataobj).astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction '{pred_file}' has shape {pred.shape}, ground truth '{gt_file}' has {gt.shape}.")
        scores = {}
        for c in sorted(int(v) for v in np.unique(gt) if v > 0):
            p, g = pred == c, gt == c
            scores[class_names.get(c, str(c))] = float(2 * (p & g).sum() / (p.sum() + g.sum()))
        per_case[Path(gt_file).name.replace(".nii.gz", "")] = scores
    classes = sorted({k for s in per_case.values() for k in s})
    per_class = {c: float(np.mean([s[c] for s in per_case.values() if c in s])) for c in classes}
    return {"per_case": per_case, "per_class": per_class, "mean": float(np.mean(list(per_class.values())))}


def _markdown(table: dict) -> str:
    lines = ["| class | mean Dice |", "|---|---|"]
    lines += [f"| {c} | {d:.3f} |" for c, d in table["per_class"].items()]
    lines.append(f"| **mean (foreground)** | **{table['mean']:.3f}** |")
    return "\n".join(lines) + "\n"


def write_overlays(image_file: Path, gt_file: Path, pred_file: Path, out_dir: Path, num_slices: int = 3,
                   window: tuple[float, float] = (-200.0, 250.0)) -> list[Path]:
    """Save ``num_slices`` axial slices as PNG: CT | ground truth overlay | prediction overlay."""
    from PIL import Image

    img = np.asarray(nib.load(str(image_file)).dataobj, dtype=np.float32)
    gt = np.asarray(nib.load(str(gt_file)).dataobj).astype(np.int64)
    pred = np.asarray(nib.load(str(pred_file)).dataobj).astype(np.int64)
    grey = np.clip((img - window[0]) / (window[1] - window[0]), 0, 1) * 255
    fg = np.nonzero((gt > 0).any(axis=(0, 1)))[0]
    ks = np.linspace(fg.min(), fg.max(), num_slices + 2)[1:-1].round().astype(int) if fg.size else [img.shape[2] // 2]
    written = []
    for k in ks:
        base = np.repeat(grey[:, :, k, None], 3, axis=2)
        panels = [base]
        for lab in (gt[:, :, k], pred[:, :, k]):
            over = base.copy()
            for c in np.unique(lab):
                if c > 0:
                    over[lab == c] = 0.45 * over[lab == c] + 0.55 * np.array(_colour(int(c)))
            panels.append(over)
        # RAS array → radiological view: anterior at the top, patient's right on the viewer's left
        strip = np.concatenate([p.transpose(1, 0, 2)[::-1, ::-1] for p in panels], axis=1).astype(np.uint8)
        path = out_dir / f"{Path(image_file).name.replace('.nii.gz', '')}_slice{k:03d}.png"
        Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3), Image.NEAREST).save(path)
        written.append(path)
    return written


def main(out: str = "demo_output", bundle: str = "ma_sam", num: int = 12, seed: int = 0, max_epochs: int | None = None,
         shape: tuple[int, int, int] = (96, 96, 48), device: str = "cpu", num_threads: int | None = None) -> float:
    """Run the end-to-end demo and return the mean foreground Dice on the held-out phantoms.

    Args:
        out: output folder.
        bundle: bundle under ``bundles/`` (its ``configs/demo.json`` sets tiny SAM and CPU).
        num: phantom volumes (2/3 train, 1/6 validation, 1/6 test).
        seed: data and training seed.
        max_epochs: override the demo config's epochs (shorter runs for tests).
        shape: phantom volume shape.
        device: ``cpu`` or ``cuda``.
        num_threads: torch CPU threads (default: ``OMP_NUM_THREADS`` if set, else the cores the machine's load
            leaves free; see ``shared_nets.threads``).
    """
    from shared_nets.engine import run_bundle_workflow
    from shared_nets.threads import configure_threads
    from tools.demo_data import write_demo_dataset

    t0 = time.time()
    out_dir = Path(out).resolve()
    data_dir, models, preds, overlays = (out_dir / d for d in ("data", "models", "predictions", "overlays"))
    for d in (out_dir, models, preds, overlays):
        d.mkdir(parents=True, exist_ok=True)
    bundle_root = REPO / "bundles" / bundle
    if not (bundle_root / "configs" / "demo.json").is_file():
        raise ValueError(f"bundle '{bundle}' has no configs/demo.json under {bundle_root}.")

    print(f"[1/4] phantom data → {data_dir}")
    write_demo_dataset(data_dir, num=num, seed=seed, shape=tuple(shape))
    # chosen once: the training's own load must not make the inference stage pick fewer threads
    threads = configure_threads(num_threads)
    common = {"dataset_dir": str(data_dir), "ckpt_dir": str(models), "device": f"$torch.device('{device}')", "seed": seed,
              "num_threads": threads}

    print(f"[2/4] training {bundle} (tiny SAM, {device}); TensorBoard logs in {out_dir / 'eval' / 'runs'}")
    train_over = {**common, "output_dir": str(out_dir / "eval")}
    if max_epochs is not None:
        train_over["max_epochs"] = int(max_epochs)
    t_train = time.time()
    run_bundle_workflow(bundle_root, ["train.json", "demo.json"], "train", train_over)
    t_train = time.time() - t_train

    print(f"[3/4] sliding-window inference on the held-out volumes → {preds}")
    t_inf = time.time()
    run_bundle_workflow(bundle_root, ["inference.json", "demo.json"], "infer",
                        {**common, "output_dir": str(preds), "bundle_root": str(bundle_root),
                         "handlers#0#load_path": str(models / "model.pt")})
    t_inf = time.time() - t_inf

    print("[4/4] Dice on the held-out volumes")
    meta = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    names = {int(k): v for k, v in meta["network_data_format"]["outputs"]["pred"]["channel_def"].items()}
    test = json.loads((data_dir / "datalist.json").read_text())["test"]
    pairs = []
    for item in test:
        stem = Path(item["image"]).name.replace(".nii.gz", "")
        pred = preds / f"{stem}_seg.nii.gz"
        if not pred.is_file():
            raise FileNotFoundError(f"inference wrote no prediction '{pred}' for '{item['image']}'.")
        pairs.append((pred, data_dir / item["label"]))
        write_overlays(data_dir / item["image"], data_dir / item["label"], pred, overlays)
    table = dice_table(pairs, names)
    table["seconds"] = {"train": round(t_train, 1), "inference": round(t_inf, 1), "total": round(time.time() - t0, 1)}
    table["torch_threads"] = threads
    md = _markdown(table)
    atomic_write_text(out_dir / "dice.md", md)
    atomic_write_json(table, out_dir / "dice.json")
    print(md)
    print(f"mean foreground Dice {table['mean']:.3f}; train {t_train:.0f} s, inference {t_inf:.0f} s, "
          f"total {time.time() - t0:.0f} s with {threads} torch thread(s). Outputs in {out_dir}")
    return table["mean"]
