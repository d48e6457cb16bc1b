"""Memory of one 3DSAM-adapter training step (issue: 128^3 ViT-B training on one 24 GB GPU).

On CUDA the peak is measured (``torch.cuda.max_memory_allocated`` over a forward, backward and
AdamW step). Elsewhere the step is traced with fake tensors (no memory, no compute) and the
tensors autograd keeps for the backward pass are summed: an estimate of activation memory, to
which weights, gradients and AdamW state are added. For ``tools`` benchmarks and the README.
"""

from __future__ import annotations

from typing import Any

import torch

from .network import SAM3DAdapter

__all__ = ["training_step_memory"]


def _click_batch(net: SAM3DAdapter, batch: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        net_kwargs: further :class:`SAM3DAdapter` arguments.

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
        net = SAM3DAdapter(**kwargs).to(device).train()
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
        return {"measured": True, "device": torch.cuda.get_device_name(device),
                "peak_bytes": int(torch.cuda.max_memory_allocated(device)), **_state_bytes(net)}

    from torch._subclasses.fake_tensor import FakeTensorMode

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with FakeTensorMode():
        net = SAM3DAdapter(**kwargs).train()
        image = torch.randn(batch, net.in_channels, *net.patch_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                feats = net.encode(image)
                net.decoder(feats, image[:, :1], net.patch_size)
        state = _state_bytes(net)
    return {"measured": False, "activation_bytes": int(sum(saved.values())), **state}
