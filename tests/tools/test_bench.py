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
    _write(root / "configs" / "train.json", {
        **common,
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 1e-3},
    })
    _write(root / "configs" / "inference.json", {
        **common, "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 4], "sw_batch_size": 2},
    })


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
            bundles="dummy,broken,ma_sam", bundles_dir=bundles, img_size=32, batch_size=1,
            volume_shape=(32, 32, 8), peers=("sam", "dynunet"), peer_roi=(32, 32, 8), peer_batch=1,
            sdpa_block_size=32, warmup=0, repeat=1, min_time=0.0, threads=1, out=out,
            data_num=3, data_shape=(32, 32, 8), data_epochs=2, memory_estimates=False, lite=False,
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
    assert row["peft_setting"] == {"finetune": "fact"}
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
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[2]))
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
    assert {k: dl[k]["batches"] for k in bench.DATASET_TYPES} == {k: dl["Dataset"]["batches"] for k in bench.DATASET_TYPES}
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
    res = bench.lite_encoder_bench(threads=[1], img_size=32, weights=None, reference=False, warmup=0, repeat=2,
                                   matmul_size=64)
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
