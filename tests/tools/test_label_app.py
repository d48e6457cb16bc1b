"""``python -m tools label_app`` / ``init_model``: the MONAI Label app folder, without MONAI Label.

The server itself is exercised in ``tests/test_monailabel_server.py``; here a stand-in sample app
(a folder with ``main.py``) is enough to check what the tool writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tools.init_model import merged_config, write_initial_model
from tools.label_app import (
    APP_MODELS,
    ERRORS_MODULE,
    assemble_bundle,
    build_label_app,
    start_server_command,
    write_studies,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sample_app(tmp_path_factory) -> Path:
    app = tmp_path_factory.mktemp("sample") / "monaibundle"
    (app / "lib" / "infers").mkdir(parents=True)
    (app / "main.py").write_text("# stand-in for MONAI Label's monaibundle/main.py\n")
    (app / "model").mkdir()
    (app / "model" / "stale.txt").write_text("not copied")
    return app


@pytest.fixture(scope="module")
def app(tmp_path_factory, sample_app) -> dict:
    out = tmp_path_factory.mktemp("label_app") / "app"
    return build_label_app(out, variant="tiny", num_studies=3, shape=(32, 32, 12), sample_app=sample_app)


def _configs(app: dict, name: str) -> tuple[dict, dict, dict]:
    root = Path(app["app"]) / "model" / name / "configs"
    return tuple(json.loads((root / f).read_text()) for f in ("inference.json", "train.json", "metadata.json"))  # type: ignore[return-value]


def test_app_folder_layout(app, sample_app):
    root = Path(app["app"])
    assert (root / "main.py").read_text() == (sample_app / "main.py").read_text()
    assert not (root / "model" / "stale.txt").exists()
    assert sorted(p.name for p in (root / "model").iterdir()) == sorted(APP_MODELS)
    for name in APP_MODELS:
        bundle = root / "model" / name
        assert (bundle / "models" / "model.pt").is_file(), name
        assert not (bundle / "configs" / "demo.json").exists(), f"{name}: demo.json merged, not shipped"
    images = sorted(p.name for p in Path(app["studies"]).glob("*.nii.gz"))
    labels = sorted(p.name for p in (Path(app["studies"]) / "labels" / "final").glob("*.nii.gz"))
    assert images == labels and len(images) == 3
    assert (root / f"{ERRORS_MODULE}.py").is_file()
    script = (root / "start_server.sh").read_text()
    assert "monailabel start_server" in script and f"PYTHONPATH={root.resolve()}" in script


def test_interactive_models_are_named_for_monailabel(app):
    """MONAI Label's bundle infer task types a model by folder name: 'deepgrow' means clicks."""
    for name, spec in APP_MODELS.items():
        assert ("deepgrow" in name) == spec.prompted, name
        assert "deepedit" not in name, name  # deepedit would add an automatic '<name>_seg' twin


def test_start_command_options(app):
    cmd = start_server_command("/a", "/s", ["ma_sam", "h_sam"], port=8123)
    text = " ".join(cmd)
    for expected in (
        "--conf models ma_sam,h_sam",
        "--conf zoo_source github",
        "--conf sam2 false",
        "--port 8123",
        f"--uvicorn_app {ERRORS_MODULE}:app",
        "--app /a",
        "--studies /s",
    ):
        assert expected in text, expected


@pytest.mark.parametrize("name", sorted(APP_MODELS))
def test_app_configs_are_tiny_and_self_contained(app, name):
    infer, train, meta = _configs(app, name)
    spec = APP_MODELS[name]
    assert infer["variant"] == "tiny" and train["variant"] == "tiny"
    assert infer["_meta_"] == meta and train["_meta_"] == meta
    assert train["sam_checkpoint"] is None and train["val_interval"] == 1
    assert "@device.type" not in json.dumps(infer) + json.dumps(train)  # MONAI Label passes device as a string
    pre = [
        t.get("_target_", "").rsplit(".", 1)[-1] if isinstance(t, dict) else t
        for t in infer["preprocessing"]["transforms"]
    ]
    assert "SelectItemsd" not in pre
    if "Spacingd" in pre:
        i = pre.index("Spacingd")
        assert pre[i - 1] == "DeleteItemsd" and pre[i + 1] == "CopyItemsd"
    for section in ("train", "validate"):
        assert "data" in train[section]["dataset"], f"{section}#dataset#data is where MONAI Label puts its datalist"
    if spec.prompted:  # prompts come from the request, not simulated from a label as in demo.json
        assert infer.get("prompt_source", "input") in ("input", "user") and infer.get("use_box_prompt", True)
    # the activation the bundle's own 'network' applies is added back per window
    source = json.loads((REPO / "bundles" / spec.bundle / "configs" / "inference.json").read_text())
    if spec.activation is None:
        assert "Softmax" not in source["network"] and "Sigmoid" not in source["network"]
        assert "window_inferer" not in infer
    else:
        assert spec.activation.capitalize() in source["network"], source["network"]
        assert "@window_inferer" in infer["inferer"] and infer["window_inferer"] == source["inferer"]


def test_metadata_matches_what_is_written(app):
    _, _, meta = _configs(app, "h_sam")  # tiny H-SAM writes BTCV ids (output_btcv_ids)
    pred = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert pred["6"] == "liver" and pred["11"] == "pancreas" and "5" not in pred
    _, _, meta = _configs(app, "s_sam")  # only the demo's six classes, BTCV ids kept
    pred = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert sorted(int(k) for k in pred) == [0, 1, 2, 3, 6, 7, 8]
    _, _, meta = _configs(app, "ma_sam_box_deepgrow")
    fmt = meta["network_data_format"]
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "object"}
    assert fmt["inputs"]["image"]["num_channels"] == 2


@pytest.mark.parametrize("name", ["ma_sam", "med_sa_deepgrow"])
def test_initial_model_loads_strictly_and_is_reproducible(app, tmp_path, name):
    bundle = Path(app["app"]) / "model" / name
    config = merged_config(bundle, ["inference.json"])
    from tools.init_model import build_network

    net = build_network(config, bundle)
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    again = write_initial_model(bundle, ["inference.json"], out=tmp_path / "model.pt", seed=0)
    state2 = torch.load(again, map_location="cpu", weights_only=True)
    assert all(torch.equal(state[k], state2[k]) for k in state)


def test_serve_preprocessing_keeps_request_keys(app):
    """The served pre-processing runs on MONAI Label's data dictionary and keeps its request keys."""
    from monai.bundle import ConfigParser

    bundle = Path(app["app"]) / "model" / "sam3d_adapter_deepgrow"
    parser = ConfigParser(json.loads((bundle / "configs" / "inference.json").read_text()))
    parser["bundle_root"] = str(bundle)
    pre = parser.get_parsed_content("preprocessing")
    image = sorted(Path(app["studies"]).glob("*.nii.gz"))[0]
    data = {
        "image": str(image),
        "image_path": str(image),
        "model_filename": ["model.pt"],
        "foreground": [[16, 16, 6]],
        "background": [],
    }
    out = pre(data)
    assert out["image_path"] == str(image) and out["model_filename"] == ["model.pt"]
    assert out["image"].shape[0] == 3  # image + positive + negative guidance


def test_bad_arguments(tmp_path, sample_app, app):
    with pytest.raises(ValueError, match="models must be names from"):
        build_label_app(tmp_path / "a", models="ma_sam,nope", sample_app=sample_app)
    with pytest.raises(ValueError, match="variant must be one of"):
        build_label_app(tmp_path / "b", variant="huge", sample_app=sample_app)
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_label_app(app["app"], models="h_sam", sample_app=sample_app)
    with pytest.raises(FileNotFoundError, match="has no main.py"):
        build_label_app(tmp_path / "c", models="h_sam", sample_app=tmp_path, num_studies=0)
    with pytest.raises(ValueError, match="pass --sam_dir"):
        assemble_bundle("h_sam", tmp_path / "model", variant="paper")
    assert not (tmp_path / "model" / "h_sam").exists() and not (tmp_path / "model" / ".h_sam.tmp").exists()
    with pytest.raises(FileNotFoundError, match="not found"):
        assemble_bundle("h_sam", tmp_path / "model", variant="paper", sam_dir=tmp_path)
    with pytest.raises(ValueError, match="'sam3d_adapter_deepgrow' is not served at lite"):
        assemble_bundle("sam3d_adapter_deepgrow", tmp_path / "model", variant="lite")


def test_cli_writes_app_and_prints_command(tmp_path, sample_app):
    from tools.__main__ import main

    assert (
        main(
            [
                "label_app",
                "--out",
                str(tmp_path / "cli"),
                "--models",
                "h_sam",
                "--num_studies",
                "0",
                "--sample_app",
                str(sample_app),
            ]
        )
        == 0
    )
    assert (tmp_path / "cli" / "model" / "h_sam" / "models" / "model.pt").is_file()
    assert re.search(r"--conf models h_sam\b", (tmp_path / "cli" / "start_server.sh").read_text())


def test_write_studies_layout(tmp_path):
    images = write_studies(tmp_path / "studies", num=3, shape=(32, 32, 8))
    assert len(images) == 3
    for image in images:
        assert (tmp_path / "studies" / "labels" / "final" / image.name).is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


# -- the datastore guard of the served app, without MONAI Label (the server test sends the real requests) -----
def _guard():
    """``unsafe_name``, ``_inside`` and ``_outside_datastore`` of the generated error module, run with stand-ins for
    MONAI Label's settings and app (the server test in ``tests/test_monailabel_server.py`` covers the real ones)."""
    import ast
    import os
    import types

    from tools.label_app import ERRORS_SOURCE

    tree = ast.parse(ERRORS_SOURCE)
    names = ("unsafe_name", "_inside", "_outside_datastore")
    keep = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef)
        and n.name in names
        or isinstance(n, ast.Assign)
        and any(getattr(t, "id", "") == "NAME_PARAMS" for t in n.targets)
    ]
    namespace = {"os": os, "settings": types.SimpleNamespace(MONAI_LABEL_STUDIES="")}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "sam_bundles_errors", "exec"), namespace)  # noqa: S102
    return namespace


class _Params(dict):
    def multi_items(self):
        return list(self.items())


def _request(path: str, **params):
    import types

    return types.SimpleNamespace(url=types.SimpleNamespace(path=path), query_params=_Params(params))


@pytest.mark.parametrize("value", ["../../x", "/etc/passwd", "..", ".", "a/b", "a\\b", "x\x00y"])
def test_guard_refuses_names_that_leave_the_datastore(value):
    guard = _guard()
    assert guard["unsafe_name"](value)
    for key in ("image", "id", "label", "tag", "session_id"):
        assert "expected a datastore id" in guard["_outside_datastore"](_request("/datastore/", **{key: value}))


@pytest.mark.parametrize("value", ["phantom_000", "case.1", "..hidden", "spleen_10"])
def test_guard_passes_plain_ids(value):
    guard = _guard()
    assert guard["unsafe_name"](value) is None
    assert guard["_outside_datastore"](_request("/infer/ma_sam", image=value, output="image")) is None


def test_guard_refuses_dotdot_paths_and_archive_uncompress(tmp_path):
    guard = _guard()
    assert "'..' segment" in guard["_outside_datastore"](_request("/session/.."))
    assert "uncompress" in guard["_outside_datastore"](_request("/session/", uncompress="true"))
    assert guard["_outside_datastore"](_request("/session/", uncompress="false")) is None
    (tmp_path / "studies").mkdir()
    (tmp_path / "outside.nii.gz").write_bytes(b"")
    (tmp_path / "studies" / "link.nii.gz").symlink_to(tmp_path / "outside.nii.gz")
    assert not guard["_inside"](str(tmp_path / "studies" / "link.nii.gz"), str(tmp_path / "studies"))
    assert guard["_inside"](str(tmp_path / "studies" / "x.nii.gz"), str(tmp_path / "studies"))
    assert not guard["_inside"](str(tmp_path / "studies_other" / "x.nii.gz"), str(tmp_path / "studies"))


# -- the infer params check of the served app, without MONAI Label (the server test fuzzes the real endpoint) ----
def _params_check():
    """``check_infer_params`` and what it uses from the generated error module, with torch as the only import."""
    import ast
    import json
    import math
    import os
    import re

    import torch

    from tools.label_app import ERRORS_SOURCE

    tree = ast.parse(ERRORS_SOURCE)
    functions = ("unsafe_name", "_short", "_prompt_numbers", "check_prompt", "check_infer_params")
    constants = ("SERVER_KEYS", "PROMPT_KEYS", "MAX_INDEX", "MAX_PROMPT_NUMBERS", "CHOICES", "FLAGS")
    keep = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef)
        and n.name in functions
        or isinstance(n, ast.ClassDef)
        and n.name == "InvalidParams"
        or isinstance(n, ast.Assign)
        and any(getattr(t, "id", "") in constants for t in n.targets)
    ]
    namespace = {"os": os, "re": re, "json": json, "math": math, "torch": torch}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "sam_bundles_errors", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.mark.parametrize(
    "params, expected",
    [
        ("[1, 2]", "params must be a JSON object, got list"),
        ("{not json", "params is not valid JSON"),
        ('{"image": "/etc/passwd"}', "params key 'image' is set by the server"),
        ('{"skip_writer": true}', "params key 'skip_writer' is set by the server"),
        ('{"image_meta_dict": {}}', "params key 'image_meta_dict' is set by the server"),
        ('{"foreground": [[NaN, 1, 2]]}', "of finite voxel indices, got the value nan"),
        ('{"roi": [0, 0, 0, 1e999, 4, 4]}', "got the value inf"),
        ('{"background": [[1, 2, 3000000000000]]}', "got the value 3000000000000"),
        ('{"foreground": {"a": 1}}', "prompt 'foreground' must be a list of [i, j, k] clicks"),
        ('{"foreground": [[[[[1]]]]]}', "prompt 'foreground' must be a list"),
        ('{"label_tag": "../final"}', "params 'label_tag' must be a plain name"),
        ('{"device": "gpu0"}', "params 'device' must be 'cpu', 'cuda' or 'cuda:N'"),
        ('{"result_extension": "/../../x"}', "params 'result_extension' must be one of"),
        ('{"save_label": "yes"}', "params 'save_label' must be true or false"),
        ('{"timeout": -1}', "params 'timeout' must be a number of seconds"),
    ],
)
def test_infer_params_check_refuses_with_one_line(params, expected):
    check = _params_check()
    with pytest.raises(check["InvalidParams"]) as raised:
        check["check_infer_params"](params)
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert isinstance(raised.value, ValueError)  # answered 400 by the app's exception handler


@pytest.mark.parametrize(
    "params",
    [
        "",
        "{}",
        '{"foreground": [[1, 2, 3]], "background": [], "label": "spleen"}',
        '{"roi": [0, 0, 0, 4, 4, 4], "label_tag": "original", "save_label": true, "device": "cpu"}',
        '{"result_extension": ".nii.gz", "result_dtype": "uint8", "logging": "INFO", "spleen": [[1, 2, 3]]}',
    ],
)
def test_infer_params_check_passes_client_params(params):
    assert isinstance(_params_check()["check_infer_params"](params), dict)
