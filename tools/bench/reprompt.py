"""Interactive re-prompts: embedding caches, the re-prompt timed on the run's configs, and its FLOP ratio
counted at the bundle's real size (the method's :class:`shared_nets.interface.BenchCase` splits the FLOPs)."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared_nets.sam import EmbeddingCache

from .inputs import Phantom, _value, _with_guidance, bundle_parser, network_case
from .measure import _one_line, _ratio, _t


def _embedding_caches(net: nn.Module) -> list[EmbeddingCache]:
    """The :class:`EmbeddingCache` objects of ``net``'s modules."""
    return [v for m in net.modules() for v in vars(m).values() if isinstance(v, EmbeddingCache)]


def clear_embedding_caches(net: nn.Module) -> bool:
    """Drop the cached image embeddings of an interactive network (its :class:`EmbeddingCache` objects), so
    a timed call is a first click; returns whether it has any."""
    caches = _embedding_caches(net)
    for cache in caches:
        cache.clear()
    return bool(caches)


def reprompt_flops(bundle_root: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-prompt cost as a FLOP ratio at the bundle's real size (``train.json``, no ``demo.json``).

    The network is built under ``FakeTensorMode`` (no memory, no compute) and
    ``torch.utils.flop_counter`` counts matmul/convolution/attention FLOPs of what a first click
    runs (encoder, decoder) and what a re-prompt of a cached image runs, as the method's bench case
    splits them (``reprompt_parts``); element-wise ops, interpolation and prompt decoding are not
    counted (small at these sizes).

    Returns:
        ``{"network", "config", "encoder", "cached_decoder_part", "prompt_path", "ratio"}``
        (ratio = prompt path / first click), or ``{"error": ...}`` for networks without a cache.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    root = Path(bundle_root)
    ov = {"bundle_root": str(root), "device": "$torch.device('cpu')", "sam_checkpoint": None, **(overrides or {})}
    parser = bundle_parser(root, ["train.json"], ov)
    case = network_case(parser)
    with FakeTensorMode(), torch.no_grad():
        net = parser.get_parsed_content("network_def").eval()
        name = type(net).__name__
        parts = case.reprompt_parts(net, parser)
    if parts is None:
        return {"network": name, "error": "no cached image embedding"}
    config = f"{_value(parser, 'variant')}{parts.config_label}"
    counts = {"encoder": parts.encoder, "cached_decoder_part": parts.cached, "prompt_path": parts.prompt_path}
    if parts.real_extra is not None:  # outside fake mode: real tensors for data-dependent parts
        counts["prompt_path"] += int(parts.real_extra())
    first = counts["encoder"] + counts["cached_decoder_part"] + counts["prompt_path"]
    return {
        "network": name,
        "config": config,
        **counts,
        "first_click": first,
        "ratio": round(counts["prompt_path"] / first, 4),
    }


def reprompt_row(
    bench: Any,
    root: Path,
    setting: str,
    extra: dict[str, Any],
    net: nn.Module,
    inferer: Any,
    volume: Phantom,
    mask: torch.Tensor,
    keys: tuple[str, ...],
    row: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """First click and re-prompt of one network setting, timed, plus the real-size FLOP ratio."""
    out: dict[str, Any] = {"setting": setting, "overrides": extra}
    if row is not None and "infer" in row:
        out["first_click"] = row["infer"]
    else:
        vol = _with_guidance(volume.image[None], mask, keys)[None].to(bench.device)

        def infer() -> None:
            clear_embedding_caches(net)
            inferer(inputs=vol, network=net)

        out["first_click"] = bench.timed(infer)
    out.update(_reprompt(bench, net, inferer, volume, mask, keys))
    out["reprompt"] = out.pop("timing")
    out["ratio"] = _ratio(_t(out["reprompt"]), _t(out["first_click"]))
    try:
        out["flops"] = reprompt_flops(root, {**(bench.s["overrides"] or {}), **extra})
    except Exception as err:
        out["flops"] = {"error": _one_line(err)}
    return out


def _reprompt(
    bench: Any, net: nn.Module, inferer: Any, volume: Phantom, mask: torch.Tensor, keys: tuple[str, ...]
) -> dict[str, Any]:
    """Re-prompt latency: the first click's volume with :func:`_corrective_clicks` added, embeddings cached.

    Also checks the cached answer against an uncached one (max abs difference) and counts
    the windows that reused their embedding.
    """
    first = _with_guidance(volume.image[None], mask, keys)[None].to(bench.device)
    again = _with_guidance(volume.image[None], mask, keys, reprompt=True)[None].to(bench.device)
    caches = _embedding_caches(net)
    clear_embedding_caches(net)
    inferer(inputs=first, network=net)  # the first click fills the cache
    misses = sum(c.misses for c in caches)
    cached = inferer(inputs=again, network=net)
    out: dict[str, Any] = {
        "windows": int(getattr(inferer, "last_windows_run", 0)),
        "encoder_runs": sum(c.misses for c in caches) - misses,
    }
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
    out["timing"] = bench.timed(partial(inferer, inputs=again, network=net))
    return out
