"""FSDP training switch of the ViT-H bundles (``use_fsdp`` in ``configs/multi_gpu_train.json``).

``torchrun --nproc_per_node 2`` on CPU (gloo, FSDP2 ``fully_shard`` over a CPU device mesh), tiny SAM,
phantoms, one epoch of one step with validation: the FSDP run's loss equals the DDP run's, the
``model.pt`` and ``checkpoint_final.pt`` it writes hold the full (gathered) weights, equal to the DDP run's
and loadable into the plain network, and the checkpoint's optimizer state is the full one.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.bundle_harness import REPO, child_env, torchrun_bundle_command

BUNDLES = {"ma_sam": {"img_size": 64, "sw_batch_size": 8, "val_sw_batch_size": 8}, "med_sa": {}}


def _train(root: Path, data: Path, overrides: dict, use_fsdp: bool) -> tuple[list[float], Path]:
    models = root / "models"
    shutil.rmtree(models, ignore_errors=True)
    overrides = {"dataset_dir": str(data), "max_epochs": 1, "val_interval": 1, "use_fsdp": str(use_fsdp), **overrides}
    args = torchrun_bundle_command(root, ["train.json", "multi_gpu_train.json", "demo.json"], overrides)
    env = child_env()
    proc = subprocess.run(args, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"train_loss: ([-0-9.eE+na]+)", proc.stdout + proc.stderr)]
    out = root.parent / f"models_fsdp_{use_fsdp}"
    shutil.copytree(models, out)
    return losses, out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_fsdp_training_step_equals_ddp_and_saves_full_weights(name, demo_data, tmp_path):
    from monai.bundle import ConfigParser

    data = tmp_path / "data"  # two ranks need two validation volumes
    shutil.copytree(demo_data, data, symlinks=True)
    content = json.loads((data / "datalist.json").read_text())
    content["validation"] = content["validation"] + content["test"]
    (data / "datalist.json").write_text(json.dumps(content))
    root = tmp_path / name
    shutil.copytree(REPO / "bundles" / name, root, ignore=shutil.ignore_patterns("models", "eval", "runs"))

    fsdp_losses, fsdp = _train(root, data, BUNDLES[name], True)
    ddp_losses, ddp = _train(root, data, BUNDLES[name], False)
    assert fsdp_losses and all(math.isfinite(v) for v in fsdp_losses)
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-3)

    parser = ConfigParser()
    parser.read_config([str(root / "configs" / c) for c in ("train.json", "demo.json")])
    parser.update({"bundle_root": str(root), "dataset_dir": str(data), **BUNDLES[name]})
    net = parser.get_parsed_content("network_def")
    for file in ("model.pt", "checkpoint_final.pt"):
        got = torch.load(fsdp / file, map_location="cpu", weights_only=False)
        ref = torch.load(ddp / file, map_location="cpu", weights_only=False)
        got_model, ref_model = (got["model"], ref["model"]) if "model" in got else (got, ref)
        assert sorted(got_model) == sorted(ref_model) == sorted(net.state_dict())
        for key, value in got_model.items():
            assert type(value) is torch.Tensor  # gathered, not a DTensor shard
            torch.testing.assert_close(value, ref_model[key], rtol=1e-4, atol=1e-6, msg=f"{file}: {key}")
        net.load_state_dict(got_model, strict=True)
    # the full optimizer state: keyed by parameter name, every trainable parameter's moments
    optim = torch.load(fsdp / "checkpoint_final.pt", map_location="cpu", weights_only=False)["optimizer"]
    trainable = {k for k, p in net.named_parameters() if p.requires_grad}
    assert set(optim["state"]) <= trainable and len(optim["state"]) > 0
    assert all(type(s["exp_avg"]) is torch.Tensor for s in optim["state"].values())


def test_use_fsdp_from_the_command_line_is_read_as_a_boolean():
    """``--use_fsdp false`` reaches the config as the string "false", which must not switch FSDP on."""
    import torch.distributed as dist

    from shared_nets.distributed import FullyShardedModel, wrap_for_training

    with pytest.raises(ValueError, match="use_fsdp must be true or false"):
        wrap_for_training(torch.nn.Linear(2, 2), torch.device("cpu"), use_fsdp="maybe")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = wrap_for_training(torch.nn.Linear(2, 2), torch.device("cpu"), use_fsdp="false")
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        fsdp = wrap_for_training(torch.nn.Linear(2, 2), torch.device("cpu"), use_fsdp="true")
        assert isinstance(fsdp, FullyShardedModel)
    finally:
        dist.destroy_process_group()
