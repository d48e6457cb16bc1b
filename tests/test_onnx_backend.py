"""``inference_backend: "onnx"``: a bundle's inference on ONNX Runtime gives the torch backend's predictions.

MA-SAM, H-SAM and S-SAM (tiny demo configs, untrained weights from ``python -m tools init_model``)
are exported with ``python -m tools export --formats onnx`` into a copy of the bundle, then run by
the bundle's own inference workflow on the real CT example with each backend: the saved label maps
must be equal and the networks' logits within 1e-4 (argmax equal wherever eager is not near a tie).
The ONNX run happens after ``model.pt`` is removed, so it cannot have loaded it. The other tests
need no export: the wrapper on a hand-made ONNX graph, and the one-line errors (missing file,
input of another shape, unknown backend, bundles that cannot run on ONNX).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import REAL_CT

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["inference.json", "demo.json"]
ATOL = 1e-4


def _copy(bundle: str, dst: Path) -> Path:
    root = dst / bundle
    shutil.copytree(REPO / "bundles" / bundle, root, ignore=shutil.ignore_patterns("models", "eval", "runs", "__*"))
    return root


def _parser(root: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(root / "configs" / c) for c in CONFIGS])
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(root), **overrides})
    return parser


def _messages(err: BaseException) -> str:
    """The messages of an exception and its causes (MONAI wraps a config's error in its own)."""
    out = []
    while err is not None:
        out.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\n".join(out)


def _identity_onnx(path: Path, shape: list) -> Path:
    """A one-node ONNX graph ``y = 2 * x`` with the given input shape (a string = dynamic dim)."""
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double", [x], [y], [two])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_wrapper_runs_the_file_and_keeps_dtype_and_device(tmp_path):
    from monai.data import MetaTensor

    from shared_nets.onnx_backend import OnnxRuntimeNetwork

    net = OnnxRuntimeNetwork(_identity_onnx(tmp_path / "m.onnx", ["n", 1, 4, 4, 2]), [1, 4, 4, 2]).eval()
    assert net.session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    x = torch.randn(3, 1, 4, 4, 2, dtype=torch.float64)
    y = net(x)
    assert y.dtype == torch.float64 and y.device == x.device
    torch.testing.assert_close(y, 2 * x.float().double())
    torch.testing.assert_close(net(MetaTensor(x[:1].float())), 2 * x[:1].float())
    assert list(net.parameters()) == [] and net.state_dict() == {}


@pytest.mark.parametrize(
    ("shape", "expected"),
    [(["n", 1, 4, 4, 2], [2, 4, 4, 2]), (["n", 1, 4, 4, 2], [1, 4, 4, 5]), (["n", 1, 4, 4], [1, 4, 4, 2])],
    ids=["channels", "depth", "rank"],
)
def test_wrapper_refuses_a_file_of_another_input(tmp_path, shape, expected):
    from shared_nets.onnx_backend import OnnxRuntimeNetwork

    path = _identity_onnx(tmp_path / "m.onnx", shape)
    with pytest.raises(ValueError, match=r"m\.onnx' takes input \['B', 1, 4, 4.*python -m tools export") as e:
        OnnxRuntimeNetwork(path, expected)
    assert "\n" not in str(e.value)


def test_wrapper_refuses_a_file_of_other_classes(tmp_path):
    from shared_nets.onnx_backend import OnnxRuntimeNetwork

    path = _identity_onnx(tmp_path / "m.onnx", ["n", 3, 4, 4, 2])
    with pytest.raises(ValueError, match=r"m\.onnx' gives 3 output channels; this bundle config expects 14"):
        OnnxRuntimeNetwork(path, [3, 4, 4, 2], out_channels=14)


def test_bundle_without_onnx_file_says_how_to_export(tmp_path):
    root = _copy("ma_sam", tmp_path)
    parser = _parser(root, inference_backend="onnx")
    with pytest.raises(Exception) as e:
        parser.get_parsed_content("network")
    text = _messages(e.value)
    assert f"onnx_model '{root}/models/model.onnx' does not exist" in text, text
    assert f"python -m tools export --bundle {root}" in text and "--formats onnx" in text


def test_bundle_onnx_mode_builds_no_torch_network_and_checks_the_file(tmp_path):
    """With ``onnx`` neither ``network_def`` nor the checkpoint loader is built; a file exported for another
    ``num_slices`` is refused naming it."""
    root = _copy("ma_sam", tmp_path)
    onnx = _identity_onnx(tmp_path / "other.onnx", ["n", 1, 64, 64, 3])
    parser = _parser(root, inference_backend="onnx", onnx_model=str(onnx))
    assert parser.get_parsed_content("network_def") is None
    handlers = [type(h).__name__ for h in parser.get_parsed_content("handlers")]
    assert "CheckpointLoader" not in handlers and handlers, handlers
    with pytest.raises(Exception) as e:
        parser.get_parsed_content("network")
    assert "other.onnx' takes input ['B', 1, 64, 64, 3]; this bundle config feeds ['B', 1, 64, 64, 5]" in _messages(
        e.value
    )


@pytest.mark.parametrize("bundle", ["ma_sam", "h_sam", "s_sam"])
def test_bundle_refuses_an_unknown_backend(tmp_path, bundle):
    parser = _parser(_copy(bundle, tmp_path), inference_backend="onnxruntime")
    with pytest.raises(Exception) as e:
        parser.get_parsed_content("network")
    assert "inference_backend must be one of ['torch', 'onnx'], got 'onnxruntime'" in _messages(e.value)


@pytest.mark.parametrize("bundle", ["med_sa", "sam3d_adapter"])
def test_core_only_bundles_refuse_onnx_at_initialize(tmp_path, bundle):
    from monai.bundle import ConfigWorkflow

    root = _copy(bundle, tmp_path)
    wf = ConfigWorkflow(
        config_file=[str(root / "configs" / c) for c in CONFIGS],
        meta_file=str(root / "configs" / "metadata.json"),
        workflow_type="infer",
        bundle_root=str(root),
        inference_backend="onnx",
    )
    with pytest.raises(Exception) as e:
        wf.initialize()
    assert f"inference_backend 'onnx' is not available for {bundle}: only" in _messages(e.value)


def _infer(root: Path, data: Path, out: Path, backend: str):
    from shared_nets.engine import run_bundle_workflow

    wf = run_bundle_workflow(
        root, CONFIGS, "infer", {"dataset_dir": str(data), "output_dir": str(out), "inference_backend": backend}
    )
    (pred,) = sorted(out.rglob("*.nii.gz"))
    return wf.parser, np.asarray(nib.load(str(pred)).dataobj)


# one bundle in the default run (export ~20 CPU-s); the others take the same path (slow)
@pytest.mark.parametrize(
    "bundle", ["ma_sam", pytest.param("h_sam", marks=pytest.mark.slow), pytest.param("s_sam", marks=pytest.mark.slow)]
)
def test_onnx_backend_predicts_as_torch_on_the_real_ct(tmp_path, bundle):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from shared_nets.export import check_equivalence
    from shared_nets.onnx_backend import OnnxRuntimeNetwork
    from tools.export import export_bundle
    from tools.init_model import write_initial_model

    ct = REAL_CT / "ct.nii.gz"
    if not ct.is_file():
        pytest.skip("real CT example absent: no data/totalsegmentator_example/ct.nii.gz (nor a ../shared copy)")
    data = tmp_path / "data"
    data.mkdir()
    (data / "ct.nii.gz").symlink_to(ct)
    datalist = {"training": [], "validation": [], "test": [{"image": "ct.nii.gz"}]}
    (data / "datalist.json").write_text(json.dumps(datalist))
    root = _copy(bundle, tmp_path)
    model = write_initial_model(root, CONFIGS)
    export_bundle(root, CONFIGS, "onnx", ct=ct)  # checks the file against eager on two CT inputs first

    parser_t, pred_t = _infer(root, data, tmp_path / "torch", "torch")
    model.unlink()  # the ONNX run must not need model.pt
    parser_o, pred_o = _infer(root, data, tmp_path / "onnx", "onnx")

    assert pred_o.shape == pred_t.shape == nib.load(str(ct)).shape
    assert len(np.unique(pred_t)) > 1  # not a constant map that any backend would reproduce
    np.testing.assert_array_equal(pred_o, pred_t)
    # the evaluator switches to eval mode only inside its iterations (MONAI's eval_mode restores the flag)
    eager, onnx = parser_t.get_parsed_content("network")[0].eval(), parser_o.get_parsed_content("network")[0].eval()
    assert isinstance(onnx, OnnxRuntimeNetwork) and not isinstance(eager, OnnxRuntimeNetwork)
    # logits on three windows of the preprocessed CT, batched (the exported batch is dynamic)
    x = parser_t.get_parsed_content("preprocessing")({"image": str(ct)})["image"].as_tensor()[None]
    depth = int(parser_t.get_parsed_content("inferer").roi_size[-1])
    starts = np.linspace(0, x.shape[-1] - depth, 3).astype(int)
    windows = torch.cat([x[..., s : s + depth] for s in starts])
    r = check_equivalence(eager, onnx, (windows,), ATOL, name=f"{bundle} onnx backend")
    assert r["max_abs_diff"] <= ATOL and r["argmax_confident_disagreements"] == 0
