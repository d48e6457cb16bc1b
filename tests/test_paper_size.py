"""Paper-size smoke test per bundle: ViT-B at the paper's image size, one training iteration and
one inference on a real CT, through the bundle's own ``train.json`` / ``inference.json``.

What each bundle runs (:data:`tests.paper_size.SETTINGS`): random weights (no checkpoint), batch
size 1, one sample, one epoch without validation; the real abdominal CT example from
``data/totalsegmentator_example`` cropped to a few slices, which the bundle's own transforms resize in-plane to the
paper's size (MA-SAM 512 px x 5 slices, Med-SA 1024 px, S-SAM 256 px, H-SAM 512 px, 3DSAM-adapter
with SAM at 512 px). Cut for CI's budget (about 8 minutes and 24 GB on 2 cores for the five):
Med-SA runs 2 slices instead of the paper's 16, with ``gradient_checkpointing`` on (2 slices
without it peak near 20 GiB RSS); 3DSAM-adapter resizes slices to 256 px for SAM instead of 512
(a 16^3 token grid instead of 32^3). The
full settings are measured with ``python -m tests.paper_size --full`` (bundle READMEs).
Training and inference each run in a child process (peak RSS from
``os.wait4``), the inference child loading the ``model.pt`` the training child wrote.

The tests assert that both runs finish, the loss is finite, the prediction keeps the input's
shape and affine, and the networks use the SDPA attention; the printed peak RSS and times are
what the bundle READMEs' "Paper-size smoke run" tables report.
"""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from tests.paper_size import REAL_CT, SETTINGS, run_bundle
from tests.workers import cores_per_worker

pytestmark = pytest.mark.slow
MIB_LIMIT = 20 * 1024  # each run must fit in CI's 24 GB with room to spare


@pytest.mark.parametrize("bundle", list(SETTINGS))
def test_paper_size_train_iteration_and_inference(bundle, tmp_path):
    if not (REAL_CT / "ct.nii.gz").is_file():
        pytest.skip("real CT example absent: no data/totalsegmentator_example/ct.nii.gz (nor a ../shared copy)")
    res = run_bundle(bundle, tmp_path, threads=cores_per_worker(), timeout=900)
    for workflow in ("train", "infer"):
        run = res.get(workflow)
        assert run is not None, f"{workflow} did not run"
        assert run["status"] == 0, f"{bundle} {workflow} failed ({run['status']}):\n" + open(run["log"]).read()[-4000:]
        assert run["peak_rss_mib"] < MIB_LIMIT
        # 3DSAM-adapter's 3D window attention always uses scaled_dot_product_attention (no SAM Attention left)
        assert run["sdpa"] or bundle == "sam3d_adapter"
        print(f"{bundle} {workflow}: {res['slices']} slices, peak RSS {run['peak_rss_mib']:.0f} MiB, "
              f"{run['wall_s']:.0f} s (workflow {run['time_s']:.0f} s)")  # fmt: skip
    losses = res["train"]["losses"]
    assert len(losses) == 1 and math.isfinite(losses[0])
    data = res["data_dir"]
    src = nib.load(f"{data}/ct.nii.gz")
    preds = sorted((tmp_path / "data" / "pred").rglob("*.nii.gz"))
    assert preds, f"no prediction written: {json.dumps(res['infer'])}"
    pred = nib.load(str(preds[0]))
    assert pred.shape[:3] == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
