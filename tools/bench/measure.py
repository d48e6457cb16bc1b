"""Measurement: median wall time and peak memory of a call (see the :mod:`tools.bench` docstring)."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

DEVICES = ("cpu", "cuda")
_MIB = float(1 << 20)


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
    fns: dict[str, Callable[[], Any]],
    device: str,
    warmup: int = 1,
    repeat: int = 3,
    min_time: float = 0.0,
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
        n: {"error": errors[n]}
        if n in errors
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


def _t(m: Any) -> float | None:
    return m.get("time_s") if isinstance(m, dict) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _fmt_t(m: Any) -> str:
    if not isinstance(m, dict):
        return "–"
    if "error" in m:
        return "OOM" if m["error"] == "OOM" else "error"
    t = m["time_s"]
    return f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"


def _fmt_x(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _fmt_load(load: Any) -> str:
    return "–" if not load else " ".join(f"{v:.1f}" for v in load)


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines
