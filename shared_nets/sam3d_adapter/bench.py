"""How ``python -m tools bench`` feeds and measures 3DSAM-adapter (``BENCH_CASE``), and the memory of one
training step (128^3 ViT-B training on one 24 GB GPU).

On CUDA the peak is measured (``torch.cuda.max_memory_allocated`` over a forward, backward and
AdamW step). Elsewhere the step is traced with fake tensors (no memory, no compute) and the
tensors autograd keeps for the backward pass are summed: an estimate of activation memory, to
which weights, gradients and AdamW state are added. For ``tools`` benchmarks and the README.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from shared_nets.interface import BenchCase, RepromptParts, count_flops

from .builder import build_sam3d_adapter
from .network import SAM3DAdapter

__all__ = ["BENCH_CASE", "SAM3DBenchCase", "training_step_memory"]


def _click_batch(
    net: SAM3DAdapter, batch: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size = net.patch_size
    image = torch.randn(batch, net.in_channels, *size, device=device)
    coords = torch.tensor([[s // 2 for s in size]], dtype=torch.float32, device=device).expand(batch, 1, 3).contiguous()
    labels = torch.ones(batch, 1, dtype=torch.long, device=device)
    return image, coords, labels


def _state_bytes(net: torch.nn.Module) -> dict[str, int]:
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return {"parameter_bytes": params, "gradient_bytes": trainable, "optimizer_bytes": 2 * trainable}


def training_step_memory(
    variant: str = "vit_b",
    img_size: int = 128,
    batch: int = 1,
    use_checkpoint: bool = True,
    amp: bool = True,
    device: str | None = None,
    **net_kwargs: Any,
) -> dict[str, Any]:
    """Memory of one training step of :class:`SAM3DAdapter` (random weights, one centre click).

    Args:
        variant: SAM backbone.
        img_size: cubic patch side.
        batch: patches per step.
        use_checkpoint: gradient checkpointing of the transformer blocks.
        amp: autocast (float16 on CUDA, bfloat16 in the CPU estimate).
        device: ``"cuda..."`` to measure; None = CUDA when available, else the estimate.
        net_kwargs: further :func:`build_sam3d_adapter` arguments.

    Returns:
        ``{"measured": True, "peak_bytes": ...}`` on CUDA, or ``{"measured": False,
        "activation_bytes": ...}`` from the fake-tensor trace (image encoder and decoder; the
        prompt encoder's data-dependent click handling cannot be traced and is small), both with
        ``parameter_bytes``, ``gradient_bytes`` and ``optimizer_bytes`` (AdamW's two moments).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = dict(variant=variant, img_size=img_size, use_checkpoint=use_checkpoint, **net_kwargs)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        net = build_sam3d_adapter(**kwargs).to(device).train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        image, coords, labels = _click_batch(net, batch, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = net.forward_points(image, coords, labels) if net.prompted else net.forward_points(image)
            loss = out.float().logsumexp(1).mean()
        loss.backward()
        opt.step()
        torch.cuda.synchronize(device)
        return {
            "measured": True,
            "device": torch.cuda.get_device_name(device),
            "peak_bytes": int(torch.cuda.max_memory_allocated(device)),
            **_state_bytes(net),
        }

    from torch._subclasses.fake_tensor import FakeTensorMode

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with FakeTensorMode():
        net = build_sam3d_adapter(**kwargs).train()
        image = torch.randn(batch, net.in_channels, *net.patch_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                feats = net.encode(image)
                net.decoder(feats, image[:, :1], net.patch_size)
        state = _state_bytes(net)
    return {"measured": False, "activation_bytes": int(sum(saved.values())), **state}


def _prompt_encoder_flops(fake: nn.Module, feat_shape: tuple[int, ...], patch: tuple[int, ...]) -> int:
    """FLOPs of a real copy (random weights) of a fake ``PromptEncoder3D`` on one click."""
    from .heads import PromptEncoder3D

    blk = fake.layers[0]
    real = PromptEncoder3D(
        blk.self_attn.embedding_dim,
        blk.self_attn.num_heads,
        blk.mlp.lin1.out_features,
        depth=len(fake.layers),
        num_global_queries=fake.num_global_queries,
        encoding=fake.encoding,
        layer=fake.layer,
        use_point_labels=fake.label_embed is not None,
    ).eval()
    centre = torch.tensor([[[s // 2 for s in patch]]], dtype=torch.float32)
    return count_flops(lambda: real(torch.randn(feat_shape), centre, torch.ones(1, 1, dtype=torch.long), patch))[0]


class SAM3DBenchCase(BenchCase):
    """Prompted 3D-patch network: clicks as foreground/background guidance channels (when ``prompted``);
    image features and the decoder's prompt-independent part are cached for re-prompts."""

    slice_based: ClassVar[bool] = False
    prompted: ClassVar[bool] = True
    #: real-size training memory at the train.json setting (ViT-B, 128^3)
    memory_target: ClassVar[dict[str, Any]] = {}
    report_note: ClassVar[str] = (
        "3DSAM-adapter also caches the decoder's prompt-independent part (unprompted levels, image, their "
        "share of the first classifier convolution)"
    )

    def prompt_channels(self, net: nn.Module) -> tuple[str, ...]:
        return ("foreground", "background") if getattr(net, "prompted", True) else ()

    def set_gradient_checkpointing(self, net: nn.Module, on: bool) -> None:
        net.use_checkpoint = on

    def estimate_training_memory(self, net: nn.Module, parser: Any, state: int) -> dict[str, Any]:
        """:func:`training_step_memory` (encoder and decoder traced on fake tensors) with each switch."""
        out: dict[str, Any] = {"config": f"{net.variant}, {list(net.patch_size)} patch, batch 1"}
        kwargs = {k: parser.get_parsed_content(k) for k in ("variant", "img_size") if k in parser}
        for label, ckpt, amp in (
            ("none", False, False),
            ("grad-ckpt", True, False),
            ("AMP", False, True),
            ("both", True, True),
        ):
            est = training_step_memory(batch=1, use_checkpoint=ckpt, amp=amp, device="cpu", **kwargs)
            act = est["activation_bytes"]
            out[label] = {"activations_gb": act / 2**30, "total_gb": (act + state) / 2**30}
        return out

    def reprompt_parts(self, net: nn.Module, parser: Any) -> RepromptParts | None:
        """One patch: encoder and the decoder's prompt-independent part (cached) vs the prompt path; the
        prompt encoder is counted separately on real tensors (its click indexing is data-dependent)."""
        if not net.prompted:
            return None
        img = torch.randn(1, net.in_channels, *net.patch_size)
        enc, feats = count_flops(lambda: net.encode(img))
        prompted = [net.decoded_levels.index(k) for k in net.prompt_levels]
        static_flops, static = count_flops(lambda: net.decoder.static_part(feats, img[:, :1], prompted))
        dyn, _ = count_flops(lambda: net.decoder.forward_with_static(feats, static, prompted, net.patch_size))
        feat_shape = tuple(feats[prompted[0]].shape)

        def prompt_encoders() -> int:
            return sum(
                _prompt_encoder_flops(net.prompt_encoders[str(k)], feat_shape, net.patch_size)
                for k in net.prompt_levels
            )

        return RepromptParts(enc, static_flops, dyn, f", {list(net.patch_size)} patch", prompt_encoders)


BENCH_CASE = SAM3DBenchCase()
