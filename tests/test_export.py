"""Exported networks (TorchScript trace, torch.export, ONNX) give the eager network's logits on a real CT.

Each bundle's tiny demo network with its PEFT mode on (adapters perturbed, so merging is not a
no-op) is merged, exported (the whole network, or Med-SA's / 3DSAM-adapter's core) and compared
with the eager network on inputs cut from the real CT example after the bundle's preprocessing:
the input it was exported on and another batch size. A trace that froze a shape branch must make
``check_equivalence`` raise (the negative tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import REAL_CT

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
# the bundles' PEFT modes (demo.json fine-tunes fully), so merge_peft has layers to merge
PEFT = {
    "ma_sam": {"peft": "fact"},
    "h_sam": {"peft": "lora"},
    "s_sam": {"peft": "svd"},
    "med_sa": {"peft": "adapter"},
    "sam3d_adapter": {"peft": "adapter"},
}
ATOL = 1e-4


def _ct() -> Path:
    ct = REAL_CT / "ct.nii.gz"
    if not ct.is_file() or not (REAL_CT / "seg.nii.gz").is_file():
        pytest.skip("real CT example absent: no data/totalsegmentator_example/{ct,seg}.nii.gz (nor a ../shared copy)")
    return ct


class Case:
    """One bundle's merged network, its exported part and the two CT inputs (batch 1 = A, batch 2 = B)."""

    def __init__(self, bundle: str) -> None:
        from shared_nets.export import export_inputs, export_part
        from tools.export import ct_inputs, load_bundle_network

        ct = _ct()
        torch.manual_seed(0)
        net, parser, self.info = load_bundle_network(
            BUNDLES / bundle, ["inference.json", "demo.json"], PEFT[bundle], merge=False
        )
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # untrained adapters start at identity: perturb what trains
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        from shared_nets.peft.merge import merge_peft

        self.merged = merge_peft(net)
        self.net = net.eval()
        self.part, self.what = export_part(net)
        xa, xb = ct_inputs(net, parser, ct)
        self.x = {"A": xa, "B": xb}
        self.inputs = {"A": export_inputs(net, xa), "B": export_inputs(net, xb)}
        self.fixed_batch = "fixed batch" in self.what
        self._program = None

    def program(self):
        """The ``torch.export`` program (batch dynamic: exported on batch 2 unless the batch is fixed)."""
        from shared_nets.export import export_program

        if self._program is None:
            self._program = export_program(self.part, self.inputs["A" if self.fixed_batch else "B"])
        return self._program


_CASES: dict[str, Case] = {}


@pytest.fixture(scope="module")
def cases():
    yield _CASES
    _CASES.clear()


def _case(cases: dict, bundle: str) -> Case:
    if bundle not in cases:
        cases[bundle] = Case(bundle)
    return cases[bundle]


def _checked(bundle: str) -> list[str]:
    return ["A"] if bundle == "sam3d_adapter" else ["A", "B"]


@pytest.mark.parametrize("bundle", list(PEFT))
def test_trace_matches_eager(cases, bundle, tmp_path):
    from shared_nets.export import check_equivalence, export_torchscript, load_exported

    c = _case(cases, bundle)
    if bundle in ("ma_sam", "h_sam", "s_sam"):
        assert c.merged > 0 and c.part is c.net
    # the whole network and the exported part agree eagerly when every slice is prompted
    with torch.no_grad():
        torch.testing.assert_close(c.part(*c.inputs["A"]), c.net(c.x["A"]), rtol=0, atol=0)
    export_torchscript(c.part, c.inputs["A"], tmp_path / "model.ts", meta={"name": bundle})
    traced = load_exported("ts", tmp_path / "model.ts")
    for tag in _checked(bundle):
        r = check_equivalence(c.part, traced, c.inputs[tag], ATOL, name=f"{bundle} ts {tag}")
        assert r["max_abs_diff"] <= ATOL and r["argmax_confident_disagreements"] == 0


@pytest.mark.parametrize("bundle", list(PEFT))
def test_program_matches_eager(cases, bundle, tmp_path):
    from shared_nets.export import check_equivalence, load_exported

    c = _case(cases, bundle)
    torch.export.save(c.program(), str(tmp_path / "model.pt2"))
    loaded = load_exported("pt2", tmp_path / "model.pt2")
    for tag in _checked(bundle):
        r = check_equivalence(c.part, loaded, c.inputs[tag], ATOL, name=f"{bundle} pt2 {tag}")
        assert r["max_abs_diff"] <= ATOL


def _onnx(cases, bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from shared_nets.export import check_equivalence, export_onnx, load_exported

    c = _case(cases, bundle)
    sample = c.inputs["A" if c.fixed_batch else "B"]
    export_onnx(c.program(), sample, tmp_path / "model.onnx")
    session = load_exported("onnx", tmp_path / "model.onnx")
    for tag in _checked(bundle):
        r = check_equivalence(c.part, session, c.inputs[tag], ATOL, name=f"{bundle} onnx {tag}")
        assert r["max_abs_diff"] <= ATOL and r["argmax_confident_disagreements"] == 0


# default CI: ONNX of a whole network with SAM's attention (MA-SAM) and of Med-SA's core; the others
# (same exporter path; 3DSAM-adapter's own 3D window attention) under -m slow
@pytest.mark.parametrize("bundle", ["ma_sam", "med_sa"])
def test_onnx_matches_eager(cases, bundle, tmp_path):
    _onnx(cases, bundle, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["h_sam", "s_sam", "sam3d_adapter"])
def test_onnx_matches_eager_slow(cases, bundle, tmp_path):
    _onnx(cases, bundle, tmp_path)


def test_trace_frozen_batch_loop_fails_check(cases, tmp_path):
    """3DSAM-adapter traced at batch 1 unrolled its per-item loops: batch 2 must fail the check."""
    from shared_nets.export import check_equivalence, export_torchscript

    c = _case(cases, "sam3d_adapter")
    traced, frozen = export_torchscript(c.part, c.inputs["A"], tmp_path / "model.ts")
    assert frozen  # the trace reports the Python values it froze
    with pytest.raises(ValueError, match="sam3d ts B"):
        check_equivalence(c.part, traced, c.inputs["B"], ATOL, name="sam3d ts B")


def test_trace_frozen_resize_fails_check(cases, tmp_path):
    """Med-SA's core traced at img_size froze ``upsample_to``'s no-op: a 2x larger slice must fail the check."""
    import torch.nn.functional as F

    from shared_nets.export import check_equivalence, export_inputs, export_torchscript

    c = _case(cases, "med_sa")
    traced, _ = export_torchscript(c.part, c.inputs["A"], tmp_path / "model.ts")
    x = c.x["A"]
    big = F.interpolate(x.permute(0, 4, 1, 2, 3).flatten(0, 1), scale_factor=2, mode="nearest")
    big = big.unflatten(0, (x.shape[0], x.shape[-1])).permute(0, 2, 3, 4, 1).contiguous()
    with pytest.raises(ValueError, match="med_sa ts 2x"):
        check_equivalence(c.part, traced, export_inputs(c.net, big), ATOL, name="med_sa ts 2x")


def test_check_equivalence_reports_difference():
    from shared_nets.export import check_equivalence

    net = torch.nn.Conv3d(1, 3, 1)
    x = torch.randn(1, 1, 4, 4, 2)
    r = check_equivalence(net, net, (x,), name="same")
    assert r == {"max_abs_diff": 0.0, "argmax_agreement": 1.0, "argmax_confident_disagreements": 0}
    with pytest.raises(ValueError, match=r"shifted differs from eager by 0\.01"):
        check_equivalence(net, lambda t: net(t) + 0.01, (x,), name="shifted")
    logits = torch.zeros(1, 3, 4, 4, 2)
    logits[:, 0] = 5.0
    with pytest.raises(ValueError, match="swapped changes the argmax of 32 voxel"):
        check_equivalence(lambda t: logits, lambda t: logits.flip(1), (x,), name="swapped")
    with pytest.raises(ValueError, match=r"raising failed on inputs \[\(1, 1, 4, 4, 2\)\]: RuntimeError: frozen"):
        check_equivalence(net, lambda t: (_ for _ in ()).throw(RuntimeError("frozen")), (x,), name="raising")


def test_export_command_writes_checked_files(tmp_path):
    """``python -m tools export`` on MA-SAM (TorchScript only, to stay cheap): model.ts with the bundle's
    metadata and configs, and export.json with the measured differences."""
    import json

    from monai.data import load_net_with_metadata

    from tools.export import export_bundle

    ct = _ct()
    summary = export_bundle(
        BUNDLES / "ma_sam", "inference.json,demo.json", "ts", out=tmp_path, ct=ct, overrides=PEFT["ma_sam"]
    )
    assert summary["merged_layers"] > 0 and summary["unmerged_adapters"]  # 3D adapters stay as modules
    assert set(summary["ts"]) == {"A", "B"} and summary["ts"]["B"]["max_abs_diff"] <= ATOL
    assert json.loads((tmp_path / "export.json").read_text())["part"] == "whole network (MASAM)"
    _, meta, extra = load_net_with_metadata(str(tmp_path / "model.ts"), more_extra_files=("inference", "demo"))
    assert meta["version"] and json.loads(extra["demo"])["variant"] == "tiny"
    with pytest.raises(ValueError, match="formats must be a subset"):
        export_bundle(BUNDLES / "ma_sam", "inference.json,demo.json", "tflite", out=tmp_path, ct=ct)
