"""CPU deployment: the exported network on ONNX Runtime (and ``torch.compile``) against eager PyTorch.

For each requested bundle and variant (``tiny``: ``inference.json`` + ``demo.json``; ``lite``: plus the
bundle's ``configs/lite.json``, LiteMedSAM's TinyViT encoder) the network is built as ``python -m tools
export`` builds it (:func:`tools.export.load_bundle_network`: weights loaded, PEFT deltas merged, in the
paper's PEFT setting where ``demo.json`` switched to full fine-tuning), the part the formats can express
is exported to ONNX (:func:`shared_nets.export.export_part`, ``export_program``, ``export_onnx``) and run
with ONNX Runtime's CPU provider. Eager, ONNX Runtime and (with ``compile=True``) ``torch.compile`` run
the same network on the same input (batch 1, cut from the real CT after the bundle's own
``preprocessing``, :func:`tools.export.ct_inputs`), timed in alternation (:func:`measure_interleaved`)
at each thread count. Reported: times, speed-ups over eager, max abs logit difference and argmax
agreement (:func:`shared_nets.export.check_equivalence`, which raises on a confident argmax flip or a
difference over ``atol``; the row then records the error).

``torch.compile`` (inductor) is off by default: its first call compiles for minutes on a small CPU
machine; when on, that first call's time is reported beside the steady-state time.

Alone: ``python -m tools bench_deploy --bundles <name>[,<name>] [--lite <name>] [--threads 1,2]``.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .lite import _as_list, _thread_counts
from .measure import _fmt_load, _fmt_t, _fmt_x, _one_line, _ratio, _t, _table, measure_interleaved

DEPLOY_COLUMNS = [
    "bundle",
    "variant",
    "input",
    "threads",
    "eager",
    "ONNX Runtime",
    "ORT speed-up",
    "max abs diff ORT",
    "argmax ORT",
    "torch.compile",
    "compile speed-up",
    "compile 1st call",
    "max abs diff compile",
    "ONNX export",
    "ONNX MB",
]
VARIANT_CONFIGS = {"tiny": ("inference.json", "demo.json"), "lite": ("inference.json", "demo.json", "lite.json")}


def _peft_setting(root: Path, configs: Sequence[str]) -> dict[str, Any]:
    """Overrides restoring ``train.json``'s PEFT keys where a later config switched them (the deployed net)."""
    from shared_nets.interface import bench_case

    from .inputs import bundle_parser

    train = bundle_parser(root, ["train.json"], {"bundle_root": str(root)})
    merged = bundle_parser(root, list(configs), {"bundle_root": str(root)})
    target = merged.get("network_def", {}).get("_target_") if isinstance(merged.get("network_def"), dict) else None
    return {
        k: train.get(k) for k in bench_case(target).peft_keys if k in train and k in merged and train[k] != merged[k]
    }


def deploy_row(
    bundle: str | os.PathLike,
    variant: str = "tiny",
    threads: Sequence[int] = (1,),
    compile: bool = False,
    ct: str | os.PathLike | None = None,
    warmup: int = 1,
    repeat: int = 3,
    min_time: float = 0.0,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """One bundle × variant: eager vs ONNX Runtime (vs ``torch.compile``) on one CT input, per thread count."""
    from shared_nets.export import (
        check_equivalence,
        export_inputs,
        export_onnx,
        export_part,
        export_program,
        load_exported,
    )
    from tools.export import DEFAULT_CT, ct_inputs, load_bundle_network

    if variant not in VARIANT_CONFIGS:
        raise ValueError(f"variant must be one of {sorted(VARIANT_CONFIGS)}, got {variant!r}.")
    root = Path(bundle)
    configs = [c for c in VARIANT_CONFIGS[variant] if (root / "configs" / c).is_file()]
    if variant == "lite" and "lite.json" not in configs:
        raise ValueError(f"bundle '{root}' has no configs/lite.json for the lite variant.")
    peft = _peft_setting(root, configs)
    net, parser, info = load_bundle_network(root, configs, peft)
    part, what = export_part(net)
    xa, xb = ct_inputs(net, parser, ct if ct is not None else DEFAULT_CT)
    ia = export_inputs(net, xa)
    fixed = "fixed batch" in what  # a core whose batch is specialised to the example's
    sample = ia if fixed else export_inputs(net, xb)  # torch.export keeps the batch dynamic only from batch >= 2
    row: dict[str, Any] = {
        "bundle": root.name,
        "variant": variant,
        "configs": configs,
        "peft_setting": peft,
        "part": what,
        "merged_layers": info.get("merged_layers"),
        "input": [list(t.shape) for t in ia],
        "rows": [],
    }
    before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench_deploy.") as tmp:
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        try:
            export_onnx(export_program(part, sample, None), sample, path)
            row["onnx_export_s"] = round(time.perf_counter() - t0, 1)
            row["onnx_mb"] = round(path.stat().st_size / 2**20, 1)
        except Exception as err:
            row["onnx_error"] = _one_line(err)
        compiled = None
        if compile:
            compiled = torch.compile(part)
        for n in threads:
            torch.set_num_threads(int(n))
            fns = {"eager": lambda: part(*ia)}
            r: dict[str, Any] = {"threads": int(n)}
            if "onnx_error" not in row:
                ort = load_exported("onnx", path, threads=int(n))
                fns["onnx"] = lambda ort=ort: ort(*ia)
                r["onnx_check"] = _check(check_equivalence, part, ort, ia, atol, "ONNX Runtime")
            if compiled is not None:
                if "compile_first_call_s" not in row:
                    t0 = time.perf_counter()
                    try:
                        with torch.no_grad():
                            compiled(*ia)
                        row["compile_first_call_s"] = round(time.perf_counter() - t0, 1)
                    except Exception as err:
                        row["compile_error"] = _one_line(err)
                if "compile_error" not in row:
                    fns["compile"] = lambda: compiled(*ia)
                    r["compile_check"] = _check(check_equivalence, part, compiled, ia, atol, "torch.compile")
            with torch.no_grad():
                timed = measure_interleaved(fns, "cpu", warmup, repeat, min_time)
            r.update(timed)
            r["onnx_speedup"] = _ratio(_t(timed["eager"]), _t(timed.get("onnx")))
            r["compile_speedup"] = _ratio(_t(timed["eager"]), _t(timed.get("compile")))
            row["rows"].append(r)
    torch.set_num_threads(before)
    return row


def _check(check, part, run, inputs, atol: float, name: str) -> dict[str, Any]:
    try:
        return check(part, run, inputs, atol, name=name)
    except Exception as err:  # a flip or an over-tolerance difference is reported in the row
        return {"error": _one_line(err)}


def deploy_speed_bench(
    bundles: str | Sequence[str] | None = None,
    lite: str | Sequence[str] | None = None,
    threads: int | str | Sequence[int] = (1,),
    compile: bool = False,
    bundles_dir: str | os.PathLike | None = None,
    ct: str | os.PathLike | None = None,
    warmup: int = 1,
    repeat: int = 3,
    min_time: float = 0.0,
) -> dict[str, Any]:
    """The "CPU deployment" section: :func:`deploy_row` for each tiny bundle in ``bundles`` and each ``lite``.

    Args:
        bundles: bundle folder names measured with the tiny demo configs (list or comma-separated).
        lite: bundle folder names measured with ``configs/lite.json`` (LiteMedSAM encoder).
        threads: thread counts (list or comma-separated).
        compile: also time ``torch.compile`` (its first call compiles for minutes on a small CPU).
        bundles_dir: folder holding the bundles (default ``<repo>/bundles``).
        ct: CT the input is cut from (default the repository's example CT).
        warmup, repeat, min_time: as :func:`measure_interleaved`.

    Returns:
        ``{"load_average_start", "load_average_end", "compile", "rows": [...]}``; a bundle that fails
        gives ``{"bundle", "variant", "error"}``.
    """
    from .run import REPO

    root = Path(bundles_dir) if bundles_dir is not None else REPO / "bundles"
    counts = _thread_counts(threads)
    out: dict[str, Any] = {"compile": bool(compile), "rows": []}
    out["load_average_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    jobs = [(n, "tiny") for n in _as_list(bundles) or []] + [(n, "lite") for n in _as_list(lite) or []]
    for name, variant in jobs:
        try:
            row = deploy_row(root / name, variant, counts, compile, ct, warmup, repeat, min_time)
        except Exception as err:  # one bundle never ends the run
            row = {"bundle": name, "variant": variant, "error": _one_line(err)}
        out["rows"].append(row)
    out["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return out


def _fmt_diff(check: Any) -> tuple[str, str]:
    if not isinstance(check, dict):
        return "–", "–"
    if "error" in check:
        return "error", "error"
    return f"{check['max_abs_diff']:.1e}", f"{100 * check['argmax_agreement']:.4f} %"


def render_deploy(section: dict[str, Any]) -> list[str]:
    """Markdown lines of the CPU deployment section."""
    lines = [
        "## CPU deployment (exported network: ONNX Runtime / torch.compile vs eager PyTorch)",
        "",
        "Same network (PEFT merged) and input (batch 1 from the example CT), timed in alternation; speed-up = "
        "eager time ÷ time. Load average "
        f"{_fmt_load(section.get('load_average_start'))} → {_fmt_load(section.get('load_average_end'))}"
        + ("." if section.get("compile") else "; torch.compile not run (pass --compile true)."),
        "",
    ]
    rows = []
    errors = []
    for row in section.get("rows", []):
        if "error" in row:
            errors.append(f"- {row['bundle']} ({row['variant']}): {row['error']}")
            continue
        if "onnx_error" in row:
            errors.append(f"- {row['bundle']} ({row['variant']}) ONNX export: {row['onnx_error']}")
        if "compile_error" in row:
            errors.append(f"- {row['bundle']} ({row['variant']}) torch.compile: {row['compile_error']}")
        shape = " + ".join("×".join(map(str, s)) for s in row["input"])
        first = row.get("compile_first_call_s")
        for r in row["rows"]:
            ort_d, ort_a = _fmt_diff(r.get("onnx_check"))
            cmp_d, _ = _fmt_diff(r.get("compile_check"))
            rows.append(
                [
                    row["bundle"],
                    row["variant"],
                    shape,
                    r["threads"],
                    _fmt_t(r.get("eager")),
                    _fmt_t(r.get("onnx")),
                    _fmt_x(r.get("onnx_speedup")),
                    ort_d,
                    ort_a,
                    _fmt_t(r.get("compile")),
                    _fmt_x(r.get("compile_speedup")),
                    "–" if first is None else f"{first:.1f} s",
                    cmp_d,
                    "–" if row.get("onnx_export_s") is None else f"{row['onnx_export_s']:.1f} s",
                    row.get("onnx_mb", "–"),
                ]
            )
    lines += _table(DEPLOY_COLUMNS, rows)
    return lines + ([""] + errors if errors else [])


def deploy_main(
    bundles: str | Sequence[str] | None = None,
    lite: str | Sequence[str] | None = None,
    threads: int | str | Sequence[int] = 1,
    compile: bool = False,
    repeat: int = 3,
    out: str | None = None,
) -> None:
    """``python -m tools bench_deploy``: the CPU deployment section alone; prints it (``--out``: also JSON)."""
    section = deploy_speed_bench(bundles, lite, threads, compile, repeat=repeat)
    if out is not None:
        from shared_nets.io import atomic_write_json

        atomic_write_json(section, out)
    print("\n".join(render_deploy(section)))
