"""Evaluation metrics as the papers report them: distances in millimetres, the papers' empty-case
conventions, and a per-class markdown/CSV summary.

MONAI computes Hausdorff distance and normalised surface Dice (NSD) in the units of the ``spacing``
it is given, but its ignite handlers call the metric without one (so distances come out in
voxels). The metric classes here are MONAI's metrics with two additions:

* the spacing of every case is read from the affine of its label (or prediction) ``MetaTensor``
  (after ``Invertd`` that is the original image's voxel size), so HD95 is in mm and the NSD
  tolerance is in mm, even for anisotropic CT;
* ``empty_case`` picks what a class that is absent from the label and/or the prediction scores
  (see :data:`CONVENTIONS` and ``docs/metrics.md``).

Use them through MONAI's ``IgniteMetricHandler`` (``metric_fn``) in a bundle's ``evaluate.json``
and add :class:`MetricsSummary` to the evaluator's handlers for ``metrics.md``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric
from monai.metrics.surface_dice import compute_surface_dice

from shared_nets.io import atomic_write_text

__all__ = [
    "CONVENTIONS",
    "resolve_convention",
    "spacing_from_meta",
    "apply_empty_case",
    "ConventionDiceMetric",
    "HausdorffDistanceMM",
    "SurfaceDiceMM",
    "format_names",
    "foreground_names",
    "summary_notes",
    "summarise",
    "markdown_summary",
    "MetricsSummary",
    "image_meta",
]

#: What a class absent from the label and/or the prediction scores.
#:
#: ``monai``: MONAI's defaults. Dice: label empty → NaN (left out of means), prediction empty and
#: label not → 0. HD (with or without a percentile): either empty → NaN (MONAI's max gives inf).
#: NSD: both empty → NaN, one empty → 0.
#: ``blank_is_one``: both empty → Dice 1, NSD 1, HD 0; exactly one empty → Dice 0, NSD 0, HD NaN
#: (MA-SAM's and S-SAM's official Dice).
#: ``transunet``: the TransUNet/SAMed/H-SAM ``calculate_metric_percase``: both present → the metric;
#: prediction present, label empty → Dice 1, NSD 1, HD 0; prediction empty → Dice 0, NSD 0, HD 0.
CONVENTIONS = ("monai", "blank_is_one", "transunet")


def resolve_convention(name: str, paper: str = "monai") -> str:
    """Map a config value (``"monai"``, ``"paper"`` or a name in :data:`CONVENTIONS`) to a convention.

    Args:
        name: the bundle's ``empty_case_convention`` value.
        paper: the convention of the bundle's paper / official code, used for ``"paper"``.
    """
    if name == "paper":
        name = paper
    if name not in CONVENTIONS:
        raise ValueError(f"empty_case_convention: expected 'paper' or one of {list(CONVENTIONS)}, got {name!r}.")
    return name


def spacing_from_meta(*tensors: Any) -> list[list[float]] | None:
    """Per-case voxel spacing (mm) of a batch-first tensor ``(B, C, *spatial)``, from the first
    argument that is a ``MetaTensor`` with an affine; ``None`` when none has one."""
    for t in tensors:
        if not isinstance(t, MetaTensor) or t.ndim < 3:
            continue
        affine = torch.as_tensor(t.affine).detach().cpu().double()
        rank, batch = t.ndim - 2, t.shape[0]
        affines = [affine] * batch if affine.ndim == 2 else list(affine)
        if len(affines) != batch:
            raise ValueError(f"metric input: {len(affines)} affines for a batch of {batch} cases.")
        return [[float(s) for s in affine_to_spacing(a, r=rank)] for a in affines]
    return None


def _presence(y_pred: torch.Tensor, y: torch.Tensor, include_background: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C')`` booleans: does each (case, class) have foreground in the prediction / the label."""
    start = 0 if include_background else 1
    pred, label = torch.as_tensor(y_pred)[:, start:], torch.as_tensor(y)[:, start:]
    return pred.flatten(2).gt(0).any(-1), label.flatten(2).gt(0).any(-1)


def apply_empty_case(
    values: torch.Tensor, pred_any: torch.Tensor, label_any: torch.Tensor, convention: str, kind: str
) -> torch.Tensor:
    """Overwrite the scores of (case, class) pairs with an empty prediction and/or label.

    Args:
        values: ``(B, C)`` scores from MONAI.
        pred_any / label_any: ``(B, C)`` foreground presence in the prediction / the label.
        convention: one of :data:`CONVENTIONS`.
        kind: ``"overlap"`` (Dice, NSD, IoU: higher is better) or ``"distance"`` (HD: lower is better).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"empty_case: expected one of {list(CONVENTIONS)}, got {convention!r}.")
    if kind not in ("overlap", "distance"):
        raise ValueError(f"kind: expected 'overlap' or 'distance', got {kind!r}.")
    out = values.clone().float()
    pred_any, label_any = pred_any.to(out.device), label_any.to(out.device)
    good, bad = (1.0, 0.0) if kind == "overlap" else (0.0, float("nan"))
    if convention == "monai" and kind == "distance":
        # MONAI's HD with percentile=None is the max of an all-inf distance map when one side is empty
        # (inf, while percentile=95 gives NaN): either empty → NaN, whatever the percentile
        out[~pred_any | ~label_any] = float("nan")
    elif convention == "blank_is_one":
        out[~pred_any & ~label_any] = good
        out[pred_any ^ label_any] = bad
    elif convention == "transunet":
        out[pred_any & ~label_any] = good
        out[~pred_any] = 0.0
    return out


class ConventionDiceMetric(DiceMetric):
    """MONAI's ``DiceMetric`` with a choice of empty-case convention (``empty_case``).

    ``"monai"`` keeps ``DiceMetric`` exactly (label empty → NaN with ``ignore_empty=True``).
    """

    def __init__(self, include_background: bool = False, empty_case: str = "monai", **kwargs: Any) -> None:
        super().__init__(include_background=include_background, **kwargs)
        self.empty_case = resolve_convention(empty_case)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        values = super()._compute_tensor(y_pred, y, **kwargs)
        if self.empty_case == "monai":
            return values
        return apply_empty_case(values, *_presence(y_pred, y, self.include_background), self.empty_case, "overlap")


def _spacing(kwargs: dict[str, Any], y_pred: torch.Tensor, y: torch.Tensor, owner: str) -> Any:
    spacing = kwargs.get("spacing")
    if spacing is None:
        spacing = spacing_from_meta(y, y_pred)
    if spacing is None:
        raise ValueError(
            f"{owner}: no voxel spacing (the label and prediction are plain tensors without an affine); "
            "pass spacing=... or keep MetaTensors (LoadImaged ... Invertd) up to the metric."
        )
    return spacing


class HausdorffDistanceMM(HausdorffDistanceMetric):
    """MONAI's ``HausdorffDistanceMetric`` in millimetres (spacing from each case's affine) with an
    empty-case convention. ``percentile=95`` gives HD95."""

    def __init__(
        self, include_background: bool = False, percentile: float | None = 95, empty_case: str = "monai", **kwargs: Any
    ) -> None:
        super().__init__(include_background=include_background, percentile=percentile, **kwargs)
        self.empty_case = resolve_convention(empty_case)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        kwargs["spacing"] = _spacing(kwargs, y_pred, y, "HausdorffDistanceMM")
        values = super()._compute_tensor(y_pred, y, **kwargs)
        return apply_empty_case(values, *_presence(y_pred, y, self.include_background), self.empty_case, "distance")


class SurfaceDiceMM(SurfaceDiceMetric):
    """MONAI's ``SurfaceDiceMetric`` (normalised surface Dice) with tolerances in millimetres.

    Args:
        tolerance_mm: one tolerance for every class, or one per class (without background unless
            ``include_background``).
        include_background: score channel 0 too.
        empty_case: one of :data:`CONVENTIONS` (or ``"paper"`` resolved by the caller).
        kwargs: other ``SurfaceDiceMetric`` arguments (``use_subvoxels``, ``reduction``...).
    """

    def __init__(
        self,
        tolerance_mm: float | Sequence[float] = 2.0,
        include_background: bool = False,
        empty_case: str = "monai",
        **kwargs: Any,
    ) -> None:
        tol = [float(tolerance_mm)] if isinstance(tolerance_mm, (int, float)) else [float(t) for t in tolerance_mm]
        if not tol or any(not math.isfinite(t) or t < 0 for t in tol):
            raise ValueError(f"nsd_tolerance_mm: expected finite tolerances >= 0 (mm), got {tolerance_mm!r}.")
        super().__init__(class_thresholds=tol, include_background=include_background, **kwargs)
        self.tolerance_mm = tol
        self.empty_case = resolve_convention(empty_case)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        n_class = y_pred.shape[1] - (0 if self.include_background else 1)
        tol = self.tolerance_mm * n_class if len(self.tolerance_mm) == 1 else self.tolerance_mm
        if len(tol) != n_class:
            raise ValueError(
                f"nsd_tolerance_mm: {len(tol)} tolerances for {n_class} classes; give one or one per class."
            )
        values = compute_surface_dice(
            y_pred=y_pred,
            y=y,
            class_thresholds=tol,
            include_background=self.include_background,
            distance_metric=self.distance_metric,
            spacing=_spacing(kwargs, y_pred, y, "SurfaceDiceMM"),
            use_subvoxels=self.use_subvoxels,
            ignore_index=self.ignore_index,
        )
        if self.empty_case == "monai":
            return values
        return apply_empty_case(values, *_presence(y_pred, y, self.include_background), self.empty_case, "overlap")


def mm_label(tolerance_mm: float | Sequence[float]) -> str:
    """``2.0 → "2"``, ``0.5 → "0.5"``, per-class lists → ``"perclass"`` (for metric names)."""
    if isinstance(tolerance_mm, (int, float)):
        return f"{float(tolerance_mm):g}"
    tol = [float(t) for t in tolerance_mm]
    return f"{tol[0]:g}" if len(set(tol)) == 1 else "perclass"


def format_names(metrics: Mapping[str, Any], tolerance_mm: float | Sequence[float] | None = None) -> dict[str, Any]:
    """Put units into metric names: ``{tol}`` in a key becomes the NSD tolerance (``val_nsd_{tol}mm``
    → ``val_nsd_2mm``)."""
    tol = mm_label(tolerance_mm) if tolerance_mm is not None else "?"
    return {str(k).replace("{tol}", tol): v for k, v in metrics.items()}


def foreground_names(channel_def: Mapping[Any, str], num_classes: int | None = None) -> list[str]:
    """Foreground class names by channel (``channel_def`` ids 1..num_classes, as in metadata.json)."""
    ids = sorted(int(k) for k in channel_def if int(k) > 0)
    if num_classes is not None:
        ids = list(range(1, int(num_classes) + 1))
    names = {int(k): str(v) for k, v in channel_def.items()}
    return [names.get(i, f"class_{i}") for i in ids]


_CONVENTION_TEXT = {
    "monai": "MONAI's (a class absent from the label scores NaN and is left out of the means)",
    "blank_is_one": "blank-is-one (absent from label and prediction: Dice/NSD 1, HD 0; absent from one: Dice/NSD 0)",
    "transunet": "TransUNet/SAMed (predicted but absent from the label: Dice/NSD 1, HD 0; not predicted: 0 for all)",
}


def summary_notes(tolerance_mm: float | Sequence[float] | None, empty_case: str) -> list[str]:
    """The lines :class:`MetricsSummary` prints above its table: units, NSD tolerance, convention."""
    tol = (
        "per class " + ", ".join(f"{float(t):g}" for t in tolerance_mm)
        if isinstance(tolerance_mm, Sequence)
        else f"{float(tolerance_mm):g}"
        if tolerance_mm is not None
        else "?"
    )
    return [
        "Cells: mean ± std over cases (number of cases with a finite value); "
        "the last row is the mean of the class means.",
        "Hausdorff distances (*_hd95_mm, *_hd_mm) in millimetres, from each case's voxel spacing.",
        f"NSD: normalised surface Dice at a tolerance of {tol} mm.",
        f"Empty-case convention: {empty_case}, {_CONVENTION_TEXT.get(empty_case, '')}.",
    ]


def _as_matrix(details: Any) -> np.ndarray:
    arr = torch.as_tensor(details).detach().float().cpu().numpy()
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    elif arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    return arr.reshape(arr.shape[0], -1)


def summarise(
    details: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    groups: Sequence[int] | None = None,
    group_names: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Per-class mean, std and case count (finite values only) of per-case metric details.

    Args:
        details: ``{metric name: (cases, classes) values}`` (``engine.state.metric_details``).
        class_names: a name per class column.
        groups: instead of class columns, one class id per row (single-column details, e.g. Med-SA's
            one object per evaluation item); rows are grouped by it.
        group_names: names of the ``groups`` ids.

    Returns:
        ``{"classes": [names], "metrics": {name: {"mean": [...], "std": [...], "n": [...], "overall": float}}}``;
        ``overall`` is the mean of the class means (how the papers average over organs).
    """
    out: dict[str, Any] = {"classes": [], "metrics": {}}
    for name, raw in details.items():
        arr = _as_matrix(raw)
        if groups is not None:
            ids = np.asarray(list(groups)).reshape(-1)
            if len(ids) != arr.shape[0]:
                raise ValueError(f"{name}: {arr.shape[0]} metric rows but {len(ids)} class ids.")
            cols = sorted(set(ids.tolist()))
            columns = [arr[ids == c, -1] for c in cols]
            names = [(group_names or {}).get(c, f"class_{c}") for c in cols]
        else:
            columns = [arr[:, j] for j in range(arr.shape[1])]
            names = (
                list(class_names)
                if class_names is not None and len(class_names) == arr.shape[1]
                else [f"class_{j + 1}" for j in range(arr.shape[1])]
            )
        means, stds, counts = [], [], []
        for col in columns:
            finite = col[np.isfinite(col)]
            counts.append(int(finite.size))
            means.append(float(finite.mean()) if finite.size else float("nan"))
            stds.append(float(finite.std()) if finite.size else float("nan"))
        valid = [m for m in means if math.isfinite(m)]
        out["metrics"][name] = {
            "mean": means,
            "std": stds,
            "n": counts,
            "overall": float(np.mean(valid)) if valid else float("nan"),
        }
        if len(names) > len(out["classes"]):
            out["classes"] = names
    return out


def _fmt(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.4f}"


def markdown_summary(summary: Mapping[str, Any], title: str = "Evaluation", notes: Sequence[str] = ()) -> str:
    """Markdown table of :func:`summarise`'s output: a row per class (mean ± std (n)), then the mean."""
    metrics = summary["metrics"]
    names = list(metrics)
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    lines.append("| class | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for i, cls in enumerate(summary["classes"]):
        cells = []
        for n in names:
            m = metrics[n]
            if i < len(m["mean"]):
                cells.append(f"{_fmt(m['mean'][i])} ± {_fmt(m['std'][i])} ({m['n'][i]})")
            else:
                cells.append("")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    lines.append("| **mean of classes** | " + " | ".join(f"**{_fmt(metrics[n]['overall'])}**" for n in names) + " |")
    return "\n".join(lines) + "\n"


def csv_summary(summary: Mapping[str, Any]) -> str:
    """CSV of :func:`summarise`'s output: ``metric,class,mean,std,n`` rows, then each metric's mean."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "class", "mean", "std", "n"])
    for name, m in summary["metrics"].items():
        for i, cls in enumerate(summary["classes"][: len(m["mean"])]):
            w.writerow([name, cls, f"{m['mean'][i]:.6f}", f"{m['std'][i]:.6f}", m["n"][i]])
        w.writerow([name, "mean_of_classes", f"{m['overall']:.6f}", "", sum(m["n"])])
    return buf.getvalue()


class MetricsSummary:
    """Handler writing ``metrics.md`` (per class mean ± std (cases), and the mean of the class
    means) and ``metrics_per_class.csv`` from ``engine.state.metric_details`` when the run completes.

    Metric handlers must keep details (``IgniteMetricHandler(save_details=True)``, MONAI's default).
    Files are written atomically, on rank 0 only.

    Args:
        output_dir: folder of the two files (``output_dir`` may be switched between runs).
        class_names: names per foreground channel, or ``{class id: name}`` (``channel_def``).
        metric_names: details to summarise (``"*"``: all).
        object_key: with one class per evaluation item (Med-SA), the batch key of its class id.
        notes: lines printed above the table (units, tolerance, convention).
        title: heading of ``metrics.md``.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str] | Mapping[Any, str] | None = None,
        metric_names: str | Sequence[str] = "*",
        object_key: str | None = None,
        notes: Sequence[str] = (),
        title: str = "Evaluation",
    ) -> None:
        self.output_dir = output_dir
        if isinstance(class_names, Mapping):
            self.id_names = {int(k): str(v) for k, v in class_names.items()}
            self.class_names = [v for k, v in sorted(self.id_names.items()) if k > 0]
        else:
            self.class_names = [str(c) for c in class_names] if class_names is not None else None
            self.id_names = {i + 1: n for i, n in enumerate(self.class_names or [])}
        self.metric_names = [metric_names] if isinstance(metric_names, str) else list(metric_names)
        self.object_key, self.notes, self.title = object_key, list(notes), title
        self.objects: list[int] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.objects.clear())
        if self.object_key is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._record_objects)
        engine.add_event_handler(Events.COMPLETED, self)

    def _record_objects(self, engine: Any) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            if not isinstance(item, Mapping) or self.object_key not in item:
                raise ValueError(f"MetricsSummary: the batch has no '{self.object_key}' (one class id per item).")
            self.objects.extend(int(v) for v in torch.as_tensor(item[self.object_key]).reshape(-1).tolist())

    def __call__(self, engine: Any) -> None:
        import ignite.distributed as idist

        objects = self.objects
        if self.object_key is not None and idist.get_world_size() > 1:  # every rank takes part in the gather
            from monai.utils import evenly_divisible_all_gather  # same rank order as MONAI's metric buffers

            objects = [int(v) for v in evenly_divisible_all_gather(torch.as_tensor(objects), concat=True).tolist()]
        if idist.get_rank() != 0:
            return
        self.write(dict(getattr(engine.state, "metric_details", {}) or {}), objects)

    def write(self, details: Mapping[str, Any], objects: Sequence[int] = ()) -> None:
        """Write ``metrics.md`` and ``metrics_per_class.csv`` from ``{metric name: (cases, classes)}`` details
        (and, with ``object_key``, each row's class id); the end of a run calls it, as does a sharded
        evaluation's merge."""
        details = dict(details)
        if "*" not in self.metric_names:
            details = {k: details[k] for k in self.metric_names if k in details}
        if not details:
            return
        objects = list(objects)
        summary = summarise(
            details,
            self.class_names,
            groups=objects if self.object_key is not None else None,
            group_names=self.id_names,
        )
        atomic_write_text(
            os.path.join(self.output_dir, "metrics.md"), markdown_summary(summary, self.title, self.notes)
        )
        atomic_write_text(os.path.join(self.output_dir, "metrics_per_class.csv"), csv_summary(summary))


def image_meta(batch: Sequence[Mapping[str, Any]], image_key: str = "image") -> list[dict]:
    """The per-case metadata of a decollated batch: each item's image ``.meta`` (file name, affine...).

    This is the ``batch_transform`` of the evaluation's ``MetricsSaver``: it names the rows of the
    per-case metric tables after the images.
    """
    return [item[image_key].meta for item in batch]
