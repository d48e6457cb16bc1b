"""Sharded, resumable batch inference and evaluation under ``torchrun`` (one node or many).

The bundles' ``configs/multi_gpu_inference.json`` and ``configs/multi_gpu_evaluate.json`` overlay the
single-process configs with the pieces here:

* :func:`init_distributed` / :func:`local_device`: one process per GPU; the device comes from
  ``LOCAL_RANK`` (the GPU on this node), the shard from the global rank, so nothing assumes one node.
* :class:`CaseRunner`: decides which datalist cases still need work (a case is *done* when its output
  exists and is whole, or, for evaluation, when its per-case metrics are recorded), splits the rest
  over the ranks with MONAI's ``partition_dataset(..., even_divisible=False)`` (no padded duplicates:
  every case is run exactly once), records every case in a manifest and, at the end, merges the
  manifest and (evaluation) writes the same metric reports as a single-process run.
* :class:`CaseTracker`: the evaluator's ``iteration_update``: times each case, reports and skips a bad
  volume (as :class:`shared_nets.engine.SkipBadInputs` does) and appends one manifest line per case.

Manifest: ``<output_dir>/manifest.jsonl``, one JSON object per line with ``case``, ``rank``,
``status`` (``done``, ``skipped``: a bad input with its one-line reason in ``error``; ``failed``: the
run stopped at this case), ``seconds`` and ``error`` (plus ``output``/``sha256`` of a prediction, or
``metrics`` of an evaluated case). While a job runs each rank appends to its own
``manifest.rank<N>.jsonl`` (one ``write`` per line, flushed); rank 0 merges them into
``manifest.jsonl`` when all ranks are finished. The reader skips a line cut short by a kill, so a
killed job can always be rerun; a rerun reads the merged and the per-rank files.

Why not MONAI's own multi-rank evaluation: ``MetricsSaver`` and the metric buffers all-gather in
rank-major order (rows come out in another order than the datalist), and a rank without a case
never joins the gather (the others wait forever; ignite also refuses an empty loader), which a
resumed run with few cases left hits. Here every rank computes its cases' metrics locally and rank 0
rebuilds the reports from the records in datalist order, so they equal a single-process run's.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "rank_and_world",
    "fsdp_units",
    "local_device",
    "init_distributed",
    "finalize_distributed",
    "case_name",
    "read_manifest",
    "ManifestWriter",
    "NiftiOutputCheck",
    "CaseRunner",
    "CaseTracker",
    "wrap_for_training",
    "FullyShardedModel",
    "FullOptimizerState",
    "optimizer_state",
    "attach_state_gathering",
    "init_process_group",
    "quiet_other_ranks",
    "shutdown",
    "main_process_handlers",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"


# -- process group ---------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available (``LOCAL_RANK`` is set by ``torchrun`` per node), else CPU.

    The global rank is not a GPU index on the second node of a multi-node job; ``LOCAL_RANK`` is.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    text = os.environ.get("LOCAL_RANK", "0")
    try:
        local = int(text)
    except ValueError:
        raise ValueError(f"LOCAL_RANK must be an integer GPU index, got {text!r}.") from None
    if not 0 <= local < torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local} has no GPU on this node ({torch.cuda.device_count()} visible); start "
            "torchrun with --nproc_per_node at most the number of GPUs."
        )
    return torch.device(f"cuda:{local}")


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (``nccl`` on GPUs, else ``gloo``) and select this
    rank's GPU; does nothing when the group exists. Without ``torchrun`` (no ``WORLD_SIZE``) it runs as a
    single process. Returns (global rank, world size)."""
    import torch.distributed as dist

    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    return rank_and_world()


def finalize_distributed() -> None:
    """Wait for every rank, then leave the process group (no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group)."""
    import torch.distributed as dist

    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


# -- case names and the manifest -------------------------------------------------------------------
_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".npy", ".npz", ".png", ".jpg", ".h5")


def case_name(item: Mapping[str, Any], image_key: str = "image", extra_keys: Sequence[str] = ()) -> str:
    """A case's name: its image file name without the extension (as the predictions are named), followed by
    ``_<key>-<value>`` for each of ``extra_keys`` (e.g. ``object_id`` when a volume gives several items).

    Raises:
        ValueError: the item has no ``image_key``.
    """
    if image_key not in item:
        raise ValueError(f"datalist entry has no '{image_key}' (keys: {sorted(item)}); cannot name the case.")
    image = item[image_key]
    path = os.fspath(image[0] if isinstance(image, (list, tuple)) and image else image)
    base = os.path.basename(os.path.normpath(path))
    for ext in _EXTENSIONS:
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    return base + "".join(f"_{k}-{item[k]}" for k in extra_keys)


def _parse_lines(path: str) -> list[dict]:
    """The records of one manifest file; a line that is not a whole JSON object (cut by a kill) is skipped."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return records
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("manifest '%s' line %d is incomplete (a killed run?); ignored.", path, n)
            continue
        if isinstance(rec, dict) and "case" in rec and "status" in rec:
            records.append(rec)
    return records


def read_manifest(output_dir: str | os.PathLike) -> list[dict]:
    """Every record in ``output_dir``'s merged manifest and the per-rank files a killed job left, oldest first
    (by their ``time``); incomplete lines are skipped."""
    folder = os.fspath(output_dir)
    records = _parse_lines(os.path.join(folder, MANIFEST))
    for path in sorted(glob.glob(os.path.join(folder, "manifest.rank*.jsonl"))):
        records.extend(_parse_lines(path))
    return sorted(records, key=lambda r: float(r.get("time", 0.0)))


def _latest(records: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for rec in records:  # oldest first: the last one wins
        out[str(rec["case"])] = dict(rec)
    return out


class ManifestWriter:
    """Appends manifest records to ``<output_dir>/manifest.rank<rank>.jsonl``, one ``os.write`` per line
    (flushed to disk), so a kill leaves at most one incomplete last line, which :func:`read_manifest` skips;
    a line left without its newline is closed before the next record is appended.

    Args:
        output_dir: the run's output folder.
        rank: global rank (names the file).
    """

    def __init__(self, output_dir: str | os.PathLike, rank: int) -> None:
        self.path = os.path.join(os.fspath(output_dir), f"manifest.rank{int(rank)}.jsonl")
        self.rank = int(rank)

    def append(self, record: Mapping[str, Any]) -> dict:
        rec = {
            "case": None,
            "rank": self.rank,
            "status": None,
            "seconds": None,
            "error": None,
            **record,
            "time": time.time(),
        }
        line = (json.dumps(rec, allow_nan=True) + "\n").encode("utf-8")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":  # a kill cut the last line: end it so this record stays whole
                        line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return rec


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- output checks ---------------------------------------------------------------------------------
class NiftiOutputCheck:
    """Where a case's prediction goes and whether it is whole, for inference configs that write with
    ``SaveImaged``: the file name comes from the ``SaveImaged`` in ``postprocessing`` (its MONAI
    ``FolderLayout`` and name formatter, so it is the file the transform writes).

    A prediction counts as whole when its recorded SHA-256 matches, or (no record: the job was killed
    between writing it and recording it) when the whole file decompresses; in both cases its shape and
    affine must equal the input image's (NIfTI inputs; read from the headers).

    Args:
        postprocessing: the inference ``Compose`` holding one ``SaveImaged``.
        image_key: datalist key of the input image.
        affine_atol: tolerance of the affine comparison.
    """

    def __init__(self, postprocessing: Any, image_key: str = "image", affine_atol: float = 1e-4) -> None:
        from monai.transforms import SaveImaged

        savers = [t for t in getattr(postprocessing, "transforms", [postprocessing]) if isinstance(t, SaveImaged)]
        if len(savers) != 1:
            raise ValueError(f"NiftiOutputCheck: expected one SaveImaged in the postprocessing, found {len(savers)}.")
        self.saver = savers[0].saver
        self.image_key = image_key
        self.affine_atol = affine_atol

    def output_path(self, item: Mapping[str, Any]) -> str:
        """The file ``SaveImaged`` writes for this datalist entry."""
        from monai.utils import ImageMetaKey

        image = item[self.image_key]
        image = image[0] if isinstance(image, (list, tuple)) else image
        kw = self.saver.fname_formatter({ImageMetaKey.FILENAME_OR_OBJ: os.fspath(image)}, self.saver)
        return os.fspath(self.saver.folder_layout.filename(**kw))

    def problem(self, item: Mapping[str, Any], record: Mapping[str, Any] | None) -> str | None:
        """None when the prediction of ``item`` is whole, else why not (one line)."""
        import nibabel as nib

        path = self.output_path(item)
        if not os.path.isfile(path):
            return f"no output '{path}'"
        try:
            if record is not None and record.get("sha256") and record.get("output") == path:
                if _sha256(path) != record["sha256"]:
                    return f"'{path}' differs from its recorded checksum"
                out = nib.load(path)
            else:
                out = nib.load(path)
                np.asarray(out.dataobj)  # decompress all of it: a cut file fails here
        except Exception as e:  # nibabel/zlib raise many types on damaged files
            return f"'{path}' is not a readable NIfTI file ({type(e).__name__}: {e})"
        image = item[self.image_key]
        image = os.fspath(image[0] if isinstance(image, (list, tuple)) else image)
        if image.endswith((".nii", ".nii.gz")) and os.path.isfile(image):
            src = nib.load(image)
            if tuple(out.shape[:3]) != tuple(src.shape[:3]):
                return f"'{path}' has shape {out.shape}, the input '{image}' {src.shape}"
            if not np.allclose(out.affine, src.affine, atol=self.affine_atol):
                return f"'{path}' has another affine than its input '{image}'"
        return None

    def record(self, item: Mapping[str, Any]) -> dict:
        """Manifest fields of a just-written prediction (its path and SHA-256)."""
        path = self.output_path(item)
        return {"output": path, "sha256": _sha256(path) if os.path.isfile(path) else None}


# -- the runner ------------------------------------------------------------------------------------
def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)  # NaN/Inf as strings: strict JSON readers accept the line


def _from_json_float(v: Any) -> float:
    return float(v)


class CaseRunner:
    """Shards a datalist over the ranks, skips finished cases, records every case and merges the results.

    Config use (``multi_gpu_inference.json``; see the bundles)::

        "cases": {"_target_": "shared_nets.distributed.CaseRunner", "output_dir": "@output_dir",
                  "output_check": {"_target_": "shared_nets.distributed.NiftiOutputCheck",
                                   "postprocessing": "@postprocessing"}},
        "dataset#data": "$@cases.shard(@datalist)",
        "evaluator#iteration_update": "$@cases.tracker()",
        "finalize": ["$@cases.finish()", "$shared_nets.distributed.finalize_distributed()"]

    For evaluation give ``metrics`` (``{name: IgniteMetricHandler}``, the evaluator gets none) and the
    single-process report writers ``metrics_saver`` (``AtomicMetricsSaver``) and ``metrics_summary``
    (``MetricsSummary``): each case's metric rows go into its manifest line and rank 0 writes the reports
    from all records in datalist order.

    Args:
        output_dir: folder of the outputs and the manifest.
        output_check: for inference, decides whether a case's output is whole (:class:`NiftiOutputCheck`).
        metrics: for evaluation, the metric handlers whose ``metric_fn`` scores each case.
        metrics_saver: ``shared_nets.io.AtomicMetricsSaver`` writing ``metrics.csv`` and ``*_raw.csv``.
        metrics_summary: ``shared_nets.metrics.MetricsSummary`` writing ``metrics.md``.
        image_key: datalist key of the input image (names the case).
        case_keys: extra datalist keys that tell items of one volume apart (e.g. ``["object_id"]``).
        retry_skipped: run again cases a previous run skipped as bad input (the file may have been fixed).
        case_extras: for evaluation, ``{name: obj}`` of per-case results beyond the metrics that the single-process
            run collects with its own handlers (e.g. Med-SA's refinement curve): ``obj.case_record(engine)`` is
            called after each case's iteration and its JSON value goes into the case's manifest line under
            ``extras``; at the end rank 0 calls ``obj.write_merged(values)`` with all cases' values in datalist
            order (it writes that handler's report, as the handler would have at the end of a single run).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        output_check: NiftiOutputCheck | None = None,
        metrics: Mapping[str, Any] | None = None,
        metrics_saver: Any = None,
        metrics_summary: Any = None,
        image_key: str = "image",
        case_keys: Sequence[str] = (),
        retry_skipped: bool = True,
        case_extras: Mapping[str, Any] | None = None,
    ) -> None:
        if (output_check is None) == (metrics is None):
            raise ValueError("CaseRunner: give output_check (inference) or metrics (evaluation), exactly one.")
        self.output_dir = os.fspath(output_dir)
        self.output_check = output_check
        self.metrics = dict(metrics) if metrics is not None else None
        self.metrics_saver, self.metrics_summary = metrics_saver, metrics_summary
        self.image_key, self.case_keys, self.retry_skipped = image_key, list(case_keys), retry_skipped
        self.case_extras = dict(case_extras or {})
        if self.case_extras and self.metrics is None:
            raise ValueError("CaseRunner: case_extras are per-case evaluation results; give metrics too.")
        self.reports: dict[str, Any] = {}  # rank 0, after finish(): the reduced metrics and per-case details
        self.items: list[dict] = []
        self.names: list[str] = []
        self.shard_items: list[dict] = []
        self.shard_names: list[str] = []
        self._writer: ManifestWriter | None = None

    # which cases this rank runs
    def _done(self, name: str, item: Mapping[str, Any], record: Mapping[str, Any] | None) -> tuple[bool, dict | None]:
        """(done?, a record to add for an output found whole without one)."""
        if self.metrics is not None:
            whole = bool(record and record.get("status") == "done" and "metrics" in record)
            return whole and all(k in (record.get("extras") or {}) for k in self.case_extras), None
        if record is not None and record.get("status") == "skipped" and not self.retry_skipped:
            return True, None
        checked = record if record is not None and record.get("status") == "done" and record.get("sha256") else None
        if self.output_check.problem(item, checked) is not None:
            return False, None
        if checked is not None:
            return True, None
        return True, {
            "case": name,
            "status": "done",
            "note": "output found whole on resume",
            **self.output_check.record(item),
        }

    def shard(self, items: Sequence[Mapping[str, Any]]) -> list[dict]:
        """This rank's share of the cases that are not done yet (call after :func:`init_distributed`).

        Every rank checks a slice of the cases and the results are all-gathered, so all ranks shard the
        same pending list; ``partition_dataset(even_divisible=False)`` gives each pending case to one rank.
        """
        from monai.data import partition_dataset

        self.items = [dict(i) for i in items]
        self.names = [case_name(i, self.image_key, self.case_keys) for i in self.items]
        seen: dict[str, int] = {}
        for n, name in enumerate(self.names):
            if name in seen:
                raise ValueError(
                    f"datalist entries {seen[name]} and {n} are both case '{name}' (same file name); "
                    "their outputs would overwrite each other."
                )
            seen[name] = n
        rank, world = rank_and_world()
        self._writer = ManifestWriter(self.output_dir, rank)
        latest = _latest(read_manifest(self.output_dir))
        mine = {}
        for n in range(rank, len(self.items), world):
            done, new_record = self._done(self.names[n], self.items[n], latest.get(self.names[n]))
            mine[n] = done
            if new_record is not None:
                self._writer.append(new_record)
        done_all: dict[int, bool] = {}
        for part in _all_gather(mine):
            done_all.update(part)
        pending = [n for n in range(len(self.items)) if not done_all[n]]
        skipped = len(self.items) - len(pending)
        if rank == 0:
            logger.info(
                "%d of %d cases are done already; %d left for %d rank(s).",
                skipped,
                len(self.items),
                len(pending),
                world,
            )
        if len(pending) >= world:
            ids = partition_dataset(pending, num_partitions=world, shuffle=False, even_divisible=False)[rank]
        else:  # MONAI refuses fewer items than partitions; same interleaving: the first ranks take one each
            ids = pending[rank::world]
        self.shard_items = [self.items[n] for n in ids]
        self.shard_names = [self.names[n] for n in ids]
        return self.shard_items

    def run(self, engine) -> None:
        """``engine.run()`` when this rank has cases left (ignite refuses an empty loader)."""
        if self.shard_items:
            engine.run()
        else:
            logger.info("rank %d: no case left to run.", rank_and_world()[0])

    def tracker(self) -> CaseTracker:
        """The evaluator's ``iteration_update`` for this rank's shard."""
        return CaseTracker(self)

    def record(
        self,
        index: int,
        status: str,
        seconds: float | None,
        error: str | None = None,
        output: Any = None,
        engine: Any = None,
    ) -> dict:
        """Append the manifest line of shard item ``index`` (``output``: the iteration's output, for metrics;
        ``engine``: the evaluator, for ``case_extras``)."""
        rec: dict[str, Any] = {
            "case": self.shard_names[index],
            "status": status,
            "seconds": None if seconds is None else round(seconds, 3),
            "error": error,
        }
        if status == "done":
            if self.output_check is not None:
                rec.update(self.output_check.record(self.shard_items[index]))
            else:
                rec.update(self._case_metrics(output, engine))
                if self.case_extras:
                    rec["extras"] = {name: obj.case_record(engine) for name, obj in self.case_extras.items()}
        assert self._writer is not None
        return self._writer.append(rec)

    def _case_metrics(self, output: Any, engine: Any = None) -> dict:
        """Per-case metric rows (and, for the reports, the file names and object ids) of one iteration.

        File names and object ids come from the engine's batch (decollated), where ``MetricsSaver`` and
        ``MetricsSummary`` read them in a single-process run; without an engine, from ``output``."""
        out: dict[str, Any] = {"metrics": {}, "dtypes": {}}
        for name, handler in (self.metrics or {}).items():
            fn = handler.metric_fn
            y_pred, y = handler._output_transform(output)
            values = fn(y_pred=y_pred, y=y)
            fn.reset()  # nothing accumulates: the buffers are never all-gathered
            values = torch.as_tensor(values).detach().cpu()
            out["metrics"][name] = [[_json_float(float(v)) for v in row] for row in values.reshape(values.shape[0], -1)]
            out["dtypes"][name] = str(values.dtype).replace("torch.", "")
        from monai.data import decollate_batch

        batch = getattr(getattr(engine, "state", None), "batch", None)
        if batch is None:
            items = output if isinstance(output, list) else [output]
        else:
            items = decollate_batch(batch) if isinstance(batch, dict) else list(batch)
        if self.metrics_saver is not None:
            from monai.utils import ImageMetaKey

            meta = self.metrics_saver.batch_transform(items)
            meta = decollate_batch(meta) if isinstance(meta, dict) else meta
            out["filenames"] = [f"{m.get(ImageMetaKey.FILENAME_OR_OBJ)}" for m in meta]
        key = getattr(self.metrics_summary, "object_key", None)
        if key is not None:
            out["objects"] = [int(v) for it in items for v in torch.as_tensor(it[key]).reshape(-1).tolist()]
        return out

    # the end of the run
    def finish(self) -> dict[str, dict]:
        """After every rank's last case: rank 0 merges the manifest (and writes the metric reports).
        Returns the latest record per case (on every rank)."""
        _barrier()
        rank, _ = rank_and_world()
        records = read_manifest(self.output_dir)
        latest = _latest(records)
        if rank == 0:
            from shared_nets.io import atomic_write_text

            text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)
            atomic_write_text(os.path.join(self.output_dir, MANIFEST), text)
            for path in glob.glob(os.path.join(self.output_dir, "manifest.rank*.jsonl")):
                os.remove(path)
            if self.metrics is not None:
                self._write_reports(latest)
        _barrier()
        done = [n for n in self.names if latest.get(n, {}).get("status") == "done"]
        bad = [latest[n] for n in self.names if latest.get(n, {}).get("status") == "skipped"]
        if bad and not done:
            from shared_nets.data import DataError

            raise DataError(
                f"all {len(bad)} inputs were skipped, nothing was written; first: '{bad[0]['case']}': {bad[0]['error']}"
            )
        return latest

    def _write_reports(self, latest: Mapping[str, Mapping[str, Any]]) -> None:
        """Rank 0: the single-process metric reports from the per-case records, in datalist order."""
        from monai.metrics.utils import do_metric_reduction

        cases = [latest[n] for n in self.names if latest.get(n, {}).get("status") == "done"]
        self.reports = {}
        if not cases:
            return
        details: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        for name, handler in (self.metrics or {}).items():
            dtype = getattr(torch, cases[0]["dtypes"].get(name, "float32"))
            rows = [[_from_json_float(v) for v in row] for c in cases for row in c["metrics"][name]]
            details[name] = torch.tensor(rows, dtype=dtype)
            result, _ = do_metric_reduction(details[name].clone(), handler.metric_fn.reduction)
            result = result.squeeze()
            values[name] = result.item() if result.ndim == 0 else result
        if self.metrics_saver is not None:
            filenames = [f for c in cases for f in c.get("filenames", [])]
            self.metrics_saver.write_reports(values, details, filenames)
        objects = [o for c in cases for o in c.get("objects", [])]
        if self.metrics_summary is not None:
            self.metrics_summary.write(details, objects)
        self.reports = {"values": values, "details": details, "objects": objects, "extras": {}}
        for name, obj in self.case_extras.items():
            self.reports["extras"][name] = obj.write_merged([c["extras"][name] for c in cases])


class CaseTracker:
    """``iteration_update`` of a sharded run (batch size 1, shard order): times each case and appends its
    manifest line; a bad input (a :class:`shared_nets.data.SkippingDataset` marker, or a ``ValueError`` in
    the forward pass) is reported, recorded as ``skipped`` and produces no output; any other error is
    recorded as ``failed`` and stops the run.

    Args:
        runner: the :class:`CaseRunner` whose shard the evaluator's loader iterates.
    """

    def __init__(self, runner: CaseRunner) -> None:
        self.runner = runner

    def __call__(self, engine, batch):
        from shared_nets.data import SKIPPED_KEY, root_cause
        from shared_nets.engine import run_default_iteration

        index = engine.state.iteration - 1
        if index >= len(self.runner.shard_names):
            raise ValueError(
                f"CaseTracker: iteration {index + 1} but the shard has {len(self.runner.shard_names)} "
                "cases; the loader must iterate CaseRunner.shard's items with batch_size 1, in order."
            )
        start = time.perf_counter()
        if isinstance(batch, dict) and SKIPPED_KEY in batch:
            reason = batch["reason"]
            reason = reason[0] if isinstance(reason, (list, tuple)) else reason
            self.runner.record(index, "skipped", 0.0, str(reason))
            return None
        try:
            output = run_default_iteration(engine, batch)
        except ValueError as e:  # input-dependent: report this case, go on with the next
            reason = root_cause(e)
            logger.error("skipping '%s': %s", self.runner.shard_names[index], reason)
            self.runner.record(index, "skipped", time.perf_counter() - start, reason)
            return None
        except BaseException as e:
            self.runner.record(index, "failed", time.perf_counter() - start, root_cause(e))
            raise
        self.runner.record(index, "done", time.perf_counter() - start, output=output, engine=engine)
        return output


# -- training: DDP or FSDP -----------------------------------------------------------------------------
def wrap_for_training(
    module: torch.nn.Module, device: torch.device, use_fsdp: bool | str = False, find_unused_parameters: bool = False
) -> torch.nn.Module:
    """The network of ``multi_gpu_train.json``: ``DistributedDataParallel`` (every GPU holds all weights), or
    with ``use_fsdp`` a :class:`FullyShardedModel` (weights, gradients and optimizer state split over the GPUs).
    Call after the process group is up. ``use_fsdp`` may be the string ``"true"``/``"false"`` (a command-line
    ``--use_fsdp false`` reaches the config as a string, which would otherwise count as true)."""
    if isinstance(use_fsdp, str):
        if use_fsdp.strip().lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"use_fsdp must be true or false, got {use_fsdp!r}.")
        use_fsdp = use_fsdp.strip().lower() in ("true", "1")
    module = module.to(device)
    if use_fsdp:
        return FullyShardedModel(module, device)
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=find_unused_parameters
    )


def fsdp_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules sharded as their own FSDP units: the attention and the MLP of every block of every SAM
    image encoder (ViT) inside. Not the blocks themselves: a network may run a block's parts one by one (a method's
    adapters go between its attention and its MLP), so a block's ``forward`` (where FSDP
    gathers a unit's weights) is never called; its attention's and MLP's are. Norms stay in the root unit."""
    from segment_anything.modeling import ImageEncoderViT

    units: list[torch.nn.Module] = []
    for m in module.modules():
        if isinstance(m, ImageEncoderViT):
            for blk in m.blocks:
                units += [blk.attn, blk.mlp]
    return units


class FullyShardedModel(torch.nn.Module):
    """A network trained with FSDP (``torch.distributed.fsdp.fully_shard``, FSDP2) for ``multi_gpu_train.json``.

    The attention and the MLP of each image-encoder block are FSDP units of their own (:func:`fsdp_units`) and
    the rest of the network is the root unit: between uses a GPU holds 1/world of every parameter (frozen SAM
    weights included) and of the trainable parameters' gradients and optimizer state; a unit's weights are
    all-gathered just before it runs (forward and backward) and freed after. FSDP2 shards each parameter
    separately, so frozen SAM weights and trainable PEFT parameters can share a block (no ``use_orig_params``
    flattening; frozen ones get no gradient).

    Checkpoints hold the ordinary full state dict (the keys of the unwrapped network, as the DDP runs write):
    :func:`attach_state_gathering` gathers it on every rank at the end of each epoch (a collective) into a
    CPU copy on rank 0, which :meth:`state_dict` hands to rank 0's savers (their writes are atomic).
    :meth:`load_state_dict` takes a full state dict on every rank (resume) and keeps each rank's shard.

    Validation (different numbers of sliding windows per rank) would deadlock on per-forward all-gathers, so
    :meth:`full_weights` gathers the whole network once on every rank and no collective runs until it is
    resharded: :func:`attach_state_gathering` wraps the trainer's validation in it.

    Args:
        module: the network (already on ``device``).
        device: this rank's device (its type picks the device mesh: ``cuda`` or ``cpu`` with gloo).
        reshard_after_forward: free each unit's gathered weights after its forward (least memory).
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, reshard_after_forward: bool = True) -> None:
        super().__init__()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        _, world = rank_and_world()
        mesh = init_device_mesh(device.type, (world,))
        self.units = fsdp_units(module)
        for unit in self.units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
        self.module = module
        self.reshard_after_forward = reshard_after_forward
        self._full_state: dict[str, torch.Tensor] | None = None
        self._full_optim: dict[str, Any] | None = None

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # network attributes the configs and handlers read (max_points, prompt_scope...)
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:
                raise
            return getattr(inner, name)

    def gather(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Every rank: gather the full model (and optimizer) state into rank 0's CPU memory for the savers."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self._full_state = get_model_state_dict(self.module, options=opts)
        if optimizer is not None:
            self._full_optim = get_optimizer_state_dict(self.module, optimizer, options=opts)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The last gathered full state dict (rank 0; empty on the other ranks)."""
        if self._full_state is None:
            raise RuntimeError(
                "FullyShardedModel.state_dict: nothing gathered yet; every rank must call gather() "
                "first (attach_state_gathering does it at the end of each epoch)."
            )
        return dict(self._full_state)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a full state dict (the same on every rank); each rank keeps its shard."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        return set_model_state_dict(
            self.module, dict(state_dict), options=StateDictOptions(full_state_dict=True, strict=strict)
        )

    def full_weights(self):
        """Context manager: all weights gathered on every rank (a collective on entry and exit), no collective
        inside, so ranks may run different numbers of forward passes (validation)."""
        import contextlib

        from torch.distributed.fsdp import FSDPModule

        @contextlib.contextmanager
        def ctx():
            units = [*self.units, self.module]
            for u in units:
                u.set_reshard_after_forward(False, recurse=False)
                u.unshard()
            try:
                yield self
            finally:
                for u in units:
                    u.reshard()
                    u.set_reshard_after_forward(self.reshard_after_forward, recurse=False)

        assert all(isinstance(u, FSDPModule) for u in [*self.units, self.module])
        return ctx()


class FullOptimizerState:
    """The optimizer entry of a checkpoint of a :class:`FullyShardedModel` run: the full (unsharded) optimizer
    state that :meth:`FullyShardedModel.gather` collected on rank 0, and on load each rank's shard of it.

    Args:
        model: the sharded model.
        optimizer: its optimizer.
    """

    def __init__(self, model: FullyShardedModel, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.model._full_optim is None:
            raise RuntimeError("FullOptimizerState.state_dict: nothing gathered yet (see FullyShardedModel.gather).")
        return self.model._full_optim

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            self.model.module, self.optimizer, dict(state_dict), options=StateDictOptions(full_state_dict=True)
        )


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """What a checkpoint saves for the optimizer: ``optimizer`` itself, or for a :class:`FullyShardedModel`
    its :class:`FullOptimizerState`."""
    return FullOptimizerState(model, optimizer) if isinstance(model, FullyShardedModel) else optimizer


def attach_state_gathering(
    trainer: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, validator: Any = None
) -> Any:
    """For a :class:`FullyShardedModel` (no-op otherwise): gather the full state on every rank after each
    epoch's last iteration (before the epoch-end validation and checkpoint savers read it on rank 0), and run
    ``validator`` (the validation evaluator) with the weights gathered on every rank. Returns ``trainer``."""
    if not isinstance(model, FullyShardedModel):
        return trainer
    from ignite.engine import Events

    def epoch_end(engine, iteration: int) -> bool:
        return iteration % max(1, int(engine.state.epoch_length or 1)) == 0

    trainer.add_event_handler(Events.ITERATION_COMPLETED(event_filter=epoch_end), lambda _: model.gather(optimizer))
    if validator is not None:
        run = validator.run

        def run_with_full_weights(*args, **kwargs):
            with model.full_weights():
                return run(*args, **kwargs)

        validator.run = run_with_full_weights
    return trainer


# -- multi_gpu_train.json: process group, logging and handlers per rank ------------------------------------
def init_process_group(device: torch.device | None = None) -> None:
    """``initialize`` of ``multi_gpu_train.json``: join the process group ``torchrun`` describes unless it is
    already up (``nccl`` when CUDA is available, else ``gloo``), then, with CUDA, make ``device`` (default
    :func:`local_device`) this process's current GPU.

    Unlike :func:`init_distributed` it always initialises the group, as training under ``torchrun`` needs.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(device if device is not None else local_device())


def quiet_other_ranks(*engines: Any) -> None:
    """Log at INFO level from rank 0 and at WARNING level from the other ranks, so a multi-GPU run prints
    each epoch's losses and metrics once. ``engines``: ignite engines (their ``logger``)."""
    level = logging.WARNING if rank_and_world()[0] > 0 else logging.INFO
    for engine in engines:
        engine.logger.setLevel(level)


def shutdown() -> None:
    """``finalize`` of ``multi_gpu_train.json``: wait for every rank, then leave the process group (no-op
    without one)."""
    finalize_distributed()


def _console_handler_types() -> tuple[type, ...]:
    from ignite.handlers import ProgressBar
    from monai.handlers import StatsHandler, TensorBoardStatsHandler

    return ProgressBar, StatsHandler, TensorBoardStatsHandler


def main_process_handlers(handlers: Sequence[Any]) -> list[Any]:
    """The training handlers a rank attaches: all of them on rank 0 (or without a process group); on the
    other ranks all but the progress bar, console and TensorBoard output (``ProgressBar``, ``StatsHandler``,
    ``TensorBoardStatsHandler``), which rank 0 writes once. Handlers that change training (learning-rate
    schedule, validation, a ``CheckpointLoader`` a fine-tuning overlay appends) run on every rank."""
    handlers = list(handlers)
    if rank_and_world()[0] == 0:
        return handlers
    console = _console_handler_types()
    return [h for h in handlers if not isinstance(h, console)]
