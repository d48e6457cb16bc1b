"""Med-SA interaction: iterative click simulation in training, refinement curve and prompt-setting evaluation.

Paper section "Training Strategy": prompts are initialised by random sampling, then "a few
clicks" are added by iterative sampling, each placed in the erroneous region of the
prediction made with the previous clicks. :class:`MedSAClickInteraction` does this as an
``iteration_update`` of MONAI's ``SupervisedTrainer`` (the DeepGrow/DeepEdit ``Interaction``
pattern, written for guidance channels). :class:`InteractiveRefinementCurve` reuses the same
corrective click to report Dice after each of up to N clicks (cached image embeddings make
each extra click cost only the prompt encoder and decoder), :class:`PerObjectMetrics` groups
per-item metrics by class and :class:`PromptSettingsRunner` runs one evaluator per paper
prompt setting.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, list_data_collate
from monai.utils import min_version, optional_import
from scipy import ndimage

from shared_nets.engine import run_default_iteration
from shared_nets.io import atomic_path, atomic_write_text

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

__all__ = [
    "corrective_click",
    "add_corrective_clicks",
    "MedSAClickInteraction",
    "InteractiveRefinementCurve",
    "PerObjectMetrics",
    "PromptSettingsRunner",
]

logger = logging.getLogger(__name__)


def _np_bool(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x) > 0


def corrective_click(pred: Any, target: Any) -> tuple[bool, tuple[int, int, int]] | None:
    """The next simulated user click: in the largest error region, at its most interior voxel.

    The largest connected component of false negatives or false positives (6-connectivity)
    is chosen; the click goes to its voxel farthest from the component's border within its
    slice (ties broken towards the 3D interior), as iterative-training click simulators do;
    positive for a missed region, negative for a false one.

    Args:
        pred: predicted mask ``[H, W, D]`` (nonzero = object).
        target: ground truth ``[H, W, D]``.

    Returns:
        ``(positive, (i, j, k))`` or None when the prediction is perfect.
    """
    p, t = _np_bool(pred), _np_bool(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}.")
    best: tuple[int, bool, np.ndarray] | None = None
    for positive, err in ((True, t & ~p), (False, p & ~t)):
        lab, n = ndimage.label(err)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())[1:]
        c = int(sizes.argmax())
        if best is None or sizes[c] > best[0]:
            best = (int(sizes[c]), positive, lab == c + 1)
    if best is None:
        return None
    comp = np.pad(best[2], 1)
    in_plane = ndimage.distance_transform_edt(
        comp, sampling=(1.0, 1.0, 1e6)
    )  # per-slice distance (a user clicks a slice)
    dist = (in_plane + 1e-3 * ndimage.distance_transform_edt(comp))[1:-1, 1:-1, 1:-1]  # ties -> the 3D centre
    idx = np.unravel_index(int(dist.argmax()), best[2].shape)
    return best[1], (int(idx[0]), int(idx[1]), int(idx[2]))


def add_corrective_clicks(
    inputs: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    in_channels: int,
    max_points: int,
    per_slice: bool = True,
) -> list[tuple[bool, tuple[int, int, int]] | None]:
    """Add one :func:`corrective_click` per item to its guidance channels, in place.

    A click is skipped (None) when the prediction is perfect or when its slice (``per_slice``)
    or item already holds ``max_points`` clicks, so the network's limit is never exceeded.

    Args:
        inputs: ``[B, C + 3, H, W, D]`` image then positive / negative / box channels.
        pred: ``[B, H, W, D]`` predicted masks; target: ``[B, H, W, D]`` (or ``[B, 1, H, W, D]``).
        in_channels: ``C``.
        max_points: click slots per slice (or item).
        per_slice: count clicks per axial slice.

    Returns:
        The click added per item (or None).
    """
    if target.ndim == inputs.ndim:
        target = target[:, 0]
    if pred.ndim == inputs.ndim:
        pred = pred[:, 0]
    added: list[tuple[bool, tuple[int, int, int]] | None] = []
    for b in range(inputs.shape[0]):
        click = corrective_click(pred[b], target[b])
        if click is not None:
            positive, (i, j, k) = click
            clicks = inputs[b, in_channels : in_channels + 2]
            used = int((clicks[..., k] if per_slice else clicks).ne(0).sum())
            if used >= max_points:
                click = None
            else:
                inputs[b, in_channels + (0 if positive else 1), i, j, k] = 1
        added.append(click)
    return added


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return getattr(net, "module", net)


class MedSAClickInteraction:
    """``iteration_update`` for ``SupervisedTrainer``: random then iterative click sampling (sec. "Training Strategy").

    Before each training step, with the model in eval mode and without gradients, a random
    number of rounds in ``[0, max_clicks]`` each predicts the batch and adds one corrective
    click per item (:func:`add_corrective_clicks`) to ``batchdata[image_key]``; then the
    trainer's normal iteration runs on the updated input.

    Args:
        max_clicks: most iterative clicks per training step.
        in_channels: image channels before the guidance channels.
        image_key: batch key of the network input.
        label_key: batch key of the binary label.
        seed: seed of the round-count generator.
    """

    def __init__(
        self,
        max_clicks: int = 3,
        in_channels: int = 1,
        image_key: str = "image",
        label_key: str = "label",
        seed: int = 0,
    ):
        if isinstance(max_clicks, bool) or not isinstance(max_clicks, int) or max_clicks < 0:
            raise ValueError(f"max_clicks must be an integer >= 0, got {max_clicks!r}.")
        self.max_clicks, self.in_channels = max_clicks, in_channels
        self.image_key, self.label_key = image_key, label_key
        self.rng = np.random.default_rng(seed)
        self.clicks_added = 0

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> Any:
        rounds = int(self.rng.integers(0, self.max_clicks + 1))
        if rounds:
            net = engine.network
            core = _unwrap(net)
            was_training = net.training
            net.eval()
            with torch.no_grad():
                for _ in range(rounds):
                    inputs, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
                    pred = engine.inferer(inputs, net).argmax(1)
                    added = add_corrective_clicks(
                        batchdata[self.image_key],
                        pred.cpu(),
                        torch.as_tensor(batchdata[self.label_key]).cpu(),
                        self.in_channels,
                        core.max_points,
                        core.prompt_scope == "slice",
                    )
                    self.clicks_added += sum(c is not None for c in added)
            net.train(was_training)
        return run_default_iteration(engine, batchdata)


def _batch(engine: Any) -> Any:
    """The current batch as one collated dict (MONAI engines decollate it after the model step)."""
    batch = engine.state.batch
    if isinstance(batch, list) and batch and isinstance(batch[0], dict):
        keys = set.intersection(*(set(b) for b in batch))
        batch = list_data_collate([{k: b[k] for k in keys} for b in batch])
    return batch


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    denom = pred.sum() + target.sum()
    return float(2.0 * (pred & target).sum() / denom) if denom else 1.0


class InteractiveRefinementCurve:
    """Dice after each of up to ``num_clicks`` simulated corrective clicks (the interactive-tool curve).

    Attached to an evaluator: for every batch the network re-runs through the evaluator's
    inferer with one more :func:`corrective_click` per item, up to ``num_clicks``; Dice (object
    channel vs the binary label, at the network's grid) is recorded after 0, 1, ... clicks.
    With ``build_med_sa(embedding_cache > 0)`` each re-run reuses the cached image embeddings. At the
    end of the run ``engine.state.metrics["refine_dice_<n>"]`` hold the means and
    ``<output_dir>/refinement_curve.csv`` the per-item values.

    Args:
        num_clicks: corrective clicks N.
        in_channels: image channels before the guidance channels.
        output_dir: where to write the CSV (None: do not write).
        image_key, label_key: batch keys.
    """

    def __init__(
        self,
        num_clicks: int = 5,
        in_channels: int = 1,
        output_dir: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ):
        if isinstance(num_clicks, bool) or not isinstance(num_clicks, int) or num_clicks < 0:
            raise ValueError(f"num_clicks must be an integer >= 0, got {num_clicks!r}.")
        self.num_clicks, self.in_channels, self.output_dir = num_clicks, in_channels, output_dir
        self.image_key, self.label_key = image_key, label_key
        self.rows: list[list[float]] = []
        self.names: list[str] = []

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Any = None) -> None:
        self.rows, self.names = [], []

    def iteration_completed(self, engine: Any) -> None:
        names, curves = self._curves(engine)
        self.names.extend(names)
        self.rows.extend(curves)

    def case_record(self, engine: Any) -> dict[str, list]:
        """The current batch's item names and curves, for a sharded run's manifest
        (:class:`shared_nets.distributed.CaseRunner` ``case_extras``); nothing is accumulated."""
        names, curves = self._curves(engine)
        return {"names": names, "rows": curves}

    def write_merged(self, records: Sequence[dict[str, list]]) -> list[float]:
        """Write ``refinement_curve.csv`` from :meth:`case_record` values (all cases, datalist order), as
        :meth:`epoch_completed` does after a single-process run; returns the mean curve."""
        self.reset()
        for rec in records:
            self.names.extend(str(n) for n in rec["names"])
            self.rows.extend([float(v) for v in row] for row in rec["rows"])
        self._write_csv()
        return self.curve()

    def _curves(self, engine: Any) -> tuple[list[str], list[list[float]]]:
        batch = _batch(engine)
        net = engine.network
        core = _unwrap(net)
        inputs, target = engine.prepare_batch(batch, engine.state.device, engine.non_blocking)
        inputs = (inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs).clone()
        target = _np_bool(target[:, 0] if target.ndim == inputs.ndim else target)
        curves: list[list[float]] = [[] for _ in range(inputs.shape[0])]
        with torch.no_grad():
            for n in range(self.num_clicks + 1):
                pred = engine.inferer(inputs, net).argmax(1)
                pred_np = pred.cpu().numpy() > 0
                for b in range(inputs.shape[0]):
                    curves[b].append(_dice(pred_np[b], target[b]))
                if n < self.num_clicks:
                    add_corrective_clicks(
                        inputs,
                        pred,
                        torch.as_tensor(target),
                        self.in_channels,
                        core.max_points,
                        core.prompt_scope == "slice",
                    )
        names = batch.get(f"{self.image_key}_meta_dict", {}).get("filename_or_obj") if isinstance(batch, dict) else None
        img = batch.get(self.image_key) if isinstance(batch, dict) else None
        if names is None and isinstance(img, MetaTensor):
            names = img.meta.get("filename_or_obj")
        objects = batch.get("object_id") if isinstance(batch, dict) else None
        out_names = []
        for b in range(len(curves)):
            name = str(names[b]) if isinstance(names, (list, tuple)) and b < len(names) else str(len(self.rows) + b)
            if objects is not None:
                name += f"#{int(torch.as_tensor(objects).reshape(-1)[b])}"
            out_names.append(name)
        return out_names, curves

    def curve(self) -> list[float]:
        """Mean Dice after 0, 1, ..., N clicks over the items seen so far."""
        return np.asarray(self.rows, dtype=np.float64).mean(axis=0).tolist() if self.rows else []

    def epoch_completed(self, engine: Any) -> None:
        mean = self.curve()
        for n, value in enumerate(mean):
            engine.state.metrics[f"refine_dice_{n}"] = value
        logger.info(
            "interactive refinement: mean Dice after 0..%d clicks: %s",
            self.num_clicks,
            ", ".join(f"{v:.4f}" for v in mean),
        )
        self._write_csv()

    def _write_csv(self) -> None:
        mean = self.curve()
        if self.output_dir and self.rows:
            os.makedirs(self.output_dir, exist_ok=True)
            path = os.path.join(self.output_dir, "refinement_curve.csv")
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["item"] + [f"dice_after_{n}_clicks" for n in range(self.num_clicks + 1)])
                for name, row in zip(self.names, self.rows):
                    w.writerow([name] + [f"{v:.6f}" for v in row])
                w.writerow(["mean"] + [f"{v:.6f}" for v in mean])


class PerObjectMetrics:
    """Per-class means of per-item metrics (each evaluation item is one (volume, class) pair).

    Records ``batch[object_key]`` every iteration and, when the run completes (after the
    metric handlers, which need ``save_details=True``), writes
    ``engine.state.metrics["<metric>_<class name>"]`` from ``engine.state.metric_details``.

    Args:
        metric_names: names of the attached metric handlers (e.g. ``["val_mean_dice", "val_iou", "val_hd95"]``).
        class_names: ``{class id: name}`` (keys may be strings, as in JSON).
        object_key: batch key of the class id.
    """

    def __init__(self, metric_names: Sequence[str], class_names: dict[Any, str], object_key: str = "object_id"):
        self.metric_names = list(metric_names)
        self.class_names = {int(k): str(v) for k, v in class_names.items()}
        self.object_key = object_key
        self.objects: list[int] = []

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.objects.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine: Any) -> None:
        batch = _batch(engine)
        if not isinstance(batch, dict) or self.object_key not in batch:
            raise ValueError(f"PerObjectMetrics: the batch has no '{self.object_key}' (one class id per item).")
        self.objects.extend(int(v) for v in torch.as_tensor(batch[self.object_key]).reshape(-1).tolist())

    def epoch_completed(self, engine: Any) -> None:
        engine.state.metrics.update(self.means(getattr(engine.state, "metric_details", {}) or {}, self.objects))

    def means(self, details: dict[str, Any], objects: Sequence[int]) -> dict[str, float]:
        """``{"<metric>_<class name>": mean}`` from per-item metric rows and the items' class ids (a sharded
        evaluation calls this with the merged rows)."""
        ids = np.asarray([int(o) for o in objects])
        out: dict[str, float] = {}
        for name in self.metric_names:
            if name not in details:
                continue
            vals = torch.as_tensor(details[name]).float().reshape(len(ids), -1)[:, -1].cpu().numpy()
            for cid in sorted(set(ids.tolist())):
                v = vals[ids == cid]
                v = v[np.isfinite(v)]
                label = self.class_names.get(cid, str(cid)).replace(" ", "_")
                out[f"{name}_{label}"] = float(v.mean()) if v.size else float("nan")
        return out


class PromptSettingsRunner:
    """Run an evaluator once per paper prompt setting and write one summary (Table 1/2 layout).

    For each setting the prompt transform's ``setting`` is switched, every object in
    ``per_setting_outputs`` (e.g. a ``MetricsSaver``, an :class:`InteractiveRefinementCurve`)
    gets its ``save_dir`` / ``output_dir`` pointed at ``<output_dir>/<setting>``, the evaluator
    runs, and its numeric ``engine.state.metrics`` are collected. ``<output_dir>`` then holds
    ``prompt_settings_summary.csv`` and ``prompt_settings.md`` (rows = metrics, columns =
    settings) and ``prompt_settings.json``, each written atomically.

    Sharded (``configs/multi_gpu_evaluate.json`` under ``torchrun``): with ``cases`` (a
    :class:`shared_nets.distributed.CaseRunner` in evaluation mode) each setting is its own sharded run:
    the cases not yet done in ``<output_dir>/<setting>`` (its ``manifest.jsonl``) are split over the ranks
    and set as the evaluator's dataset ``data``; rank 0 writes the setting's reports from the merged
    per-case records and takes that setting's summary row from them (reduced metrics, ``per_object``'s
    per-class means and the refinement curve in ``cases``' ``case_extras["refinement"]``), so every file
    equals a single-process run's when the prompts are seeded per case (``CaseSeededDataset``).

    Args:
        evaluator: a MONAI evaluator.
        prompt_transform: the :class:`~shared_nets.med_sa.transforms.SimulatePromptSettingd` in its pre-processing.
        settings: setting names to run.
        output_dir: summary folder.
        per_setting_outputs: objects whose output folder follows the setting.
        cases: sharded runs only: the ``CaseRunner``.
        datalist: sharded runs only: all evaluation items (the shards are taken from it per setting).
        per_object: sharded runs only: the :class:`PerObjectMetrics` of the single-process config.
    """

    def __init__(
        self,
        evaluator: Any,
        prompt_transform: Any,
        settings: Sequence[str],
        output_dir: str,
        per_setting_outputs: Sequence[Any] = (),
        cases: Any = None,
        datalist: Sequence[dict] | None = None,
        per_object: PerObjectMetrics | None = None,
    ):
        if isinstance(settings, str) or not settings:
            raise ValueError(
                f"settings must be a non-empty list of prompt settings, e.g. ['1-point', 'bbox0.75'], got {settings!r}."
            )
        self.evaluator, self.prompt_transform = evaluator, prompt_transform
        self.settings, self.output_dir, self.per_setting_outputs = list(settings), output_dir, list(per_setting_outputs)
        for s in self.settings:
            prompt_transform.setting = s  # validates the names before anything runs
        if cases is not None and datalist is None:
            raise ValueError("PromptSettingsRunner: a sharded run (cases) needs the datalist to shard.")
        self.cases, self.datalist, self.per_object = cases, datalist, per_object
        self.results: dict[str, dict[str, float]] = {}

    def run(self) -> dict[str, dict[str, float]]:
        if self.cases is not None:
            return self._run_sharded()
        for s in self.settings:
            self.prompt_transform.setting = s
            for obj in self.per_setting_outputs:
                for attr in ("save_dir", "output_dir"):
                    if hasattr(obj, attr):
                        setattr(obj, attr, os.path.join(self.output_dir, s))
            # a run keeps the previous run's state.metrics: without this the setting's metrics.csv (written before
            # the per-class means and the refinement curve are computed) listed the previous setting's values
            self.evaluator.state.metrics = {}
            self.evaluator.run()
            self.results[s] = {
                k: float(v) for k, v in self.evaluator.state.metrics.items() if isinstance(v, (int, float))
            }
            logger.info("prompt setting %s: %s", s, self.results[s])
        self._write()
        return self.results

    def _run_sharded(self) -> dict[str, dict[str, float]]:
        from shared_nets.distributed import rank_and_world

        for s in self.settings:
            self.prompt_transform.setting = s
            folder = os.path.join(self.output_dir, s)
            for obj in self.per_setting_outputs:
                for attr in ("save_dir", "output_dir"):
                    if hasattr(obj, attr):
                        setattr(obj, attr, folder)
            self.cases.output_dir = folder
            dataset = self.evaluator.data_loader.dataset
            dataset.data = self.cases.shard(self.datalist)
            self.evaluator.state.epoch_length = len(self.evaluator.data_loader)
            self.cases.run(self.evaluator)
            self.cases.finish()
            if rank_and_world()[0] == 0 and self.cases.reports:
                rep = self.cases.reports
                result = {k: float(v) for k, v in rep["values"].items() if isinstance(v, (int, float))}
                if self.per_object is not None:
                    result.update(self.per_object.means(rep["details"], rep["objects"]))
                for n, value in enumerate(rep["extras"].get("refinement") or []):
                    result[f"refine_dice_{n}"] = float(value)
                self.results[s] = result
                logger.info("prompt setting %s: %s", s, result)
        if rank_and_world()[0] == 0:
            self._write()
        return self.results

    def _atomic(self, name: str, text: str) -> None:
        atomic_write_text(os.path.join(self.output_dir, name), text)

    def _write(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self._atomic("prompt_settings.json", json.dumps(self.results, indent=2) + "\n")
        names = sorted({k for r in self.results.values() for k in r})
        table = [[n] + [self.results[s].get(n, float("nan")) for s in self.settings] for n in names]
        rows = ["metric," + ",".join(self.settings)] + [
            row[0] + "," + ",".join(f"{v:.6f}" for v in row[1:]) for row in table
        ]
        self._atomic("prompt_settings_summary.csv", "\n".join(rows) + "\n")
        md = ["| metric | " + " | ".join(self.settings) + " |", "|---|" + "---:|" * len(self.settings)]
        md += [f"| {row[0]} | " + " | ".join(f"{v:.4f}" for v in row[1:]) + " |" for row in table]
        self._atomic("prompt_settings.md", "\n".join(md) + "\n")
