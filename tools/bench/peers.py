"""Reference peers in the same process: stock SAM, MONAI networks, and stock vs SDPA attention.

Each function takes the run (``tools.bench.run._Bench``: its ``device`` and ``timed``/``timed_many``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from .inputs import _crop
from .measure import _count, _free, _one_line, _state_mb


def _step(
    net: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        optimizer.step()

    return step


def stock_sam(bench: Any, variant: str, img_size: int, patch_size: int) -> dict[str, Any]:
    """Stock ``segment_anything`` SAM of ``variant`` at ``img_size``: encoder forward and a prompt→mask call."""
    from shared_nets.sam import build_sam

    row: dict[str, Any] = {"variant": variant, "img_size": img_size, "patch_size": patch_size}
    try:
        sam = build_sam(variant, None, img_size=img_size, patch_size=patch_size).to(bench.device).eval()
    except Exception as err:
        row["error"] = _one_line(err)
        return row
    row["params"] = _count(sam)[0]
    x = torch.randn(1, 3, img_size, img_size, device=bench.device)
    with torch.no_grad():
        row["encoder"] = bench.timed(partial(sam.image_encoder, x), cheap=True)
    image = (torch.rand(3, img_size, img_size, device=bench.device) * 255).round()
    point = torch.tensor([[[img_size / 2, img_size / 2]]], device=bench.device)
    batch = [
        {
            "image": image,
            "original_size": (img_size, img_size),
            "point_coords": point,
            "point_labels": torch.ones(1, 1, device=bench.device),
        }
    ]
    row["prompt_to_mask"] = bench.timed(partial(sam, batch, multimask_output=False), cheap=True)
    return row


def monai_peer(bench: Any, name: str) -> dict[str, Any]:
    """A MONAI network (``dynunet`` or ``swinunetr``) trained on a 3D patch of the phantom and run with
    ``SlidingWindowInferer`` over the volume."""
    row = _monai_peer(bench, name)
    _free(bench.device, collect=True)
    return row


def _monai_peer(bench: Any, name: str) -> dict[str, Any]:
    from monai.inferers import SlidingWindowInferer
    from monai.losses import DiceCELoss

    s = bench.s
    cuda = bench.device == "cuda"
    roi = [int(r) for r in s["peer_roi"]]
    row: dict[str, Any] = {"name": name, "roi": roi, "batch": s["peer_batch"]}
    try:
        if name == "dynunet":
            from monai.networks.nets import DynUNet

            levels = 5 if cuda else 4
            filters = [32, 64, 128, 256, 320][:levels] if cuda else [16, 32, 64, 128][:levels]
            net = DynUNet(
                3,
                1,
                14,
                kernel_size=[3] * levels,
                strides=[1] + [2] * (levels - 1),
                upsample_kernel_size=[2] * (levels - 1),
                filters=filters,
                res_block=True,
            )
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
    net = net.to(bench.device)
    row["params_total"], row["params_trainable"] = _count(net)
    vol = bench.phantom
    centre = [d // 2 for d in vol.image.shape]
    x = _crop(vol.image[None], centre, roi)[None].repeat(s["peer_batch"], 1, 1, 1, 1).to(bench.device)
    y = _crop(vol.label[None], centre, roi)[None].repeat(s["peer_batch"], 1, 1, 1, 1).float().to(bench.device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    net.train()
    row["train"] = bench.timed(_step(net, DiceCELoss(to_onehot_y=True, softmax=True), optimizer, x, y))
    row["state_mb"] = _state_mb(net, optimizer)
    del optimizer
    net.eval()
    inferer = SlidingWindowInferer(roi, sw_batch_size=s["peer_batch"], overlap=0.25, mode="gaussian")
    v = vol.image[None, None].to(bench.device)
    row["volume"] = list(v.shape)
    with torch.no_grad():
        row["infer"] = bench.timed(partial(inferer, inputs=v, network=net))
    row["status"] = "ok"
    return row


def _compare_attention(bench: Any, what: str, module: nn.Module, x: torch.Tensor, backward: bool) -> list[dict]:
    """``module`` with stock attention vs SDPA ``bias`` / ``fold`` copies, timed in alternation."""
    rows = _attention_rows(bench, what, module, x, backward)
    _free(bench.device)
    return rows


def _attention_rows(bench: Any, what: str, module: nn.Module, x: torch.Tensor, backward: bool) -> list[dict]:
    from shared_nets.sam import enable_sdpa

    variants = {"stock": module}
    for mode in ("bias", "fold"):
        variants[mode] = enable_sdpa(copy.deepcopy(module), rel_pos_mode=mode)
    rows = {mode: {"what": what, "mode": mode} for mode in variants}
    for m in variants.values():
        m.eval()
    with torch.no_grad():
        fwd = bench.timed_many({mode: (lambda m=m: m(x)) for mode, m in variants.items()}, cheap=True)
    for mode in variants:
        rows[mode]["forward"] = fwd[mode]
    if backward:

        def fwd_bwd(m: nn.Module) -> None:
            m.zero_grad(set_to_none=True)
            m(x).float().pow(2).mean().backward()

        for m in variants.values():
            m.train()
        train = bench.timed_many({mode: (lambda m=m: fwd_bwd(m)) for mode, m in variants.items()}, cheap=True)
        for mode in variants:
            rows[mode]["train"] = train[mode]
    return list(rows.values())


def sdpa_encoder(bench: Any, variant: str, img_size: int, patch_size: int) -> list[dict[str, Any]]:
    """Whole SAM image encoder (batch 1), forward and forward+backward."""
    from shared_nets.sam import build_image_encoder

    what = f"encoder {variant}@{img_size}/p{patch_size}"
    try:
        enc = build_image_encoder(variant, img_size, patch_size).to(bench.device)
    except Exception as err:
        return [{"what": what, "error": _one_line(err)}]
    x = torch.randn(1, 3, img_size, img_size, device=bench.device)
    return _compare_attention(bench, what, enc, x, backward=True)


def sdpa_blocks(bench: Any, img_size: int, backward: bool) -> list[dict[str, Any]]:
    """One ViT-B block (global, and 14-token windows) at ``img_size`` (batch 1), rel-pos randomised."""
    from segment_anything.modeling.image_encoder import Block

    grid = img_size // 16
    rows: list[dict[str, Any]] = []
    for kind, window in (("global", 0), ("window 14", 14)):
        what = f"ViT-B block {kind} @{img_size}"
        try:
            blk = Block(768, 12, input_size=(grid, grid), use_rel_pos=True, window_size=window).to(bench.device)
            with torch.no_grad():
                for p in (blk.attn.rel_pos_h, blk.attn.rel_pos_w):
                    p.normal_(0, 0.02)
        except Exception as err:
            rows.append({"what": what, "error": _one_line(err)})
            continue
        x = torch.randn(1, grid, grid, 768, device=bench.device)
        rows += _compare_attention(bench, what, blk, x, backward)
        del blk
    return rows
