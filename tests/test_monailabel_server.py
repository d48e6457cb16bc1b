"""A real MONAI Label server serving and training our bundles (no mocks).

``python -m tools label_app`` assembles MONAI Label's ``monaibundle`` sample app with the five bundles
(``tiny`` variants, initial ``model.pt``, phantom datastore); this module starts ``monailabel
start_server`` on 127.0.0.1 with it and talks to the REST API over HTTP: ``/info/``, automatic and
prompted ``/infer/<model>``, ``/train/<model>`` and bad requests.

The server is started by ``tests/label_server.py`` (MONAI Label's own environment, skipped without
it except under CI).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.label_server import Response, Server, start_label_server


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    """The assembled app served by a real MONAI Label on a free loopback port (stopped after the module)."""
    srv = start_label_server(tmp_path_factory.mktemp("monailabel"))
    try:
        yield srv
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _channel_def(server: Server, model: str) -> dict[int, str]:
    meta = json.loads((server.app / "model" / model / "configs" / "metadata.json").read_text())
    pred = next(iter(meta["network_data_format"]["outputs"].values()))
    return {int(k): v for k, v in pred["channel_def"].items()}


def _label_map(server: Server, response: Response, tmp_path: Path, image: str, model: str) -> np.ndarray:
    """Check a returned label map against the input volume (shape, affine, values); return its array."""
    assert response.status == 200, f"{model}: HTTP {response.status}: {response.body[:500]!r}\n{server.log_tail()}"
    out = tmp_path / f"{model}_{uuid.uuid4().hex[:8]}.nii.gz"
    out.write_bytes(response.body)
    pred, ref = nib.load(str(out)), nib.load(str(server.studies / f"{image}.nii.gz"))
    assert pred.shape == ref.shape, f"{model}: label shape {pred.shape} != volume shape {ref.shape}"
    np.testing.assert_allclose(
        pred.affine, ref.affine, atol=1e-4, err_msg=f"{model}: label affine differs from the volume's"
    )
    arr = np.asarray(pred.dataobj)
    assert np.all(arr == np.round(arr)), f"{model}: non-integer label values"
    values = set(np.unique(arr).astype(int).tolist())
    allowed = set(_channel_def(server, model))
    assert values <= allowed, (
        f"{model}: label values {sorted(values - allowed)} are not in channel_def {sorted(allowed)}"
    )
    return arr.astype(np.int64)


def _organ_click(server: Server, image: str, label: int) -> list[int]:
    """A voxel of organ ``label`` in the datastore's label of ``image`` (its most central one)."""
    lab = np.asarray(nib.load(str(server.studies / "labels" / "final" / f"{image}.nii.gz")).dataobj)
    idx = np.argwhere(lab == label)
    centre = idx.mean(0)
    return idx[np.argmin(((idx - centre) ** 2).sum(1))].astype(int).tolist()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------
def test_info_lists_every_bundle_with_its_type_and_labels(server):
    from tools.label_app import APP_MODELS

    info = server.request("GET", "/info/").json()
    assert set(info["models"]) == set(APP_MODELS), f"served models {sorted(info['models'])}"
    for name, spec in APP_MODELS.items():
        model = info["models"][name]
        assert model["type"] == ("deepgrow" if spec.prompted else "segmentation"), f"{name}: type {model['type']}"
        expected = {v.lower(): k for k, v in _channel_def(server, name).items() if v.lower() != "background"}
        assert model["labels"] == expected, f"{name}: labels {model['labels']}"
    assert {"ma_sam", "h_sam", "s_sam"} <= set(info["trainers"]), f"trainers {sorted(info['trainers'])}"
    assert "sam_2d" not in info["models"]  # sam2 off: nothing downloads weights


@pytest.mark.parametrize("model", ["ma_sam", "h_sam", "s_sam"])
def test_automatic_bundle_segments_a_datastore_volume(server, tmp_path, model):
    arr = _label_map(server, server.infer(model, image="phantom_001"), tmp_path, "phantom_001", model)
    assert arr.any(), f"{model}: empty segmentation"


def test_automatic_bundle_segments_an_uploaded_volume(server, tmp_path):
    """Clients that do not share the datastore upload the volume; the answer is in that volume's space."""
    response = server.infer("h_sam", file=server.studies / "phantom_002.nii.gz")
    _label_map(server, response, tmp_path, "phantom_002", "h_sam")


@pytest.mark.parametrize("model", ["med_sa_deepgrow", "sam3d_adapter_deepgrow"])
def test_prompted_bundle_follows_the_clicks(server, tmp_path, model):
    liver, spleen = _organ_click(server, "phantom_000", 6), _organ_click(server, "phantom_000", 1)
    first = _label_map(
        server,
        server.infer(model, "phantom_000", {"foreground": [liver], "background": []}),
        tmp_path,
        "phantom_000",
        model,
    )
    assert set(np.unique(first)) <= {0, 1}
    again = _label_map(
        server,
        server.infer(model, "phantom_000", {"foreground": [liver], "background": []}),
        tmp_path,
        "phantom_000",
        model,
    )
    np.testing.assert_array_equal(
        first, again, err_msg=f"{model}: same clicks, different answers (state kept between requests?)"
    )
    second = _label_map(
        server,
        server.infer(model, "phantom_000", {"foreground": [liver, spleen], "background": []}),
        tmp_path,
        "phantom_000",
        model,
    )
    changed = np.argwhere(first != second)
    assert len(changed), f"{model}: an added click did not change the segmentation"
    # the change is where the new click is: its slice (Med-SA decodes per slice) / its 3D patch (3DSAM-adapter)
    near = np.abs(changed - np.asarray(spleen)).max(1)
    if model == "med_sa_deepgrow":
        assert np.any(changed[:, 2] == spleen[2]), f"{model}: the new click's slice {spleen[2]} did not change"
    else:
        assert np.any(near <= 16), f"{model}: nothing changed within 16 voxels of the new click {spleen}"


def test_ma_sam_box_prompt(server, tmp_path):
    model = "ma_sam_box_deepgrow"
    arr = _label_map(
        server, server.infer(model, "phantom_000", {"roi": [30, 20, 8, 58, 50, 22]}), tmp_path, "phantom_000", model
    )
    assert set(np.unique(arr)) <= {0, 1}
    bad = server.infer(model, "phantom_000", {"roi": [30, 20, 8, 58]})
    assert bad.status == 400 and "roi" in bad.json()["detail"], bad.body[:300]


def test_train_writes_the_model_that_the_next_infer_uses(server, tmp_path):
    model_pt = server.app / "model" / "ma_sam" / "models" / "model.pt"
    before_hash = _md5(model_pt)
    before = _label_map(server, server.infer("ma_sam", image="phantom_003"), tmp_path, "phantom_003", "ma_sam")
    body = {"max_epochs": 2, "val_split": 0.5, "device": "cpu", "multi_gpu": False, "pretrained": True}
    response = server.request("POST", "/train/ma_sam?run_sync=true", body=body)
    assert response.status == 200, f"train: HTTP {response.status}: {response.body[:500]!r}\n{server.log_tail()}"
    assert _md5(model_pt) != before_hash, f"train did not write a new model.pt:\n{server.log_tail()}"
    after = _label_map(server, server.infer("ma_sam", image="phantom_003"), tmp_path, "phantom_003", "ma_sam")
    assert np.any(before != after), "infer after training gave the same segmentation: the new model.pt was not used"


@pytest.mark.parametrize(
    "model, image, params, file, expected",
    [
        ("no_such_model", "phantom_000", {}, None, "no model 'no_such_model'"),
        ("ma_sam", None, {}, b"this is not a NIfTI volume", "not a gzip file"),
        ("med_sa_deepgrow", "phantom_000", {"foreground": "abc"}, None, "prompt 'foreground' must be a list"),
        ("med_sa_deepgrow", "phantom_000", {"foreground": [[1, 2]]}, None, "prompt 'foreground' must be a list"),
        ("med_sa_deepgrow", "phantom_000", {"foreground": [], "background": []}, None, "no prompt"),
        (
            "sam3d_adapter_deepgrow",
            "phantom_000",
            {"foreground": [[500, 5, 5]]},
            None,
            "outside the image of spatial shape (64, 64, 24)",
        ),
    ],
    ids=[
        "unknown-model",
        "unreadable-volume",
        "prompt-not-a-list",
        "click-with-two-coords",
        "no-prompt",
        "click-outside",
    ],
)
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(server, model, image, params, file, expected):
    response = server.infer(model, image=image, params=params, file=file)
    assert response.status == 400, f"HTTP {response.status}: {response.body[:300]!r}"
    detail = response.json()["detail"]
    assert expected in detail, f"error message {detail!r} does not say {expected!r}"
    assert "\n" not in detail.strip()
    assert server.request("GET", "/info/").status == 200


# ------------------------------------------------------------------------------------------
# hostile requests: oversized uploads, paths out of the datastore
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["huge_header", "gzip_bomb"])
def test_oversized_upload_is_refused_with_the_reason(server, tmp_path, kind):
    """A 352-byte NIfTI claiming 4096^3 voxels, and 8 MB of .nii.gz inflating to 8 GiB: 400 with the reason, from
    the headers (the bundle's ``CheckVolumeSized``), and the server answers normally afterwards."""
    from tests.reliability.hostile_files import gzip_bomb, huge_header_nifti

    if kind == "huge_header":
        path = huge_header_nifti(tmp_path / "huge.nii")
        expected = "is too large: its header gives shape (4096, 4096, 4096)"
    else:
        path, expected = gzip_bomb(tmp_path / "bomb.nii.gz", zeros_gib=8), "decompresses to more than its header's"
    response = server.infer("ma_sam", file=path, filename=path.name)
    assert response.status == 400, f"HTTP {response.status}: {response.body[:300]!r}\n{server.log_tail()}"
    detail = response.json()["detail"]
    assert expected in detail and "\n" not in detail.strip(), detail
    assert server.request("GET", "/info/").status == 200


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "method, path, upload",
    [
        ("PUT", "/datastore/?image=..%2F..%2Fescaped", True),
        ("PUT", "/datastore/?image=%2Ftmp%2Fescaped_{uid}", True),
        ("PUT", "/datastore/?image=..", True),
        ("PUT", "/datastore/label?image=phantom_000&tag=..%2F..%2Fescaped", True),
        ("GET", "/datastore/image?image=..%2Fstart_server.sh", False),
        ("GET", "/datastore/label?label=phantom_000&tag=..%2F..", False),
        ("POST", "/infer/ma_sam?output=image&image=..%2F..%2Fphantom_000", False),
        ("DELETE", "/session/..", False),
        ("PUT", "/session/?uncompress=true", True),
    ],
    ids=[
        "upload-id-dotdot",
        "upload-id-absolute",
        "upload-id-parent",
        "label-tag-dotdot",
        "download-dotdot",
        "label-download-dotdot",
        "infer-dotdot",
        "session-delete-parent",
        "session-uncompress",
    ],
)
def test_requests_that_leave_the_datastore_are_refused(server, method, path, upload):
    """MONAI Label joins these values to its folders as they come; the app answers 400 and touches nothing."""
    uid = uuid.uuid4().hex[:8]
    root = server.app.parent
    before = _tree(root)
    file = (server.studies / "phantom_001.nii.gz") if upload else None
    response = server.request(
        method, path.format(uid=uid), params={} if upload else None, file=file, filename="volume.nii.gz"
    )
    assert response.status == 400, f"HTTP {response.status}: {response.body[:300]!r}\n{server.log_tail()}"
    assert response.json()["detail"].startswith("InvalidPath: "), response.body[:300]
    assert not Path(f"/tmp/escaped_{uid}.nii.gz").exists()
    assert {p for p in _tree(root) - before if not p.startswith(("app/logs", "server.log"))} == set()
    assert server.request("GET", "/info/").status == 200


def test_a_symlink_out_of_the_datastore_is_not_served(server, tmp_path):
    """A studies entry that is a symlink to a file elsewhere: MONAI Label follows it (``realpath``); refused."""
    secret = tmp_path / "outside.nii.gz"
    secret.write_bytes((server.studies / "phantom_002.nii.gz").read_bytes())
    link = server.studies / "linked_outside.nii.gz"
    link.symlink_to(secret)
    try:
        deadline = time.monotonic() + 60
        while "linked_outside" not in server.request("GET", "/datastore/?output=all").body.decode():
            if time.monotonic() > deadline:
                pytest.skip("the datastore did not list the new symlink within 60 s (no auto reload)")
            time.sleep(2)
        for response in (
            server.request("GET", "/datastore/image?image=linked_outside"),
            server.infer("ma_sam", image="linked_outside"),
        ):
            assert response.status == 400, f"HTTP {response.status}: {response.body[:300]!r}"
            assert "resolves outside the datastore" in response.json()["detail"]
        assert server.request("GET", "/datastore/image?image=phantom_002").status == 200  # a plain entry still is
    finally:
        link.unlink()
