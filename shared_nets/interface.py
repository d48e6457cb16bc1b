"""What the tools ask of a method, so that they name none (``python -m tools bench`` and friends).

Each method package may define a ``BENCH_CASE`` (a :class:`BenchCase`) in its ``bench`` module,
imported by the package's ``__init__``. The tools find it from a bundle's ``network_def#_target_``
string (:func:`bench_case`), without building the network; a method without one is measured as an
automatic slice network (the defaults of :class:`BenchCase`). A new method therefore needs no edit
to the tools: it adds ``<method>/bench.py`` only where it differs from the defaults.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["BenchCase", "RepromptParts", "bench_case", "config_value", "count_flops"]


@dataclass
class RepromptParts:
    """FLOPs of a first click split into what a re-prompt of a cached image skips and what it runs.

    Args:
        encoder: image encoder FLOPs (cached).
        cached: other prompt-independent FLOPs the network caches (e.g. a decoder's partial sums).
        prompt_path: FLOPs a re-prompt runs again (counted on fake tensors).
        config_label: text appended to the variant in the report (e.g. ``"@1024, 16 slices"``).
        real_extra: FLOPs of the prompt path that fake tensors cannot trace (data-dependent ops),
            counted on real tensors after the fake-tensor pass; None when there are none.
    """

    encoder: int
    cached: int
    prompt_path: int
    config_label: str = ""
    real_extra: Callable[[], int] | None = None


class BenchCase:
    """How the benchmark feeds and measures a method's network; the defaults fit an automatic slice network.

    Attributes:
        slice_based: the network sees slices resized in-plane to its ``img_size`` (the volume is resized
            like the bundle's pre-processing); False for 3D-patch networks.
        prompted: one object per forward (binary target, the prompted object).
        reprompt_settings: further network settings (config overrides of the bundle) whose re-prompt cost
            is measured beside the configured one, by name.
        memory_target: config overrides of ``train.json`` at which real-size training memory is estimated
            (None: not estimated).
        peft_keys: config keys a demo config may switch to full fine-tuning; the paper's PEFT setting is
            rebuilt from ``train.json`` for the encoder-merge measurement.
        report_note: a sentence about the method's re-prompt cache for the report (empty: none).
    """

    slice_based: ClassVar[bool] = True
    prompted: ClassVar[bool] = False
    reprompt_settings: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    memory_target: ClassVar[Mapping[str, Any] | None] = None
    peft_keys: ClassVar[tuple[str, ...]] = ("peft", "finetune", "full_finetune")
    report_note: ClassVar[str] = ""

    def prompt_channels(self, net: nn.Module) -> tuple[str, ...]:
        """Prompt keys appended as guidance channels for the built (unwrapped) network ``net``
        (``foreground``, ``background``, ``roi``; empty for automatic networks)."""
        return ()

    def train_forward(self, net: nn.Module, core: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
        """The training forward of one step (``core`` is ``net`` without a wrapping ``Sequential``)."""
        return net(x)

    def set_gradient_checkpointing(self, net: nn.Module, on: bool) -> None:
        """Switch gradient checkpointing of a built network."""
        net.gradient_checkpointing = on

    def memory_estimate_input(self, net: nn.Module, size: int, depth: int) -> torch.Tensor:
        """A real ``[1, C, size, size, depth]`` input for the fake-tensor memory estimate (only its shape
        and dtype are used); called once before tracing and may prepare ``net`` for fake tensors."""
        return torch.zeros(1, 1, size, size, depth)

    def estimate_training_memory(self, net: nn.Module, parser: Any, state: int) -> dict[str, Any] | None:
        """The method's own training-memory estimate (``{"config", "<switch>": {"activations_gb",
        "total_gb"}}`` for none / grad-ckpt / AMP / both), or None to trace ``net``'s forward."""
        return None

    def reprompt_parts(self, net: nn.Module, parser: Any) -> RepromptParts | None:
        """First-click FLOPs of ``net`` (built under ``FakeTensorMode``) split for a re-prompt, or None when
        the network caches no image embedding."""
        return None


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Matmul/convolution/attention FLOPs of ``fn()`` (``torch.utils.flop_counter``) and its result."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return int(counter.get_total_flops()), out


def config_value(parser: Any, key: str, default: Any = None) -> Any:
    """Parsed value of a MONAI config key, ``default`` when absent or not parsable."""
    try:
        return parser.get_parsed_content(key) if key in parser else default
    except Exception:
        return default


_DEFAULT = BenchCase()


def bench_case(target: str | None) -> BenchCase:
    """The ``BENCH_CASE`` of the package that defines ``target`` (a ``network_def#_target_`` string).

    The module path of ``target`` is walked from the innermost package outwards; the first one with a
    ``BENCH_CASE`` (its own, or its ``bench`` submodule's) wins. Anything else (no target, a class outside
    any method package, a module that does not import) gets the default :class:`BenchCase`.
    """
    if not isinstance(target, str) or "." not in target:
        return _DEFAULT
    parts = target.lstrip("$").split(".")
    for n in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:n]))
        except Exception:
            continue
        case = getattr(module, "BENCH_CASE", None)
        if case is None:
            case = getattr(getattr(module, "bench", None), "BENCH_CASE", None)
        if isinstance(case, BenchCase):
            return case
    return _DEFAULT
