"""Session fixtures shared by all tests (phantom data is generated once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workers import cores_per_worker

# The longest test files, longest first (from CI's ``--durations`` report). Under ``pytest -n 2`` each file runs
# whole on one worker (``--dist loadfile``, kept in this order by ``--no-loadscope-reorder``, see setup.cfg), so
# starting these first keeps them from forming a serial tail. The order changes no result, only the wall time.
LONGEST_FIRST = (
    "test_demo.py",
    "test_paper_size.py",
    "test_distributed.py",
    "test_export.py",
    "test_monailabel_lite.py",
    "test_clinical_loop.py",
    "test_monailabel_server.py",
    "test_zero_shot.py",
    "test_fsdp.py",
    "test_large_volume.py",
)


def pytest_collection_modifyitems(config, items):
    """Run the longest test files first, then the other files that hold ``slow`` tests, then the rest.

    Files stay whole (their module fixtures are set up once) and keep their order within each group. The order
    is a pure function of the collected items, so every xdist worker computes the same one (xdist requires it)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple[int, int]:
        if item.path.name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(item.path.name)
        return (1 if item.path in slow_files else 2), 0

    items.sort(key=rank)  # stable


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """Tiny models run faster on one thread (no threading overhead on small tensors, no oversubscription
    when CI's 2 cores also run data loading or torchrun workers); big-tensor tests opt back in with
    ``torch_threads``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def torch_threads():
    """Use all cores (this xdist worker's share of them) for one test (e.g. the ViT-B parity check at 1024)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cores_per_worker())
    yield
    torch.set_num_threads(before)


# small phantoms for bundle tests: BTCV label ids plus a binary tumour file per case
DEMO_SHAPE = (64, 64, 24)
DEMO_NUM = 6


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A phantom dataset written once per test session; returns the folder holding ``datalist.json``."""
    from shared_nets.phantom import write_demo_dataset

    out = tmp_path_factory.mktemp("demo_data")
    write_demo_dataset(out, num=DEMO_NUM, seed=0, shape=DEMO_SHAPE, progress=False)
    return out


# The real CT example ships in the repository (data/); ../shared beside the checkout holds the same files.
_REPO_CT = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator_example"
_SHARED_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalsegmentator_example"
REAL_CT = _REPO_CT if (_REPO_CT / "ct.nii.gz").is_file() else _SHARED_CT
# TotalSegmentator v2 "total" ids -> BTCV ids (organs both label; everything else -> background)
TOTALSEG_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 7, 7: 11, 8: 12, 9: 13, 52: 8, 63: 9, 64: 10}


@pytest.fixture(scope="session")
def real_ct(tmp_path_factory) -> Path:
    """The small real abdominal CT (data/totalsegmentator_example) with BTCV-id labels, as a datalist.

    Training/validation use the file as stored (RAS); the test list has it twice, as stored and
    re-oriented to LPS, so inference must give back each input's own affine and orientation.
    """
    import json

    import nibabel as nib
    import numpy as np

    if not (REAL_CT / "ct.nii.gz").is_file():
        pytest.skip("real CT example absent: no data/totalsegmentator_example/ct.nii.gz (nor a ../shared copy)")
    out = tmp_path_factory.mktemp("real_ct")
    ct, seg = nib.load(str(REAL_CT / "ct.nii.gz")), nib.load(str(REAL_CT / "seg.nii.gz"))
    ts = np.asarray(seg.dataobj)
    btcv = np.zeros(ts.shape, np.uint8)
    for src, dst in TOTALSEG_TO_BTCV.items():
        btcv[ts == src] = dst
    img = np.asarray(ct.dataobj)
    nib.save(nib.Nifti1Image(img, ct.affine), str(out / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(btcv, ct.affine), str(out / "ct_label.nii.gz"))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [img.shape[0] - 1, img.shape[1] - 1]
    lps_affine = ct.affine @ flip  # same world positions, first two axes reversed
    nib.save(nib.Nifti1Image(img[::-1, ::-1].copy(), lps_affine), str(out / "ct_lps.nii.gz"))
    nib.save(nib.Nifti1Image(btcv[::-1, ::-1].copy(), lps_affine), str(out / "ct_lps_label.nii.gz"))
    ras = {"image": "ct.nii.gz", "label": "ct_label.nii.gz", "tumour": "ct_label.nii.gz"}
    lps = {"image": "ct_lps.nii.gz", "label": "ct_lps_label.nii.gz", "tumour": "ct_lps_label.nii.gz"}
    content = {
        "name": "totalsegmentator_example",
        "labels": {},
        "training": [ras],
        "validation": [ras],
        "test": [ras, lps],
    }
    (out / "datalist.json").write_text(json.dumps(content))
    return out
