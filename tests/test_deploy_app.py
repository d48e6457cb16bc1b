"""The MONAI Deploy app of the automatic bundles (MA-SAM, H-SAM, S-SAM): a DICOM series in, a DICOM SEG out.

The series is the real CT example (data/totalsegmentator_example) written with ``nifti_to_dicom``; the models
are the tiny demo networks, randomly initialised (``tools.init_model``): the SEGs are not anatomy, but they
vary over the volume, so a flipped or shifted axis would show.

* Always: the chain the app runs, without the SDK: the bundle read as the SDK's bundle operator reads it
  (``configs/deploy.json`` last, strict ``model.pt`` load into ``network``), bundle inference with
  ``output_dicom_seg`` → a SEG that reads back on the series' grid, equal to the NIfTI prediction.
* With ``$MONAI_DEPLOY_PYTHON`` (a Python that has ``monai-deploy-app-sdk``; ``.ci/run`` builds
  ``.venv-deploy``): ``python -m tools deploy_app`` for the three bundles in one subprocess (one Holoscan
  application); each SEG references the series and equals the chain's label map voxel for voxel.
  Skipped without it, except under CI (``$CI`` set), where it fails.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from shared_nets.deploy import bundle_parser, segment_names
from shared_nets.dicom import check_dicom_series, nifti_to_dicom, read_dicom_seg, series_grid
from tests.bundle_harness import run_workflow
from tests.conftest import REAL_CT

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("ma_sam", "h_sam", "s_sam")
CONFIGS = ["inference", "demo", "deploy"]  # the demo network, read as the Deploy app reads it
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage SOP class


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """The real CT written as an LPS DICOM series folder."""
    if not (REAL_CT / "ct.nii.gz").is_file():
        pytest.skip(f"real CT example not found at {REAL_CT} (data/totalsegmentator_example is not in this checkout)")
    out = tmp_path_factory.mktemp("deploy_series") / "ct_dicom"
    nifti_to_dicom(REAL_CT / "ct.nii.gz", out)
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Copies of the three bundles with the demo network's initial ``models/model.pt``."""
    from tools.init_model import write_initial_model

    base = tmp_path_factory.mktemp("deploy_bundles")
    roots = {}
    for name in BUNDLES:
        root = base / name
        shutil.copytree(REPO / "bundles" / name, root, ignore=shutil.ignore_patterns("models", "eval", "runs"))
        write_initial_model(root, [f"{c}.json" for c in CONFIGS])
        roots[name] = root
    return roots


def _channel_def(root: Path) -> dict[str, str]:
    names = segment_names(bundle_parser(root, CONFIGS))
    return {"0": "background", **{str(v): n for v, n in enumerate(names, start=1)}}


@pytest.fixture(scope="module")
def chain(bundles, series, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Per bundle: the SEG and NIfTI that bundle inference (``output_dicom_seg``, deploy configs) writes."""
    data = series.parent
    results = {}
    for name, root in bundles.items():
        out = tmp_path_factory.mktemp(f"chain_{name}")
        datalist = out / "datalist.json"
        datalist.write_text(json.dumps({"test": [{"image": str(series)}]}))
        overrides = {
            "dataset_dir": str(data),
            "data_list_file_path": str(datalist),
            "output_dir": str(out / "pred"),
            "output_dicom_seg": True,
        }
        run_workflow(root, [f"{c}.json" for c in CONFIGS], "infer", overrides)
        (seg,) = sorted((out / "pred").glob("*.dcm"))
        (nifti,) = sorted((out / "pred").glob("*.nii.gz"))
        results[name] = {"seg": seg, "nifti": nifti, "channel_def": _channel_def(root)}
    return results


@pytest.mark.parametrize("name", BUNDLES)
def test_deploy_config_gives_the_sdk_a_network_that_loads_model_pt_strictly(name, bundles):
    """The SDK builds ``network`` and loads ``models/model.pt`` with ``strict=True``; the bundles' ``network`` is
    ``Sequential(network_def, Softmax)`` (keys prefixed ``0.``), so without deploy.json the load fails."""
    import torch

    root = bundles[name]
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    parser = bundle_parser(root, CONFIGS)
    assert parser["bundle_root"] == str(root.resolve())  # S-SAM reads resources/ below it
    parser.get_parsed_content("network").load_state_dict(state, strict=True)
    plain = bundle_parser(root, ["inference", "demo"]).get_parsed_content("network")
    with pytest.raises(RuntimeError, match="Missing key"):
        plain.load_state_dict(state, strict=True)


def test_segment_names_need_gapless_label_values(bundles):
    """H-SAM's demo writes BTCV ids (values with gaps); the SDK's SEG writer numbers segments by value, so the
    app refuses that config naming the fix, and deploy.json switches it back to the network's own ids."""
    with pytest.raises(ValueError, match="must run 0..K without gaps.*output_btcv_ids"):
        segment_names(bundle_parser(bundles["h_sam"], ["inference", "demo"]))
    meta = json.loads((bundles["h_sam"] / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    expected = [channel_def[str(v)] for v in range(1, len(channel_def))]
    assert segment_names(bundle_parser(bundles["h_sam"], CONFIGS)) == expected


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_inference_writes_a_seg_on_the_series_grid(name, chain, series):
    """The chain without the SDK: the SEG references the series, reads back on its grid with the bundle's
    segment names, and holds the same labels as the NIfTI prediction written beside it."""
    result = chain[name]
    datasets = check_dicom_series(series)
    shape, affine = series_grid(datasets)
    label, label_affine = read_dicom_seg(result["seg"], series, result["channel_def"])
    assert label.shape == shape
    np.testing.assert_allclose(label_affine, affine, atol=1e-3)
    ds = pydicom.dcmread(result["seg"], stop_before_pixels=True)
    assert ds.SOPClassUID == SEG_STORAGE
    names = [result["channel_def"][str(v)] for v in range(1, len(result["channel_def"]))]
    assert [str(s.SegmentLabel) for s in ds.SegmentSequence] == names
    pred = nib.load(str(result["nifti"]))
    np.testing.assert_allclose(pred.affine, affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(pred.dataobj).reshape(shape), label)
    assert len(np.unique(label)) >= 2, f"{name}: constant prediction, the comparison would prove nothing"


def test_without_the_sdk_the_app_names_the_deploy_extra(bundles, series, tmp_path):
    """The module imports without the SDK (CI's main environment has none); using the app says what to install."""
    import importlib.util

    from shared_nets.deploy import app

    if importlib.util.find_spec("monai.deploy") is not None:
        pytest.skip("the MONAI Deploy App SDK is installed in this environment")
    with pytest.raises(ImportError, match=r"sam-adapter-bundles\[deploy\]"):
        app.run_app(bundles["ma_sam"], series, tmp_path / "out", CONFIGS)
    with pytest.raises(ImportError, match="MONAI Deploy App SDK"):
        app.BundleSegApp  # noqa: B018 - the attribute access is the test


def _deploy_python() -> str | None:
    """A Python with the MONAI Deploy App SDK: ``$MONAI_DEPLOY_PYTHON`` or ``.venv-deploy`` in the checkout."""
    candidates = [os.environ.get("MONAI_DEPLOY_PYTHON"), str(REPO / ".venv-deploy" / "bin" / "python")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def _big_stack() -> None:  # Holoscan asks for a 32 MB stack (it warns of crashes below it)
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = 32 * 1024 * 1024
    if soft != resource.RLIM_INFINITY and soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
        resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


def test_sdk_app_turns_the_series_into_the_same_segs(bundles, series, chain, tmp_path):
    python = _deploy_python()
    if python is None:
        reason = "no MONAI Deploy App SDK environment: set $MONAI_DEPLOY_PYTHON (.ci/run builds .venv-deploy)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must run the Deploy app test.")
        pytest.skip(reason)
    out = tmp_path / "out"
    cmd = [python, "-m", "tools", "deploy_app", "--bundle", ",".join(str(bundles[n]) for n in BUNDLES)]
    cmd += ["--input", str(series), "--output", str(out), "--configs", ",".join(CONFIGS)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, preexec_fn=_big_stack
    )
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    source_uid = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    for name in BUNDLES:
        files = sorted((out / name).glob("*.dcm"))
        assert len(files) == 1, f"{name}: {files}\n{proc.stderr[-3000:]}"
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.SOPClassUID == SEG_STORAGE
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid
        channel_def = chain[name]["channel_def"]
        got, got_affine = read_dicom_seg(files[0], series, channel_def)
        want, want_affine = read_dicom_seg(chain[name]["seg"], series, channel_def)
        np.testing.assert_allclose(got_affine, want_affine, atol=1e-6)
        assert len(np.unique(want)) >= 2
        np.testing.assert_array_equal(got, want, err_msg=f"{name}: SDK app and bundle inference differ")
