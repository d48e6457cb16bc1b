"""How ``python -m tools bench`` feeds and measures Med-SA (:class:`shared_nets.interface.BenchCase`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from shared_nets.interface import BenchCase, RepromptParts, config_value, count_flops

from .network import MEDSA_OFFICIAL_CODE_SETTINGS

__all__ = ["BENCH_CASE", "MedSABenchCase"]


class MedSABenchCase(BenchCase):
    """Prompted slice network: click and box prompts as three guidance channels after the image; image
    embeddings are cached, so a re-prompt runs the mask decoder only."""

    prompted: ClassVar[bool] = True
    #: the official code's settings (its keys are the bundle's config keys), re-prompted beside the paper's
    reprompt_settings: ClassVar[dict[str, dict[str, Any]]] = {"official code": dict(MEDSA_OFFICIAL_CODE_SETTINGS)}
    report_note: ClassVar[str] = (
        "Med-SA's prompt-conditioned HyP-Adpt sits in the mask decoder, not the image encoder, so its whole "
        "encoder is reusable in both settings"
    )

    def prompt_channels(self, net: nn.Module) -> tuple[str, ...]:
        return ("foreground", "background", "roi")

    def set_gradient_checkpointing(self, net: nn.Module, on: bool) -> None:
        # switched on its encoder blocks (a per-block class swap), not by an attribute
        from shared_nets.sam import enable_gradient_checkpointing

        enable_gradient_checkpointing(net.image_encoder.blocks, on)

    def memory_estimate_input(self, net: nn.Module, size: int, depth: int) -> torch.Tensor:
        # prompts are read from 3 guidance channels with data-dependent ops that fake tensors cannot run:
        # decode one centre click per slice from real channels once, and reuse the result (the prompt
        # encoder's few kept activations are left out)
        guidance = torch.zeros(1, 3, size, size, depth)
        guidance[:, 0, size // 2, size // 2, :] = 1
        decoded = net.prompts(guidance)
        with torch.no_grad():
            embedded = net.embed_prompts(*decoded)
        net.prompts = lambda g: decoded
        net.embed_prompts = lambda *a: embedded
        net.automatic = True  # skips the checks that read prompt values (every slice is prompted here anyway)
        return torch.zeros(1, int(net.in_channels) + 3, size, size, depth)

    def reprompt_parts(self, net: nn.Module, parser: Any) -> RepromptParts:
        """One chunk of ``num_slices`` slices: the encoder (cached) vs the prompt path (the decoder)."""
        depth = int(config_value(parser, "num_slices", 1) or 1)
        img = torch.randn(depth, 3, net.img_size, net.img_size)
        enc, emb = count_flops(lambda: net.encode(img, depth))
        width = emb.shape[1]
        sparse = torch.randn(depth, net.max_points + 2, width)
        dense = torch.randn(depth, width, *emb.shape[2:])
        dec, _ = count_flops(lambda: net.decode(emb, sparse, dense))
        return RepromptParts(enc, 0, dec, f"@{net.img_size}, {depth} slices")


BENCH_CASE = MedSABenchCase()
