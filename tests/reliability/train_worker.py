"""Run a bundle's demo training in its own process, optionally SIGKILLing itself mid-run.

Used by ``test_resume.py``: ``python tests/reliability/train_worker.py BUNDLE_ROOT DATA_DIR MAX_EPOCHS
[--kill-at ITERATION] [--resume]``. Everything is seeded by the bundle config; one torch thread.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle_root")
    parser.add_argument("data_dir")
    parser.add_argument("max_epochs", type=int)
    parser.add_argument("--kill-at", type=int, default=0, help="SIGKILL this process after this iteration")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--val-interval", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from shared_nets.engine import run_bundle_workflow

    def maybe_kill(engine) -> None:
        if args.kill_at and engine.state.iteration == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_bundle_workflow(
        args.bundle_root,
        ["train.json", "demo.json"],
        "train",
        {
            "dataset_dir": args.data_dir,
            "max_epochs": args.max_epochs,
            "val_interval": args.val_interval,
            "resume": args.resume,
            "num_workers": 0,
        },
        on_iteration=maybe_kill,
    )


if __name__ == "__main__":
    main()
