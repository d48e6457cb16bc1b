"""Engine helpers the bundle configs call: resumable, atomic checkpointing with random state, a NaN/Inf
loss guard, and running a bundle workflow in-process."""

from __future__ import annotations

import glob
import logging
import math
import os
import pickle
import random
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader as _MonaiCheckpointLoader
from monai.handlers import CheckpointSaver as _MonaiCheckpointSaver

from shared_nets.io import atomic_torch_save

__all__ = [
    "latest_checkpoint",
    "attach_checkpointing",
    "attach_divergence_guard",
    "CheckpointSaver",
    "CheckpointLoader",
    "AtomicDiskSaver",
    "RNGState",
    "TrainingDiverged",
    "SkipBadInputs",
    "ClipGradients",
    "run_default_iteration",
    "run_bundle_workflow",
]


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint", required: bool = True) -> str | None:
    """Path of the newest resumable checkpoint (``{prefix}*.pt``) written by the trainer's ``CheckpointSaver``.

    Args:
        ckpt_dir: the bundle's ``ckpt_dir``.
        prefix: the saver's ``file_prefix``.
        required: raise ``FileNotFoundError`` (naming the folder) when there is none; else return None.
    """
    files = [f for f in glob.glob(os.path.join(os.fspath(ckpt_dir), f"{prefix}*.pt")) if os.path.isfile(f)]
    if not files:
        if required:
            raise FileNotFoundError(
                f"resume requested but no '{prefix}*.pt' checkpoint exists in '{os.fspath(ckpt_dir)}'; "
                "train once without resume first."
            )
        return None
    return max(files, key=lambda f: (os.path.getmtime(f), f))


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


#: What ``torch.load`` raises for a file that is not a (complete) PyTorch checkpoint: a truncated zip archive
#: (RuntimeError), an empty file (EOFError), random bytes or a pickle with disallowed globals (UnpicklingError).
_UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile)


def _expected_entries(module: torch.nn.Module) -> dict[str, tuple[int, ...] | None]:
    """The keys (and tensor shapes) of ``module.state_dict()``, read from the module tree without calling
    ``state_dict()`` (so no ``_save_to_state_dict`` hook runs, e.g. an SVD layer's decomposition).

    Mirrors ``nn.Module._save_to_state_dict``: parameters and persistent buffers that are not None, plus
    ``_extra_state`` where ``get_extra_state`` is overridden (shape None: not a tensor to compare).
    """
    entries: dict[str, tuple[int, ...] | None] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        prefix = f"{prefix}." if prefix else ""
        for name, p in m._parameters.items():
            if p is not None:
                entries[prefix + name] = tuple(p.shape)
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                entries[prefix + name] = tuple(b.shape)
        if type(m).get_extra_state is not torch.nn.Module.get_extra_state:
            entries[prefix + "_extra_state"] = None
    return entries


def _state_dict_problems(module: torch.nn.Module, state: Any, strict: bool) -> list[str]:
    """What keeps ``state`` from loading into ``module`` (``load_state_dict(strict=strict)``), in the order
    missing keys, unexpected keys, mis-shaped tensors; empty when it fits."""
    if not isinstance(state, Mapping):
        return [f"a {type(state).__name__}, not a state dict"]
    expected = _expected_entries(module)
    problems = []
    if strict and any(k not in state for k in expected):
        problems.append("missing keys")
    if strict and any(k not in expected for k in state):
        problems.append("unexpected keys")
    if any(
        shape is not None and isinstance(state.get(k), torch.Tensor) and tuple(state[k].shape) != shape
        for k, shape in expected.items()
    ):
        problems.append("mis-shaped tensors")
    return problems


def _checks_keys(obj: Any) -> bool:
    """Whether ``obj`` loads with ``nn.Module``'s own ``load_state_dict`` (key for key, shape for shape)."""
    return (
        isinstance(obj, torch.nn.Module)
        and type(obj).load_state_dict is torch.nn.Module.load_state_dict
        and type(obj).state_dict is torch.nn.Module.state_dict
    )


class CheckpointLoader(_MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` with one-line errors that name the file: a missing or unreadable file, or
    a checkpoint of another method/variant/size (missing/unexpected/mis-shaped keys) instead of torch's
    multi-line ``load_state_dict`` report. Same arguments as ``monai.handlers.CheckpointLoader``.

    Before MONAI loads it, the file is opened once (memory-mapped) and each network in ``load_dict`` is
    compared with it key for key and shape for shape (``strict``/``strict_shape`` as MONAI applies them).
    """

    def __call__(self, engine) -> None:
        path = os.fspath(self.load_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint '{path}' does not exist; train the bundle first or write an initial "
                "model.pt (`python -m tools init_model`)."
            )
        try:  # mmap needs the zip format torch has written since 1.6; older files are read whole
            checkpoint = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
        except _UNREADABLE as e:
            text = " ".join(str(e).split())
            raise ValueError(
                f"checkpoint '{path}' is not a readable PyTorch checkpoint ({type(e).__name__}: {text[:160]})."
            ) from None
        problems = self._problems(checkpoint)
        del checkpoint
        if problems:
            raise ValueError(
                f"checkpoint '{path}' does not fit this network ({', '.join(problems)}); expected a "
                "model.pt written by this bundle with the same variant, img_size and number of classes."
            )
        super().__call__(engine)

    def _problems(self, checkpoint: Any) -> list[str]:
        if not self.strict_shape:  # MONAI loads only the matching keys and shapes
            return []
        first = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and not (isinstance(checkpoint, Mapping) and first in checkpoint):
            checkpoint = {first: checkpoint}  # a bare state dict, as MONAI accepts it
        if not isinstance(checkpoint, Mapping):
            return [f"a {type(checkpoint).__name__}, not a dict of state dicts"]
        problems: list[str] = []
        for key, obj in self.load_dict.items():
            if key not in checkpoint:
                problems.append(f"no '{key}' entry")
                continue
            if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
                obj = obj.module  # as ignite's Checkpoint.load_objects loads it
            if _checks_keys(obj):
                problems += [p for p in _state_dict_problems(obj, checkpoint[key], self.strict) if p not in problems]
        return problems


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/Inf; the run stops and keeps its last good checkpoint."""


_Generator = (np.random.RandomState, np.random.Generator, torch.Generator)


def _random_states(*roots: Any) -> list:
    """Every random generator (``numpy.random.RandomState``/``Generator``, ``torch.Generator``) reachable
    from ``roots`` through MONAI and ``shared_nets`` objects, in a stable order.

    MONAI's random transforms each own a ``RandomState`` (``.R``, also inside wrapped transforms such as
    ``RandCropByPosNegLabeld.cropper``) and iteration hooks such as Med-SA's click simulation own theirs;
    with ``num_workers=0`` these advance in the main process, so a bit-exact resume must restore them, not
    just the global generators.
    """
    found: list = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, _Generator):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o)
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                visit(obj[k])
        elif isinstance(obj, (torch.Tensor, torch.nn.Module)):
            return
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("monai", "shared_nets"):
            for k in sorted(vars(obj)):
                if k in ("data", "_cache", "_hash_keys", "_read_env", "_cache_other") or k.startswith("__"):
                    continue  # a dataset's items and caches hold no generator
                visit(vars(obj)[k])

    for root in roots:
        visit(root)
    return found


def _legacy_state(s: tuple) -> dict:
    """A ``RandomState.get_state()`` / ``np.random.get_state()`` tuple as tensors, numbers and strings."""
    return {
        "kind": "RandomState",
        "name": s[0],
        "keys": torch.from_numpy(s[1].astype(np.int64)),
        "pos": int(s[2]),
        "has_gauss": int(s[3]),
        "cached_gaussian": float(s[4]),
    }


def _legacy_tuple(s: dict) -> tuple:
    return s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"]


def _get_state(g: Any) -> dict:
    """A generator's state as tensors, numbers and strings (``torch.load(weights_only=True)`` accepts them)."""
    if isinstance(g, np.random.RandomState):
        return _legacy_state(g.get_state())
    if isinstance(g, np.random.Generator):
        return {"kind": "Generator", "state": g.bit_generator.state}
    return {"kind": "torch", "state": g.get_state()}


def _set_state(g: Any, s: dict) -> None:
    if isinstance(g, np.random.RandomState) and s["kind"] == "RandomState":
        g.set_state(_legacy_tuple(s))
    elif isinstance(g, np.random.Generator) and s["kind"] == "Generator":
        g.bit_generator.state = s["state"]
    elif isinstance(g, torch.Generator) and s["kind"] == "torch":
        g.set_state(s["state"])
    else:
        raise ValueError(f"checkpoint random state of kind {s['kind']!r} does not match generator {type(g).__name__}.")


class RNGState:
    """Checkpointable random state: Python, NumPy and torch (CPU and CUDA) global generators plus the
    generators owned by the training transforms and iteration hooks, so a resumed run draws the same
    crops, flips and simulated prompts as an uninterrupted one (``docs/reliability.md``, "Kill and resume").

    Args:
        roots: objects holding random transforms/hooks, e.g. the training dataset and the trainer's
            ``iteration_update``.
    """

    def __init__(self, *roots: Any) -> None:
        self.roots = roots

    def state_dict(self) -> dict:
        py = random.getstate()
        state = {
            "python": [py[0], list(py[1]), py[2]],
            "numpy": _legacy_state(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "owned": [_get_state(g) for g in _random_states(*self.roots)],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if state["numpy"]["kind"] != "RandomState":
            raise ValueError(f"checkpoint numpy random state of kind {state['numpy']['kind']!r} is not a RandomState.")
        np.random.set_state(_legacy_tuple(state["numpy"]))
        torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        gens = _random_states(*self.roots)
        if len(gens) != len(state["owned"]):
            raise ValueError(
                f"checkpoint holds {len(state['owned'])} random generators of transforms/hooks but this training "
                f"has {len(gens)}: the checkpoint was written with a different preprocessing (config changed?)."
            )
        for g, s in zip(gens, state["owned"]):
            _set_state(g, s)


class AtomicDiskSaver(DiskSaver):
    """Ignite save handler that never leaves the folder without a complete checkpoint.

    Ignite's ``Checkpoint`` deletes the previous file *before* writing the next one and MONAI's
    ``CheckpointSaver`` writes non-atomically: a kill at the wrong moment left either nothing or a
    truncated file. Here every file is written to a temporary name and renamed, and removals that
    ``Checkpoint`` asks for are carried out only after the next file is safely in place.

    Args:
        dirname: checkpoint folder.
        filename: fixed file name (e.g. ``model.pt``) instead of ignite's generated one.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=os.fspath(dirname), atomic=True, create_dir=True, require_empty=False)
        self.filename = filename
        self._pending_removal: list[str] = []

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        name = self.filename or filename
        if _is_main_process():
            atomic_torch_save(checkpoint, os.path.join(self.dirname, name))
        pending, self._pending_removal = self._pending_removal, []
        for old in pending:
            if old != name:
                super().remove(old)

    def remove(self, filename: str) -> None:
        name = self.filename or filename
        if name not in self._pending_removal:
            self._pending_removal.append(name)


class CheckpointSaver(_MonaiCheckpointSaver):
    """MONAI's ``CheckpointSaver`` with atomic writes (:class:`AtomicDiskSaver`) and no final save of a
    diverged model (after :class:`TrainingDiverged`, ``checkpoint_final.pt`` is not overwritten).

    Same arguments as ``monai.handlers.CheckpointSaver``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:  # keep MONAI's fixed file names (model.pt, checkpoint_final.pt)
                ckpt.save_handler = AtomicDiskSaver(
                    self.save_dir, filename=getattr(ckpt.save_handler, "filename", None)
                )

    def completed(self, engine) -> None:
        if getattr(engine.state, "diverged", False):
            return
        super().completed(engine)

    def exception_raised(self, engine, e: Exception) -> None:
        if getattr(engine.state, "diverged", False) or isinstance(e, TrainingDiverged):
            raise e
        super().exception_raised(engine, e)


def _batch_loss(output: Any) -> float | None:
    """The loss a MONAI trainer put in ``engine.state.output`` (a dict, or a decollated list of dicts)."""
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if isinstance(output, dict) and "loss" in output:
        loss = output["loss"]
        return float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
    return None


def attach_divergence_guard(trainer, ckpt_dir: str | os.PathLike | None = None) -> None:
    """Stop training at the first NaN/Inf loss with :class:`TrainingDiverged`, before anything saves the
    diverged weights; the message names the epoch, iteration and the last good checkpoint."""
    from ignite.engine import Events

    def check(engine) -> None:
        loss = _batch_loss(engine.state.output)
        if loss is None or math.isfinite(loss):
            return
        engine.state.diverged = True
        last = latest_checkpoint(ckpt_dir, required=False) if ckpt_dir is not None else None
        raise TrainingDiverged(
            f"training diverged: loss is {loss} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; "
            + (
                f"the last good checkpoint '{last}' was kept (resume from it with a lower learning rate or amp off)."
                if last
                else "no checkpoint was written yet."
            )
        )

    trainer.add_event_handler(Events.ITERATION_COMPLETED, check)


def attach_checkpointing(
    trainer,
    ckpt_dir: str | os.PathLike,
    save_dict: dict,
    resume: bool = False,
    save_interval: int = 1,
    map_location=None,
):
    """Make a MONAI trainer resumable and safe: save model/optimizer/scheduler/engine state and every
    random generator (:class:`RNGState`) every ``save_interval`` epochs (``checkpoint_epoch=N.pt``,
    atomic, rank 0 only), stop at a NaN/Inf loss keeping the last good checkpoint
    (:func:`attach_divergence_guard`) and, with ``resume``, restore the newest checkpoint before training.

    A run killed at any point and resumed with ``--resume true`` ends with the same weights as an
    uninterrupted run (CPU, ``num_workers=0``): the partial epoch is redone from the same random state.

    Done from the bundle's ``initialize`` section because a handler inside ``train#handlers``
    cannot reference ``train#trainer`` (a circular reference for MONAI's config parser).

    Args:
        trainer: the ``SupervisedTrainer``.
        ckpt_dir: folder for checkpoints.
        save_dict: objects to save besides the trainer (``model``, ``optimizer``, ``lr_scheduler``...).
        resume: load the newest ``checkpoint*.pt`` from ``ckpt_dir`` (error if there is none).
        save_interval: epochs between checkpoints.
        map_location: passed to ``torch.load``.

    Returns:
        ``trainer``.
    """
    loader = getattr(trainer, "data_loader", None)
    hook = getattr(trainer, "_process_function", None)  # a custom iteration_update may own a generator
    objects = {**save_dict, "trainer": trainer, "rng": RNGState(getattr(loader, "dataset", None), hook)}
    attach_divergence_guard(trainer, ckpt_dir)
    if resume:
        path = latest_checkpoint(ckpt_dir, required=True)
        keys = torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()  # keys only: no tensor read
        missing = [k for k in objects if k not in keys]
        if missing:
            raise ValueError(
                f"checkpoint '{path}' lacks {missing}; expected a checkpoint written by this bundle's trainer."
            )
        CheckpointLoader(load_path=path, load_dict=objects, map_location=map_location).attach(trainer)
    if _is_main_process():
        CheckpointSaver(
            save_dir=os.fspath(ckpt_dir),
            save_dict=objects,
            file_prefix="checkpoint",
            save_interval=save_interval,
            n_saved=1,
            save_final=True,
            final_filename="checkpoint_final.pt",
        ).attach(trainer)
    return trainer


class SkipBadInputs:
    """``iteration_update`` for a batch-inference ``SupervisedEvaluator`` fed by
    :class:`shared_nets.data.SkippingDataset`: one bad volume is reported and skipped, the rest are written.

    A batch that is a skip marker (its loading/preprocessing failed), or whose forward raises a
    ``ValueError`` (input-dependent errors such as prompts the network cannot take), runs no
    post-processing, so nothing is written for it; each skip is logged and appended to ``report``
    (JSON, atomic). Other errors (out of memory, bugs) stop the run as usual. When every input was
    skipped the run fails at the end with the first reason, so a systematic problem is not an exit code 0.

    Args:
        report: JSON file listing the skipped inputs and why (e.g. ``eval/skipped.json``); None: log only.
    """

    def __init__(self, report: str | os.PathLike | None = None) -> None:
        self.report = os.fspath(report) if report is not None else None
        self.skipped: list[dict] = []
        self.done = 0
        self._engines: set[int] = set()

    def _skip(self, names: Any, reasons: Any) -> None:
        names = names if isinstance(names, (list, tuple)) else [names]
        reasons = reasons if isinstance(reasons, (list, tuple)) else [reasons] * len(names)
        self.skipped.extend({"image": str(n), "reason": str(r)} for n, r in zip(names, reasons))
        if self.report is not None:
            from shared_nets.io import atomic_write_json

            atomic_write_json({"skipped": self.skipped}, self.report)

    def _finish(self, engine) -> None:
        if self.skipped and not self.done:
            first = self.skipped[0]
            from shared_nets.data import DataError

            raise DataError(
                f"all {len(self.skipped)} inputs were skipped, nothing was written; first: "
                f"'{first['image']}': {first['reason']}"
            )

    def __call__(self, engine, batch):
        from ignite.engine import Events

        from shared_nets.data import SKIPPED_KEY, root_cause

        if id(engine) not in self._engines:
            self._engines.add(id(engine))
            engine.add_event_handler(Events.COMPLETED, self._finish)
        if isinstance(batch, dict) and SKIPPED_KEY in batch:
            self._skip(batch[SKIPPED_KEY], batch["reason"])
            return None
        try:
            output = run_default_iteration(engine, batch)
        except ValueError as e:  # input-dependent: report this volume, go on with the next
            from shared_nets.data import source_name

            image = batch.get("image") if isinstance(batch, dict) else None
            name = source_name(image[0] if isinstance(image, (list, tuple)) else image)
            reason = root_cause(e)
            logging.getLogger(__name__).error("skipping '%s': %s", name, reason)
            self._skip(name, reason)
            return None
        self.done += 1
        return output


def run_default_iteration(engine, batch: Any) -> Any:
    """Run the engine's own iteration (forward, loss, backward/step for a trainer) on ``batch``.

    For ``iteration_update`` callables that wrap MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` step
    rather than replace it. Those engines keep the step in the private ``_iteration`` method (the callable
    MONAI hands to ignite's ``Engine``; an ``iteration_update`` argument replaces it), and this is the one
    place that calls it, so a MONAI change shows up here and in its test.
    """
    return engine._iteration(engine, batch)


class ClipGradients:
    """Clip the gradient norm of the trainable parameters after every backward pass of a MONAI trainer.

    Attached to ``IterationEvents.BACKWARD_COMPLETED``, i.e. between ``backward()`` and
    ``optimizer.step()``. Under AMP the gradients are first unscaled with the trainer's ``GradScaler``
    (``scaler.unscale_(optimizer)``), so the norm is the true one; ``scaler.step`` then does not unscale
    again. The norm is over the parameters of ``engine.network`` that require grad
    (``torch.nn.utils.clip_grad_norm_``, total 2-norm); frozen parameters are left alone.

    Args:
        max_norm: largest total gradient norm (3DSAM-adapter's ``grad_clip``, 1.0).
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = float(max_norm)
        if not self.max_norm > 0:
            raise ValueError(f"ClipGradients: max_norm must be a positive number, got {max_norm!r}.")

    def attach(self, engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> torch.Tensor:
        if engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        params = [p for p in engine.network.parameters() if p.requires_grad]
        return torch.nn.utils.clip_grad_norm_(params, self.max_norm)


def run_bundle_workflow(
    bundle_root: str | os.PathLike,
    configs: list[str],
    workflow_type: str = "train",
    overrides: dict | None = None,
    on_iteration=None,
) -> object:
    """Run a bundle workflow in-process, as ``python -m monai.bundle run`` does.

    Args:
        bundle_root: the bundle folder (holding ``configs/``).
        configs: config file names under ``configs/``, merged in order (e.g. ``["train.json", "demo.json"]``).
        workflow_type: ``train`` or ``infer``.
        overrides: config overrides, ``{"max_epochs": 2, "dataset_dir": ...}``, as on the command line.
        on_iteration: optional callable ``(engine) -> None`` attached to the trainer's
            ``ITERATION_COMPLETED`` (train workflows only), e.g. to record losses.

    Returns:
        The finished ``monai.bundle.ConfigWorkflow`` (its ``parser`` gives access to the objects).
    """
    from monai.bundle import ConfigWorkflow

    root = os.fspath(bundle_root)
    wf = ConfigWorkflow(
        config_file=[os.path.join(root, "configs", c) for c in configs],
        meta_file=os.path.join(root, "configs", "metadata.json"),
        logging_file=os.path.join(root, "configs", "logging.conf"),
        workflow_type=workflow_type,
        **{"bundle_root": root, **(overrides or {})},
    )
    wf.initialize()
    if on_iteration is not None:
        from ignite.engine import Events

        wf.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_COMPLETED, on_iteration)
    wf.run()
    wf.finalize()
    return wf
