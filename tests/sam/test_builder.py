"""shared_nets.sam: variants, builder at any img_size, official-checkpoint loading and errors."""

from __future__ import annotations

import pytest
import torch
from segment_anything import build_sam_vit_b
from segment_anything.modeling import Sam

from shared_nets.sam import (
    SAM_VARIANTS,
    SamCheckpointError,
    build_sam,
    check_sam_layout,
    expand_mask_tokens,
    infer_variant,
    resize_pos_embed,
    resize_rel_pos,
)


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_tiny_has_the_documented_size():
    sam = build_sam("tiny", img_size=64)
    assert isinstance(sam, Sam)
    assert _n_params(sam) == 305_036


@pytest.mark.parametrize("img_size", [32, 64, 128])
def test_tiny_runs_at_any_multiple_of_16(img_size):
    sam = build_sam("tiny", img_size=img_size)
    x = torch.randn(2, 3, img_size, img_size)
    emb = sam.image_encoder(x)
    assert emb.shape == (2, 32, img_size // 16, img_size // 16)


def test_tiny_patch8_gives_a_finer_grid():
    sam = build_sam("tiny", img_size=64, patch_size=8)
    assert sam.image_encoder(torch.randn(1, 3, 64, 64)).shape == (1, 32, 8, 8)
    assert sam.prompt_encoder.image_embedding_size == (8, 8)


@pytest.mark.parametrize("img_size", [0, 100, 1000, 16.0])
def test_img_size_not_divisible_by_16_is_rejected(img_size):
    with pytest.raises(ValueError, match="divisible by 16"):
        build_sam("tiny", img_size=img_size)


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant must be one of"):
        build_sam("vit_x")


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    """A state dict produced by segment_anything's own builder (random init), saved as Meta does."""
    torch.manual_seed(0)
    stock = build_sam_vit_b()
    # random init leaves position tables at zero; give them values so resizing is exercised
    with torch.no_grad():
        for name, p in stock.image_encoder.named_parameters():
            if "pos" in name:
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_random.pth"
    torch.save(stock.state_dict(), path)
    return stock.eval(), path


def test_parity_with_stock_sam_at_1024(vit_b_checkpoint, torch_threads):
    stock, path = vit_b_checkpoint
    ours = build_sam("vit_b", checkpoint=path, img_size=1024).eval()
    torch.manual_seed(1)
    image = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        e_stock = stock.image_encoder(image)
        e_ours = ours.image_encoder(image)
        assert (e_stock - e_ours).abs().max().item() < 1e-5
        points = (torch.tensor([[[500.0, 400.0]]]), torch.tensor([[1]]))

        def masks(sam, emb):  # Sam.forward without re-running the 13 s encoder
            sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
            return sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True)[0]

        m_stock, m_ours = masks(stock, e_stock), masks(ours, e_ours)
    assert (m_stock - m_ours).abs().max().item() < 1e-5


@pytest.mark.parametrize("img_size", [512, 256])
def test_checkpoint_loads_strictly_at_other_sizes(vit_b_checkpoint, img_size):
    stock, path = vit_b_checkpoint
    ours = build_sam("vit_b", checkpoint=path, img_size=img_size)
    g = img_size // 16
    assert ours.image_encoder.pos_embed.shape == (1, g, g, 768)
    # global blocks get resized rel-pos tables, windowed blocks keep the 14-token ones
    assert ours.image_encoder.blocks[2].attn.rel_pos_h.shape == (2 * g - 1, 64)
    assert ours.image_encoder.blocks[0].attn.rel_pos_h.shape == (27, 64)
    torch.testing.assert_close(
        ours.image_encoder.blocks[0].attn.rel_pos_h, stock.image_encoder.blocks[0].attn.rel_pos_h
    )
    torch.testing.assert_close(ours.image_encoder.patch_embed.proj.weight, stock.image_encoder.patch_embed.proj.weight)
    # the resized table is an interpolation of the original, not a fresh init
    resized = resize_pos_embed(stock.image_encoder.pos_embed.detach(), (g, g))
    torch.testing.assert_close(ours.image_encoder.pos_embed.detach(), resized)


def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(SamCheckpointError, match=r"nope\.pth' does not exist"):
        build_sam("tiny", checkpoint=missing, img_size=64)


def test_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("this is not a checkpoint")
    with pytest.raises(SamCheckpointError, match=r"notes\.pth' is not a readable PyTorch checkpoint"):
        build_sam("tiny", checkpoint=bad, img_size=64)


def test_checkpoint_without_tensors(tmp_path):
    bad = tmp_path / "config.pth"
    torch.save({"lr": 0.1}, bad)
    with pytest.raises(SamCheckpointError, match="does not hold a state dict"):
        build_sam("tiny", checkpoint=bad, img_size=64)


def test_checkpoint_of_another_variant(tmp_path):
    tiny = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny", img_size=64).state_dict(), tiny)
    with pytest.raises(SamCheckpointError, match=r"is a tiny checkpoint; expected a vit_b checkpoint"):
        build_sam("vit_b", checkpoint=tiny, img_size=256)


def test_tiny_checkpoint_roundtrip_and_nested_state_dict(tmp_path):
    torch.manual_seed(0)
    src = build_sam("tiny", img_size=64)
    path = tmp_path / "tiny.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = build_sam("tiny", checkpoint=path, img_size=128)
    torch.testing.assert_close(dst.mask_decoder.mask_tokens.weight, src.mask_decoder.mask_tokens.weight)
    assert infer_variant(src.state_dict()) == "tiny"


def test_resizers():
    pe = torch.randn(1, 8, 8, 4)
    assert resize_pos_embed(pe, (8, 8)) is pe
    pooled = resize_pos_embed(pe, (4, 4), mode="avgpool")
    torch.testing.assert_close(pooled[0, 0, 0], pe[0, :2, :2].mean(dim=(0, 1)))
    with pytest.raises(ValueError, match="integer factor"):
        resize_pos_embed(pe, (3, 3), mode="avgpool")
    rp = torch.randn(15, 6)
    assert resize_rel_pos(rp, 31).shape == (31, 6)
    assert resize_rel_pos(rp, 15) is rp


def test_expand_mask_tokens_keeps_pretrained_tokens():
    torch.manual_seed(0)
    sam = build_sam("tiny", img_size=64)
    old_tokens = sam.mask_decoder.mask_tokens.weight.detach().clone()
    expand_mask_tokens(sam.mask_decoder, 9)
    dec = sam.mask_decoder
    assert dec.num_mask_tokens == 9 and len(dec.output_hypernetworks_mlps) == 9
    torch.testing.assert_close(dec.mask_tokens.weight[:4], old_tokens)
    torch.testing.assert_close(dec.mask_tokens.weight[4:8], old_tokens)
    emb = torch.randn(1, 32, 4, 4)
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    masks, iou = dec.predict_masks(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense)
    assert masks.shape == (1, 9, 16, 16) and iou.shape == (1, 9)


def test_build_with_num_multimask_outputs_and_checkpoint(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny", img_size=64).state_dict(), path)
    sam = build_sam("tiny", checkpoint=path, img_size=64, num_multimask_outputs=13)
    assert sam.mask_decoder.num_mask_tokens == 14


def test_registry_lists_official_files():
    assert SAM_VARIANTS["vit_b"].url.endswith("sam_vit_b_01ec64.pth")
    assert SAM_VARIANTS["vit_h"].md5.startswith("4b8939")
    assert SAM_VARIANTS["tiny"].url is None


def test_check_sam_layout_names_what_differs():
    """The layout check for files without a published checksum: exact keys and shapes of SAM at 1024²."""
    good = build_sam("tiny").state_dict()
    check_sam_layout(good, "tiny", source="f.pth")
    with pytest.raises(SamCheckpointError, match=r"f.pth is a tiny checkpoint; expected the vit_b layout"):
        check_sam_layout(good, "vit_b", source="f.pth")
    missing = {k: v for k, v in good.items() if k != "mask_decoder.mask_tokens.weight"}
    with pytest.raises(SamCheckpointError, match=r"missing keys \['mask_decoder.mask_tokens.weight'\]"):
        check_sam_layout(missing, "tiny", source="f.pth")
    resized = {**good, "image_encoder.pos_embed": good["image_encoder.pos_embed"][:, :8, :8]}
    with pytest.raises(SamCheckpointError, match=r"other shapes \['image_encoder.pos_embed \(1, 8, 8, 64\)"):
        check_sam_layout(resized, "tiny", source="f.pth")
    with pytest.raises(ValueError, match="plain-ViT"):
        check_sam_layout(good, "lite", source="f.pth")
