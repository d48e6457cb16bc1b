"""Bounded memory on a large CT: MA-SAM inference of a 512 x 512 x 600 volume.

The bundle runs the way users run it, ``python -m monai.bundle run`` with
``configs/inference.json`` + ``configs/demo.json`` (tiny SAM, CPU, in-plane ``img_size`` 64), in a
child process whose peak RSS is read from ``os.wait4`` through a small launcher (``tests/peak_rss.py``: that
run's own ``ru_maxrss``, not this pytest process's, which a direct child inherits).

The bound (arithmetic in :func:`memory_bound`; V = one float32 copy of the input volume,
512 * 512 * 600 * 4 B = 600 MiB):

* runtime: interpreter + torch + MONAI + the tiny network, 1280 MiB (822 MiB measured for the
  imports alone);
* volume-sized arrays: 6 V = 3600 MiB. ``LoadImaged`` holds the int16 file data (0.5 V) and its
  float32 copy (V); the intensity transforms (window clip/scale, z-score) run at full resolution
  and keep the input plus up to three float32 temporaries (about 4 V measured); after the in-plane
  resize the volume is small again, and ``Invertd`` + ``SaveImaged`` bring back one or two
  full-size arrays of the argmaxed prediction (1-2 V);
* the stitching buffer at the configured size: (K + 1) * img_size * img_size * D * 4 B with K = 14
  output channels plus MONAI's count map, 15 * 64 * 64 * 600 * 4 B = 141 MiB.

Measured on the 2-core CI-like machine (1 thread): peak RSS 3242 MiB against a bound of 5021 MiB
(1.55x headroom); the inference test takes 20-45 s depending on the load (the child
process: imports, reading, windowing and writing the volume), about 65 s on a cold file cache.
If the recipe broke and stitching happened at the
input's resolution, the buffer alone would be 15 * 512 * 512 * 600 * 4 B = 9000 MiB, far above the
bound: ``test_bound_would_catch_full_resolution_stitching`` checks that arithmetic.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.peak_rss import run_with_peak_rss

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ma_sam"
CONFIGS = ["inference.json", "demo.json"]
SHAPE = (512, 512, 600)
MIB = 1024 * 1024
RUNTIME_MIB = 1280  # interpreter + torch + MONAI + tiny network (imports alone measured at 822 MiB)
VOLUME_COPIES = 6  # full-size float32 arrays alive at the peak, with headroom (about 4 measured)
CHILD_TIMEOUT_S = 600


def _config_values() -> dict[str, int]:
    """Output channels and in-plane size of the MA-SAM demo configuration."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in CONFIGS])
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    return {
        "channels": int(meta["network_data_format"]["outputs"]["pred"]["num_channels"]),
        "img_size": int(parser["img_size"]),
    }


def stitch_buffer_bytes(channels: int, in_plane: int, depth: int) -> int:
    """MONAI's sliding-window output buffer plus its count map: ``(K + 1) * H * W * D`` float32."""
    return (channels + 1) * in_plane * in_plane * depth * 4


def memory_bound(channels: int, in_plane: int, shape: tuple[int, int, int] = SHAPE) -> int:
    """Peak-RSS bound in bytes: runtime + ``VOLUME_COPIES`` float32 input volumes + the stitch buffer."""
    volume = int(np.prod(shape)) * 4
    return RUNTIME_MIB * MIB + VOLUME_COPIES * volume + stitch_buffer_bytes(channels, in_plane, shape[2])


def write_big_ct(path: Path, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """An int16 CT-like phantom (air, body, liver, spleen, kidneys, spine) in an LPS-style affine.

    Organs are elliptic cylinders over a range of slices (cheap to draw at this size); the
    affine has negative in-plane spacings as scanners write them, so ``Orientationd`` flips.
    """
    h, w, d = shape
    x = (np.arange(h) - (h - 1) / 2)[:, None] / (h / 512)
    y = (np.arange(w) - (w - 1) / 2)[None, :] / (w / 512)
    img = np.full(shape, -1000, dtype=np.int16)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1

    z = lambda f: int(round(f * d))  # noqa: E731 - slice index from a fraction of the depth
    img[ellipse(0, 0, 230, 170), :] = 40  # soft tissue
    img[ellipse(-80, 10, 90, 70), z(0.25) : z(0.70)] = 60  # liver
    img[ellipse(110, 60, 40, 40), z(0.33) : z(0.55)] = 50  # spleen
    img[ellipse(-60, 90, 25, 35), z(0.10) : z(0.35)] = 30  # kidneys
    img[ellipse(60, 90, 25, 35), z(0.10) : z(0.35)] = 30
    img[ellipse(0, 120, 20, 20), :] = 400  # vertebrae
    affine = np.array([[-0.7, 0, 0, 180.0], [0, -0.7, 0, 160.0], [0, 0, 1.0, -300.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(img, affine), str(path))
    return affine


def write_tiny_model(path: Path) -> None:
    """``model.pt`` of a freshly built network from the demo configuration (random init)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in CONFIGS])
    parser.get_parsed_content("imports")
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), str(path))


def run_measured(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> tuple[int, int]:
    """Run ``cmd`` and return ``(exit status, peak RSS in bytes)`` of that run alone."""
    try:
        status, peak, _ = run_with_peak_rss(cmd, log, env, timeout, cwd=REPO)
    except TimeoutError as e:
        pytest.fail(str(e))
    return status, peak


@pytest.fixture()
def big_case(tmp_path):
    """Datalist with one 512 x 512 x 600 CT and a tiny model; the large files are removed afterwards."""
    affine = write_big_ct(tmp_path / "big_ct.nii")
    (tmp_path / "datalist.json").write_text(json.dumps({"test": [{"image": "big_ct.nii"}]}))
    write_tiny_model(tmp_path / "model.pt")
    yield tmp_path, affine
    for f in [tmp_path / "big_ct.nii", *tmp_path.glob("pred/*")]:
        f.unlink(missing_ok=True)


def test_bound_would_catch_full_resolution_stitching():
    cfg = _config_values()
    bound = memory_bound(cfg["channels"], cfg["img_size"])
    assert cfg["img_size"] < SHAPE[0], "demo.json must resize in-plane for this test to mean anything"
    full = stitch_buffer_bytes(cfg["channels"], SHAPE[0], SHAPE[2])
    assert full == 15 * 512 * 512 * 600 * 4  # 9000 MiB
    # stitching at the input's resolution could not fit under the bound even without anything else
    assert RUNTIME_MIB * MIB + full > bound


def test_ma_sam_inference_on_512x512x600_stays_bounded(big_case):
    data_dir, affine = big_case
    cfg = _config_values()
    bound = memory_bound(cfg["channels"], cfg["img_size"])
    out_dir = data_dir / "pred"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str([str(BUNDLE / "configs" / c) for c in CONFIGS]),
        "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
        "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
        "--bundle_root", str(BUNDLE),
        "--dataset_dir", str(data_dir),
        "--output_dir", str(out_dir),
        "--handlers#0#load_path", str(data_dir / "model.pt"),
    ]  # fmt: skip
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **threads, "PYTHONPATH": path}
    log = data_dir / "inference.log"
    status, peak = run_measured(cmd, log, env, CHILD_TIMEOUT_S)
    assert status == 0, f"inference failed (exit {status}):\n{log.read_text()[-3000:]}"

    preds = sorted(out_dir.glob("*_seg.nii*"))
    assert len(preds) == 1, f"expected one prediction in {out_dir}, got {preds}"
    pred = nib.load(str(preds[0]))  # header only: the data stays on disk
    assert pred.shape[:3] == SHAPE
    assert pred.header.get_data_dtype() == np.uint8
    np.testing.assert_allclose(pred.affine, affine, atol=1e-4)
    assert peak < bound, (
        f"peak RSS {peak / MIB:.0f} MiB exceeds the bound {bound / MIB:.0f} MiB "
        f"({RUNTIME_MIB} MiB runtime + {VOLUME_COPIES} x {np.prod(SHAPE) * 4 / MIB:.0f} MiB volume + "
        f"{stitch_buffer_bytes(cfg['channels'], cfg['img_size'], SHAPE[2]) / MIB:.0f} MiB stitch buffer)"
    )
    print(f"peak RSS {peak / MIB:.0f} MiB, bound {bound / MIB:.0f} MiB")
