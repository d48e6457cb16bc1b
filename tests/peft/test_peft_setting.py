"""The shared ``peft`` setting: every method injects, starts at SAM, trains exactly its parameters, merges or not."""

from __future__ import annotations

import copy

import pytest
import torch

from shared_nets.peft import (
    PEFT_METHODS,
    SVD_TARGETS_TINY_VIT,
    SVD_TARGETS_VIT,
    AttentionAdapter,
    MlpAdapter,
    apply_peft,
    check_peft,
    export_merged_state_dict,
    find_unmergeable,
    freeze_except,
    inject_adapters,
    merge_peft,
    svd_targets,
)
from shared_nets.sam import build_sam

IMG = 64
PREFIX = "image_encoder."

#: Which encoder parameters each method trains, by a name test independent of the returned globs.
EXPECTED = {
    "lora": lambda n: ".lora_A." in n or ".lora_B." in n,
    "fact": lambda n: ".fact_cores." in n or ".fact_factors." in n,
    "svd": lambda n: n.endswith((".scale", ".shift")),
    "adapter": lambda n: ".attn_adapter." in n or ".mlp_adapter." in n,
    "full": lambda n: n.startswith(PREFIX),
    "frozen": lambda n: False,
}


def _sam(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam(variant, img_size=IMG).eval()


def _images() -> torch.Tensor:
    return torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _perturb_trainable(model: torch.nn.Module, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def test_check_peft():
    for m in PEFT_METHODS:
        assert check_peft(m) == m
    with pytest.raises(ValueError, match=r"^peft must be one of \['lora', .*got 'LoRA'\.$"):
        check_peft("LoRA")
    with pytest.raises(ValueError, match="finetune must be one of"):
        check_peft(None, name="finetune")
    with pytest.raises(ValueError, match="peft must be one of"):
        apply_peft(_sam("tiny").image_encoder, "prefix")


def test_svd_targets_per_encoder():
    from shared_nets.s_sam import builder as s_sam_builder

    assert svd_targets(_sam("tiny")) == SVD_TARGETS_VIT == s_sam_builder._SVD_TARGETS
    assert svd_targets(_sam("lite").image_encoder) == SVD_TARGETS_TINY_VIT == s_sam_builder._SVD_TARGETS_TINY_VIT
    enc = _sam("tiny").image_encoder
    enc.neck = torch.nn.ModuleDict()  # no Sequential conv neck: "neck" is left out
    assert svd_targets(enc) == SVD_TARGETS_VIT[:-1]
    for blk in enc.blocks:
        blk.mlp = torch.nn.Identity()
    with pytest.raises(ValueError, match="svd_include"):
        svd_targets(enc)


@pytest.mark.parametrize("variant", ["tiny", "lite"])
@pytest.mark.parametrize("peft", PEFT_METHODS)
def test_apply_peft(variant, peft):
    sam = _sam(variant)
    x = _images()
    with torch.no_grad():
        ref = sam.image_encoder(x)
    globs = apply_peft(sam.image_encoder, peft, fact_rank=8, prefix=PREFIX)
    assert all(g.startswith(PREFIX) for g in globs)
    # every method starts at SAM (LoRA B, FacT V, adapter up-projections zero; SVD exact at a=1, b=0)
    with torch.no_grad():
        torch.testing.assert_close(sam.image_encoder(x), ref, rtol=0, atol=1e-5)

    freeze_except(sam, globs)
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    expected = {n for n, _ in sam.named_parameters() if EXPECTED[peft](n)}
    assert trainable == expected
    assert (len(trainable) == 0) == (peft == "frozen")

    if peft != "frozen":
        sam.image_encoder(x).square().mean().backward()
        with_grad = {n for n, p in sam.named_parameters() if p.grad is not None}
        assert with_grad == trainable
        assert any(p.grad.abs().sum() > 0 for p in sam.parameters() if p.grad is not None)

    _perturb_trainable(sam)
    with torch.no_grad():
        out = sam.image_encoder(x)
    if peft != "frozen":
        assert (out - ref).abs().max() > 1e-3  # the injected pieces act on the output
    unmergeable = find_unmergeable(sam)
    if peft == "adapter":
        assert merge_peft(sam) == 0
        assert len(unmergeable) == 2 * len(sam.image_encoder.blocks)
        assert all(n.endswith(("attn_adapter", "mlp_adapter")) for n in unmergeable)
        with torch.no_grad():
            torch.testing.assert_close(sam.image_encoder(x), out)  # adapters stay modules and keep acting
    else:
        assert unmergeable == []
        merged = merge_peft(sam)
        assert (merged > 0) == (peft in ("lora", "fact", "svd"))
        with torch.no_grad():
            torch.testing.assert_close(sam.image_encoder(x), out, rtol=1e-4, atol=1e-4)


def test_apply_peft_lora_fact_options():
    sam = _sam("tiny")
    globs = apply_peft(sam, "lora", lora_rank=2, lora_alpha=4.0, targets=("q", "k", "v"))
    assert globs == ["*.lora_*"]
    qkv = sam.image_encoder.blocks[0].attn.qkv
    assert qkv.r == 2 and qkv.scaling == 2.0 and qkv.targets == ("q", "k", "v")
    sam = _sam("lite")
    apply_peft(sam.image_encoder, "fact", fact_rank=4, fact_dropout=0.0, fact_scale=0.5)
    qkv = sam.image_encoder.blocks[0].attn.qkv
    assert qkv.rank == 4 and qkv.scale == 0.5 and sorted(sam.image_encoder.fact_factors) == ["128", "160", "320"]
    sam = _sam("tiny")
    assert apply_peft(sam.image_encoder, "svd", svd_include=("attn.proj",)) == ["*.scale", "*.shift"]
    assert sum(n.endswith(".scale") for n, _ in sam.named_parameters()) == len(sam.image_encoder.blocks)


def test_adapters_widths_and_placement_on_tiny_vit():
    enc = _sam("lite").image_encoder
    adapters = inject_adapters(enc, ratio=0.25, act="gelu", scale=0.5)
    assert len(adapters) == 2 * len(enc.blocks) == 20
    for blk in enc.blocks:
        dim = blk.attn.norm.normalized_shape[0]
        assert isinstance(blk.attn_adapter, AttentionAdapter) and blk.attn_adapter.skip
        assert isinstance(blk.mlp_adapter, MlpAdapter) and not blk.mlp_adapter.skip
        assert blk.mlp_adapter.norm_input and blk.mlp_adapter.scale == 0.5
        assert blk.attn_adapter.down.out_features == round(dim * 0.25) and blk.mlp_adapter.dim == dim
    # the parallel MLP adapter reads the MLP's normalised input, as Med-SA's TinyViT block does
    blk = enc.blocks[0]
    torch.nn.init.normal_(blk.mlp_adapter.up.weight)
    tokens = torch.randn(1, 4, 4, blk.mlp_adapter.dim)
    with torch.no_grad():
        plain = blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(blk.mlp.norm(tokens))))
        torch.testing.assert_close(blk.mlp(tokens), plain + blk.mlp_adapter(blk.mlp.norm(tokens)))
    with pytest.raises(ValueError, match="once per encoder"):
        inject_adapters(enc)
    with pytest.raises(ValueError, match=r"adapter ratio must be a number in \(0, 1\]"):
        inject_adapters(_sam("tiny"), ratio=0)


def test_adapters_deepcopy_is_independent():
    enc = _sam("tiny").image_encoder
    inject_adapters(enc)
    x = _images()
    with torch.no_grad():
        ref = enc(x)
    twin = copy.deepcopy(enc)
    for blk in twin.blocks:
        hooks = list(blk.attn._forward_hooks.values()) + list(blk.mlp._forward_hooks.values())
        assert [h.__self__ for h in hooks] == [blk.attn_adapter, blk.mlp_adapter]
    with torch.no_grad():
        for blk in twin.blocks:
            torch.nn.init.normal_(blk.attn_adapter.up.weight)
            torch.nn.init.normal_(blk.mlp_adapter.up.weight)
        changed = twin(x)
        torch.testing.assert_close(enc(x), ref, rtol=0, atol=0)  # the original's adapters are untouched
    assert (changed - ref).abs().max() > 1e-3


def test_adapters_export_without_them_loads_into_stock_sam():
    sam = _sam("tiny")
    apply_peft(sam.image_encoder, "adapter")
    with pytest.raises(ValueError, match="cannot be folded"):
        export_merged_state_dict(sam)
    stock = build_sam("tiny", img_size=IMG)
    stock.load_state_dict(export_merged_state_dict(sam, drop_unmergeable=True), strict=True)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(stock.eval().image_encoder(x), sam.image_encoder(x))  # zero-init adapters


def test_adapters_survive_sdpa_and_gradient_checkpointing():
    from shared_nets.sam import enable_gradient_checkpointing, enable_sdpa

    sam = _sam("tiny")
    freeze_except(sam, apply_peft(sam.image_encoder, "adapter"))
    _perturb_trainable(sam)
    x = _images()
    with torch.no_grad():
        ref = sam.image_encoder(x)
    enable_sdpa(sam.image_encoder)
    enable_gradient_checkpointing(sam.image_encoder.blocks)
    sam.train()
    out = sam.image_encoder(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.square().mean().backward()
    assert all(p.grad is not None for p in sam.parameters() if p.requires_grad)
