"""merge_peft / unmerge_peft over a model and export_merged_state_dict into stock segment_anything classes."""

from __future__ import annotations

import pytest
import torch

from shared_nets.peft import (
    Adapter3D,
    PeftLayer,
    export_merged_state_dict,
    find_unmergeable,
    inject_fact,
    inject_lora,
    inject_svd,
    merge_peft,
    unmerge_peft,
)
from shared_nets.sam import build_sam

_BLOCK_SVD = ("attn.proj", "mlp.lin1", "mlp.lin2", "neck")


def _inject(kind: str, sam) -> None:
    enc = sam.image_encoder
    if kind == "lora":
        inject_lora(enc, r=4, targets=("q", "k", "v"))
    elif kind == "fact":
        inject_fact(enc, rank=8)
    elif kind == "svd":
        inject_svd(enc)
    else:  # LoRA on qkv and singular-value tuning everywhere else in one model
        inject_lora(enc, r=4)
        inject_svd(enc, include=_BLOCK_SVD)


@pytest.mark.parametrize("kind", ["lora", "fact", "svd", "mixed"])
@pytest.mark.parametrize("merged_before", [False, True])
def test_export_loads_strictly_into_stock_sam(kind, merged_before, tiny_sam, images, perturb):
    _inject(kind, tiny_sam)
    assert perturb(tiny_sam) > 0
    enc = tiny_sam.image_encoder
    with torch.no_grad():
        adapted = enc(images)
    if merged_before:
        merge_peft(tiny_sam)
    weights_before = {k: v.clone() for k, v in tiny_sam.state_dict().items()}

    state = export_merged_state_dict(tiny_sam)

    assert not any(".base_layer." in k or "lora_" in k or "fact_" in k for k in state)
    assert not any(k.endswith((".scale", ".shift", ".U", ".S", ".Vh")) for k in state)
    # the model is left exactly as it was
    assert all(m.merged == merged_before for m in tiny_sam.modules() if isinstance(m, PeftLayer))
    after = tiny_sam.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())

    stock = build_sam("tiny", img_size=64).eval()
    stock.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stock.image_encoder(images), adapted, atol=1e-5, rtol=1e-5)


def test_merge_and_unmerge_counts_and_safe_merge(tiny_sam, images, perturb):
    _inject("mixed", tiny_sam)
    perturb(tiny_sam)
    n_layers = sum(isinstance(m, PeftLayer) for m in tiny_sam.modules())
    assert n_layers == 4 + 4 * 3 + 2
    assert merge_peft(tiny_sam) == n_layers and merge_peft(tiny_sam) == 0
    assert unmerge_peft(tiny_sam) == n_layers and unmerge_peft(tiny_sam) == 0
    qkv = tiny_sam.image_encoder.blocks[0].attn.qkv
    with torch.no_grad():
        qkv.lora_B["q"].weight[0, 0] = float("nan")
    weight = qkv.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        qkv.merge(safe_merge=True)
    assert not qkv.merged and torch.equal(qkv.weight, weight)


def test_export_refuses_or_drops_adapters(tiny_sam, images):
    inject_lora(tiny_sam.image_encoder, r=2)
    tiny_sam.image_encoder.blocks[0].adapter = Adapter3D(64, 8)
    assert find_unmergeable(tiny_sam) == ["image_encoder.blocks.0.adapter"]
    with pytest.raises(ValueError, match=r"image_encoder\.blocks\.0\.adapter.*drop_unmergeable=True"):
        export_merged_state_dict(tiny_sam)
    state = export_merged_state_dict(tiny_sam, drop_unmergeable=True)
    assert not any(".adapter." in k for k in state)
    stock = build_sam("tiny", img_size=64)
    stock.load_state_dict(state, strict=True)
    with torch.no_grad():
        # the adapter is not called by the stock Block, and LoRA is still at its identity init
        torch.testing.assert_close(stock.image_encoder(images), tiny_sam.image_encoder(images))
