"""tools.bench: one minimal end-to-end run (dummy bundle, broken bundle, MA-SAM tiny) and its report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import __main__ as tools_main
from tools import bench
from tools.bench import BUNDLE_COLUMNS, ENCODER_COLUMNS, PEER_COLUMNS, SDPA_COLUMNS, PeakMemory, measure, run_bench

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _dummy_bundle(root: Path, target: str) -> None:
    common = {
        "device": "$torch.device('cpu')",
        "variant": "tiny",
        "img_size": 32,
        "batch_size": 1,
        "network_def": {"_target_": target, "in_channels": 1, "out_channels": 3, "kernel_size": 3, "padding": 1},
        "network": "$@network_def.to(@device)",
    }
    _write(
        root / "configs" / "train.json",
        {
            **common,
            "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
            "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 1e-3},
        },
    )
    _write(
        root / "configs" / "inference.json",
        {
            **common,
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 4], "sw_batch_size": 2},
        },
    )


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """One minimal run: a Conv3d 'bundle', a bundle whose network module is missing, MA-SAM (tiny, 32²)."""
    bundles = tmp_path_factory.mktemp("bundles")
    _dummy_bundle(bundles / "dummy", "torch.nn.Conv3d")
    _dummy_bundle(bundles / "broken", "shared_nets.does_not_exist.Net")
    shutil.copytree(REPO / "bundles" / "ma_sam" / "configs", bundles / "ma_sam" / "configs")
    out = tmp_path_factory.mktemp("out") / "bench"
    threads = torch.get_num_threads()
    try:
        res = run_bench(
            bundles="dummy,broken,ma_sam",
            bundles_dir=bundles,
            img_size=32,
            batch_size=1,
            volume_shape=(32, 32, 8),
            peers=("sam", "dynunet"),
            peer_roi=(32, 32, 8),
            peer_batch=1,
            sdpa_block_size=32,
            warmup=0,
            repeat=1,
            min_time=0.0,
            threads=1,
            out=out,
            data_num=3,
            data_shape=(32, 32, 8),
            data_epochs=2,
            memory_estimates=False,
            lite=False,
        )
    finally:
        torch.set_num_threads(threads)
    return res, out


def test_writes_valid_json_and_markdown(result):
    res, out = result
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["schema"] == 1 and {"machine", "settings", "bundles", "peers", "sdpa", "memory_method"} <= data.keys()
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["torch_threads"] == 1
    assert [b["bundle"] for b in data["bundles"]] == ["dummy", "broken", "ma_sam"]
    assert not list(out.parent.glob("*.tmp"))  # atomic writes leave nothing behind
    md = out.with_suffix(".md").read_text()
    for columns in (BUNDLE_COLUMNS, PEER_COLUMNS, ENCODER_COLUMNS, SDPA_COLUMNS):
        assert "| " + " | ".join(columns) + " |" in md
    assert md.count("\n| dummy |") == 1 and "| broken | skipped:" in md


def test_dummy_bundle_is_measured(result):
    res, _ = result
    row = next(b for b in res["bundles"] if b["bundle"] == "dummy")
    assert row["status"] == "ok" and row["network"] == "Conv3d"
    assert row["params_total"] == row["params_trainable"] == 3 * 27 + 3
    assert row["train_input"] == [1, 1, 32, 32, 4] and row["volume"] == [1, 1, 32, 32, 8]
    for key in ("train", "infer"):
        assert row[key]["runs"] == 1 and row[key]["time_s"] > 0
    assert row["state_mb"] > 0
    ratios = row["ratios"]
    assert ratios["peer"] == "dynunet" and ratios["train_vs_monai"] > 0 and ratios["infer_vs_monai"] > 0
    assert ratios["infer_vs_stock_sam_slices"] > 0  # stock tiny SAM at the same size, per slice
    assert row["stock_sam"] == ["tiny", 32, 16]


def test_broken_network_is_skipped_with_a_note(result):
    res, _ = result
    row = next(b for b in res["bundles"] if b["bundle"] == "broken")
    assert row["status"] == "skipped" and "does_not_exist" in row["error"]
    assert "train" not in row


def test_ma_sam_row_has_merge_ratios(result):
    res, _ = result
    row = next(b for b in res["bundles"] if b["bundle"] == "ma_sam")
    assert row["status"] == "ok", row.get("error")
    assert row["network"] == "MASAM" and row["img_size"] == 32 and row["train_input"][2:] == [32, 32, 5]
    # demo.json trains everything; the paper's FacT setting is rebuilt for the merge measurement
    assert row["peft_setting"] == {"peft": "fact"}
    assert row["params_trainable_peft"] < row["params_trainable"] <= row["params_total"]
    enc = row["encoder"]
    assert enc["peft_layers"] == enc["merged_layers"] == 4  # tiny: FacT on every block's qkv
    assert row["ratios"]["encoder_merged_vs_stock"] > 0 and row["ratios"]["encoder_unmerged_vs_stock"] > 0


def test_peers_and_attention_rows(result):
    res, _ = result
    (dyn,) = res["peers"]["monai"]
    assert dyn["status"] == "ok" and dyn["params_total"] > 0 and dyn["train"]["time_s"] > 0
    sizes = {(r["variant"], r["img_size"], r["patch_size"]) for r in res["peers"]["sam"]}
    assert ("tiny", 32, 16) in sizes
    assert all("encoder" in r and "prompt_to_mask" in r for r in res["peers"]["sam"])
    whats = {r["what"] for r in res["sdpa"]}
    assert "ViT-B block global @32" in whats and "ViT-B block window 14 @32" in whats
    for what in whats:
        modes = [r["mode"] for r in res["sdpa"] if r["what"] == what]
        assert modes == ["stock", "bias", "fold"]
    assert all(r["forward_vs_stock"] > 0 for r in res["sdpa"] if r["mode"] != "stock")


def test_measure_sees_a_large_allocation():
    if PeakMemory("cpu").method != "peak_rss_reset":
        pytest.skip("peak-RSS reset (/proc/self/clear_refs) not available here")
    # in a fresh process: peak RSS depends on what earlier tests left in the allocator's free lists
    code = (
        "import json, torch\n"
        "from tools import bench\n"
        "bench._pin_malloc()\n"
        "m = bench.measure(lambda: torch.ones(16 << 20).sum(), 'cpu', warmup=1, repeat=2)\n"  # 64 MiB, touched
        "print(json.dumps(m))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["runs"] == 2 and 48 <= m["peak_mb"] < 200


def test_measure_reports_errors_instead_of_raising():
    def boom():
        raise RuntimeError("broken network\nsecond line")

    assert measure(boom, "cpu", warmup=0, repeat=1) == {"error": "RuntimeError: broken network"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"device": "tpu"}, "device must be one of"),
        ({"bundles": "nope"}, "bundles must be among"),
        ({"repeat": 0}, "repeat must be an integer >= 1"),
        ({"peers": "resnet"}, "peers must be among"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_bench(out=None, **kwargs)


def test_registered_as_a_tools_command():
    assert tools_main.resolve("bench") is bench.main


def test_switch_and_data_loading_rows(result):
    res, out = result
    row = next(r for r in res["bundles"] if r["bundle"] == "ma_sam")
    sw = row["switches"]
    assert sw["none"]["time_s"] > 0 and sw["grad-ckpt"]["time_s"] > 0
    assert sw["AMP"]["error"].startswith("n/a")  # CPU: MONAI autocasts on CUDA only
    dl = row["data_loading"]
    assert {dl[k]["batches"] for k in bench.DATASET_TYPES} == {dl["Dataset"]["batches"]}
    assert all(dl[k]["batch_s"] > 0 for k in bench.DATASET_TYPES)
    dummy = next(r for r in res["bundles"] if r["bundle"] == "dummy")
    assert "gradient_checkpointing" in dummy["switches"]["note"] and "error" in dummy["data_loading"]
    md = out.with_suffix(".md").read_text()
    assert "## Training memory switches" in md and "## Data loading" in md


def test_lite_row_on_a_tiny_case():
    """LiteMedSAM encoder row at 32² with random weights: counted FLOPs, rates and the rendered table."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from shared_nets.sam import build_sam

    threads = torch.get_num_threads()
    res = bench.lite_encoder_bench(
        threads=[1], img_size=32, weights=None, reference=False, warmup=0, repeat=2, matmul_size=64
    )
    assert torch.get_num_threads() == threads
    enc = build_sam("lite", None, img_size=32).image_encoder.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        enc(torch.rand(1, 3, 32, 32))
    # the fused CPU SDPA kernel has no FLOP formula: the row counts attention on the math kernel, so more
    assert res["flops"] > counter.get_total_flops() > 0
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        enc(torch.rand(1, 3, 32, 32))
    assert res["flops"] == counter.get_total_flops()
    assert res["package_error"] == "not requested" and "max_abs_diff" not in res
    (row,) = res["rows"]
    assert row["threads"] == 1 and row["ours"]["runs"] == row["matmul"]["runs"] == 2 and "package" not in row
    assert row["matmul_gflops"] == pytest.approx(2 * 64**3 / row["matmul"]["time_s"] / 1e9)
    assert row["ours_gflops"] == pytest.approx(res["flops"] / row["ours"]["time_s"] / 1e9)
    assert row["fraction_of_matmul"] == pytest.approx(row["ours_gflops"] / row["matmul_gflops"], rel=1e-2)
    md = "\n".join(bench.render_lite(res))
    assert "| " + " | ".join(bench.LITE_COLUMNS) + " |" in md and "\n| 1 | " in md
    assert "package model not timed: not requested" in md
    assert tools_main.resolve("bench_lite") is bench.lite_main
    assert bench.render_lite({"error": "SamCheckpointError: x"})[-1] == "Skipped: SamCheckpointError: x"
    assert bench._thread_counts(2) == [2] and bench._thread_counts("2,1") == bench._thread_counts((2, 1)) == [2, 1]


# ---------------------------------------------------------------------------- a method the bench does not know
_FAKE_NETWORK = '''
import torch
from torch import nn

from shared_nets.sam import EmbeddingCache


class Net(nn.Module):
    """Image channel 0 encoded (and cached without autograd), prompt channels joined before the decoder."""

    def __init__(self, in_channels: int = 3, out_channels: int = 2, width: int = 4) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.encoder = nn.Conv3d(1, width, 3, padding=1)
        self.decoder = nn.Conv3d(width + in_channels - 1, out_channels, 3, padding=1)
        self._embeddings = EmbeddingCache(16, self.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x[:, :1]
        entry = self._embeddings.lookup(image, None, lambda: self.encoder(image))
        feats = self.encoder(image) if entry is None else entry["value"]
        return self.decoder(torch.cat([feats, x[:, 1:]], 1))
'''

_FAKE_BENCH = """
import torch

from shared_nets.interface import BenchCase, RepromptParts, count_flops


class Case(BenchCase):
    slice_based = False
    prompted = True
    memory_target = {"img_size": 16, "num_slices": 2}
    report_note = "the fake method caches its encoder"

    def __init__(self):
        self.calls = {"train_forward": 0, "memory_input": 0, "checkpointing": []}

    def prompt_channels(self, net):
        return ("foreground", "background")

    def train_forward(self, net, core, x, y):
        self.calls["train_forward"] += 1
        return net(x)

    def set_gradient_checkpointing(self, net, on):
        self.calls["checkpointing"].append(on)

    def memory_estimate_input(self, net, size, depth):
        self.calls["memory_input"] += 1
        return torch.zeros(1, net.in_channels, size, size, depth)

    def reprompt_parts(self, net, parser):
        image = torch.randn(1, 1, 32, 32, 4)
        enc, feats = count_flops(lambda: net.encoder(image))
        dec, _ = count_flops(lambda: net.decoder(torch.randn(1, feats.shape[1] + 2, 32, 32, 4)))
        return RepromptParts(enc, 0, dec, "@32", real_extra=lambda: 7)


BENCH_CASE = Case()
"""


@pytest.fixture()
def fake_method(tmp_path, monkeypatch):
    """A method package ``benchfake_method`` (network + ``bench.BENCH_CASE``) importable for one test."""
    pkg = tmp_path / "src" / "benchfake_method"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import bench, network\n")
    (pkg / "network.py").write_text(_FAKE_NETWORK)
    (pkg / "bench.py").write_text(_FAKE_BENCH)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield "benchfake_method"
    for name in [m for m in sys.modules if m.split(".")[0] == "benchfake_method"]:
        del sys.modules[name]


def test_a_new_method_needs_no_edit_to_the_bench(fake_method, tmp_path):
    """run_bench measures an unknown method through its BENCH_CASE alone: its prompt channels, 3D input,
    binary target, training forward, re-prompt FLOP split and memory-estimate hooks are all used."""
    bundles = tmp_path / "bundles"
    common = {
        "device": "$torch.device('cpu')",
        "variant": "tiny",
        "img_size": 32,
        "num_slices": 2,
        "batch_size": 1,
        "network_def": {"_target_": f"{fake_method}.network.Net", "in_channels": 3, "out_channels": 2},
        "network": "$@network_def.to(@device)",
    }
    _write(
        bundles / "fake" / "configs" / "train.json",
        {
            **common,
            "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
            "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 1e-3},
        },
    )
    _write(
        bundles / "fake" / "configs" / "inference.json",
        {
            **common,
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 4], "sw_batch_size": 2},
        },
    )
    res = run_bench(
        bundles="fake",
        bundles_dir=bundles,
        img_size=64,
        batch_size=1,
        volume_shape=(32, 32, 8),
        peers=(),
        sdpa_block_size=0,
        warmup=0,
        repeat=1,
        min_time=0.0,
        out=tmp_path / "out" / "bench",
        data_loading=False,
        lite=False,
    )
    (row,) = res["bundles"]
    case = sys.modules[f"{fake_method}.bench"].BENCH_CASE
    assert row["status"] == "ok" and row["network"] == "Net", row.get("error")
    # 3D input (img_size 64 not applied, volume not resized), image + 2 guidance channels
    assert row["img_size"] == 32 and row["input_channels"] == 3 and row["train_input"] == [1, 3, 32, 32, 4]
    assert row["volume"] == [1, 3, 32, 32, 8] and case.calls["train_forward"] >= 2  # warm-up-free: step + switches
    # interactive: the cache is found, the re-prompt reuses it and gives the uncached answer
    (rp,) = row["reprompt"]
    assert rp["setting"] == "default" and rp["encoder_runs"] == 0 and rp["max_abs_diff_vs_uncached"] < 1e-6
    from shared_nets.interface import count_flops

    net = sys.modules[f"{fake_method}.network"].Net()
    enc = count_flops(lambda: net.encoder(torch.zeros(1, 1, 32, 32, 4)))[0]
    dec = count_flops(lambda: net.decoder(torch.zeros(1, 6, 32, 32, 4)))[0]
    fl = rp["flops"]
    assert (fl["network"], fl["config"], fl["encoder"], fl["prompt_path"]) == ("Net", "tiny@32", enc, dec + 7)
    assert fl["ratio"] == round((dec + 7) / (enc + dec + 7), 4)
    # real-size memory at the case's target, through its input and checkpointing hooks
    (est,) = res["memory_estimates"]
    assert est["bundle"] == "fake" and est["config"] == "tiny@16, 2 slices, batch 1" and est["none"]["total_gb"] > 0
    assert case.calls["memory_input"] == 1 and case.calls["checkpointing"] == [False, True, False, True]
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "| fake | default |" in md and "the fake method caches its encoder." in md


def test_unknown_targets_get_the_default_case():
    from shared_nets.interface import BenchCase, bench_case

    for target in (None, "torch.nn.Conv3d", "shared_nets.does_not_exist.Net", "$torch.nn.Identity()"):
        case = bench_case(target)
        assert type(case) is BenchCase and case.prompt_channels(torch.nn.Identity()) == ()
        assert case.slice_based and not case.prompted and case.memory_target is None


def test_the_bench_names_no_method():
    """tools/bench and the interface ask the methods; no method package or class name appears in them."""
    import re

    import shared_nets

    root = Path(shared_nets.__file__).parent
    packages = sorted(p.parent.name for p in root.glob("*/bench.py"))
    names = set(packages)
    for pkg in packages:
        module = __import__(f"shared_nets.{pkg}", fromlist=["__all__"])
        names |= {
            n
            for n in getattr(module, "__all__", [])
            if isinstance(getattr(module, n, None), type) and issubclass(getattr(module, n), torch.nn.Module)
        }
    assert {"ma_sam", "med_sa", "sam3d_adapter", "MASAM", "MedSA", "SAM3DAdapter", "HSAM", "SSAM"} <= names
    names |= {"MA-SAM", "Med-SA", "3DSAM-adapter", "S-SAM", "H-SAM"}  # as the papers write them
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names))) + r")\b")
    files = sorted((REPO / "tools" / "bench").glob("*.py")) + [root / "interface.py"]
    hits = [
        f"{f.name}:{i}: {m.group(0)}"
        for f in files
        for i, line in enumerate(f.read_text().splitlines(), 1)
        for m in [pattern.search(line)]
        if m
    ]
    assert not hits, hits


# ---------------------------------------------------------------------------- real-size estimates (fake tensors)
@pytest.mark.parametrize("bundle, official", [("sam3d_adapter", False), ("med_sa", False), ("med_sa", True)])
def test_real_size_reprompt_flops_meet_the_target(bundle, official):
    """Counted with fake tensors at the bundles' train.json sizes (ViT-B 128^3, ViT-H 1024^2 x 16)."""
    from shared_nets.med_sa.network import MEDSA_OFFICIAL_CODE_SETTINGS

    out = bench.reprompt_flops(REPO / "bundles" / bundle, dict(MEDSA_OFFICIAL_CODE_SETTINGS) if official else {})
    assert out["encoder"] > 10 * out["prompt_path"] > 0
    assert out["ratio"] <= 0.05


def test_reprompt_flops_of_a_network_without_cache(tmp_path):
    _dummy_bundle(tmp_path / "dummy", "torch.nn.Conv3d")  # no BENCH_CASE: the default case has no re-prompt split
    assert bench.reprompt_flops(tmp_path / "dummy") == {"network": "Conv3d", "error": "no cached image embedding"}


def test_train_memory_estimate_orders_the_switches():
    """The fake-tensor estimate behind the benchmark's real-size memory table (tiny here)."""
    est = bench.train_memory_estimate(REPO / "bundles" / "ma_sam", {"variant": "tiny", "img_size": 64, "num_slices": 2})
    act = {k: est[k]["activations_gb"] for k in ("none", "grad-ckpt", "AMP", "both")}
    assert act["grad-ckpt"] < act["none"] / 2 and act["AMP"] < act["none"] and act["both"] < act["grad-ckpt"]
    assert est["none"]["total_gb"] == pytest.approx(act["none"] + est["state_gb"])


# ---------------------------------------------------------------------------- CPU deployment (ONNX Runtime vs eager)
def test_deploy_section_on_a_conv_bundle(tmp_path):
    """ONNX Runtime vs eager on one CT input: both timed, equal logits, the rendered row; lite needs lite.json."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ct = REPO / "data" / "totalsegmentator_example" / "ct.nii.gz"
    if not ct.is_file():
        pytest.skip(f"example CT {ct} is absent")
    _dummy_bundle(tmp_path / "conv", "torch.nn.Conv3d")
    pre = {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "ensure_channel_first": True},
            {"_target_": "Resized", "keys": "image", "spatial_size": [32, 32, -1]},
        ],
    }
    cfg = json.loads((tmp_path / "conv" / "configs" / "inference.json").read_text())
    _write(tmp_path / "conv" / "configs" / "inference.json", {**cfg, "preprocessing": pre})
    threads = torch.get_num_threads()
    res = bench.deploy_speed_bench("conv", "conv", threads=1, bundles_dir=tmp_path, warmup=0, repeat=2)
    assert torch.get_num_threads() == threads
    row, lite = res["rows"]
    assert "error" not in row and "onnx_error" not in row, row
    assert "error" not in row["rows"][0].get("eager", {}) and "error" not in row["rows"][0].get("onnx", {}), row
    assert row["variant"] == "tiny" and row["input"] == [[1, 1, 32, 32, 1]] and row["onnx_mb"] >= 0
    assert row["part"] == "whole network (Conv3d)" and "compile_first_call_s" not in row
    (r,) = row["rows"]
    assert r["threads"] == 1 and r["eager"]["runs"] == r["onnx"]["runs"] == 2 and "compile" not in r
    assert r["onnx_check"]["max_abs_diff"] <= 1e-4 and r["onnx_check"]["argmax_agreement"] == 1.0
    assert r["onnx_speedup"] == pytest.approx(r["eager"]["time_s"] / r["onnx"]["time_s"], rel=1e-2)
    assert lite["variant"] == "lite" and "configs/lite.json" in lite["error"]
    md = "\n".join(bench.render_deploy(res))
    assert "| " + " | ".join(bench.DEPLOY_COLUMNS) + " |" in md and "\n| conv | tiny | 1×1×32×32×1 | 1 | " in md
    assert "- conv (lite): ValueError" in md and "torch.compile not run" in md
    assert tools_main.resolve("bench_deploy") is bench.deploy_main
