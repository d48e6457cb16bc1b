"""Small engine helpers the bundle configs call (resume lookup)."""

from __future__ import annotations

import glob
import os

__all__ = ["latest_checkpoint", "attach_checkpointing", "run_bundle_workflow"]


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


def attach_checkpointing(
    trainer,
    ckpt_dir: str | os.PathLike,
    save_dict: dict,
    resume: bool = False,
    save_interval: int = 1,
    map_location=None,
):
    """Make a MONAI trainer resumable: save model/optimizer/scheduler/engine state every
    ``save_interval`` epochs (``checkpoint_*.pt``, atomic writes, rank 0 only) and, with ``resume``,
    restore the newest one before training starts.

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
    from monai.handlers import CheckpointLoader, CheckpointSaver

    objects = {**save_dict, "trainer": trainer}
    if resume:
        path = latest_checkpoint(ckpt_dir, required=True)
        CheckpointLoader(load_path=path, load_dict=objects, map_location=map_location).attach(trainer)
    if _is_main_process():
        CheckpointSaver(
            save_dir=os.fspath(ckpt_dir), save_dict=objects, file_prefix="checkpoint", save_interval=save_interval,
            n_saved=1, save_final=True, final_filename="checkpoint_final.pt",
        ).attach(trainer)
    return trainer



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
