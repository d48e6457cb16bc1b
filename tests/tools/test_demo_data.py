"""Synthetic phantom generator (tools.demo_data) and the ``python -m tools`` dispatcher."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tools.demo_data import (
    PHANTOM_LABELS,
    make_phantom,
    phantom_affine,
    split_counts,
    write_demo_dataset,
)

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (48, 48, 16)
SPACING = (1.5, 1.5, 3.0)
ORGANS = (1, 2, 3, 6, 7)
TUMOUR_HOSTS = (2, 3, 6)


def _arrays(out: Path, case: int) -> tuple[np.ndarray, ...]:
    name = f"phantom_{case:03d}.nii.gz"
    return tuple(np.asanyarray(nib.load(out / d / name).dataobj) for d in ("imagesTr", "labelsTr", "tumoursTr"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_demo_dataset(out, num=4, seed=3, shape=SHAPE, spacing=SPACING, progress=False)
    return out


@pytest.mark.parametrize("shape", [(48, 48, 16), (32, 32, 8), (64, 40, 12), (96, 96, 48)])
def test_phantom_shapes_dtypes_and_organs(shape):
    image, label, tumour = make_phantom(shape, SPACING, np.random.default_rng(0))
    assert image.shape == label.shape == tumour.shape == shape
    assert image.dtype == np.int16 and label.dtype == np.uint8 and tumour.dtype == np.uint8
    assert set(np.unique(label)) == {0, *ORGANS, 8}
    assert set(np.unique(tumour)) == {0, 1}
    assert image.min() >= -1024 and image[0, 0].mean() < -900  # air in the corner


def test_phantom_without_aorta():
    _, label, _ = make_phantom(SHAPE, SPACING, 5, aorta=False)
    assert set(np.unique(label)) == {0, *ORGANS}


@pytest.mark.parametrize("seed", range(6))
def test_tumour_inside_liver_or_kidney(seed):
    image, label, tumour = make_phantom((96, 96, 48), SPACING, np.random.default_rng(seed))
    hosts = np.unique(label[tumour > 0])
    assert len(hosts) == 1 and hosts[0] in TUMOUR_HOSTS
    # Radius 3-6 voxels in-plane: the largest axial cross-section has that equivalent radius.
    area = (tumour > 0).sum(axis=(0, 1)).max()
    assert 2.5 <= np.sqrt(area / np.pi) <= 6.5
    # Hypodense: darker than the rest of its host organ.
    host = (label == hosts[0]) & (tumour == 0)
    assert np.median(image[tumour > 0]) < np.median(image[host]) - 30


@pytest.mark.parametrize("seed", range(4))
def test_organs_visible_in_ct_window(seed):
    image, label, tumour = make_phantom(SHAPE, SPACING, np.random.default_rng(seed))
    win = np.clip(image.astype(np.float32), -200, 250)
    background_tissue = (label == 0) & (image > -60)  # inside the body, no organ, no fat rim
    tissue = np.median(win[background_tissue])
    medians = {i: np.median(win[(label == i) & (tumour == 0)]) for i in (*ORGANS, 8)}
    for organ, m in medians.items():
        assert abs(m - tissue) > 20, (organ, m, tissue)
    assert medians[6] > medians[1]  # liver brighter than spleen
    assert min(medians[2], medians[3]) > medians[6] + 50  # contrast-enhanced kidneys
    assert medians[8] > max(medians[2], medians[3])  # aorta brightest


def test_phantom_is_deterministic():
    a = make_phantom(SHAPE, SPACING, np.random.default_rng(7))
    b = make_phantom(SHAPE, SPACING, np.random.default_rng(7))
    c = make_phantom(SHAPE, SPACING, np.random.default_rng(8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_files_and_affines(dataset):
    for case in range(4):
        for folder, dtype in (("imagesTr", np.int16), ("labelsTr", np.uint8), ("tumoursTr", np.uint8)):
            img = nib.load(dataset / folder / f"phantom_{case:03d}.nii.gz")
            assert img.shape == SHAPE
            assert img.get_data_dtype() == dtype
            np.testing.assert_allclose(np.diag(img.affine)[:3], SPACING)
            assert np.abs(img.affine[:3, 3]).min() > 1.0  # non-zero origin on every axis
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            np.testing.assert_allclose(img.header.get_zooms(), SPACING)
    leftovers = [p for p in dataset.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_datalist_loads_with_monai(dataset):
    from monai.data import load_decathlon_datalist

    path = dataset / "datalist.json"
    meta = json.loads(path.read_text())
    assert meta["labels"] == {str(k): v for k, v in PHANTOM_LABELS.items()}
    assert meta["modality"] == {"0": "CT"}
    counts = []
    for key in ("training", "validation", "test"):
        items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=dataset)
        counts.append(len(items))
        for item in items:
            assert set(item) == {"image", "label", "tumour"}
            assert all(Path(p).is_absolute() and Path(p).is_file() for p in item.values())
        assert all(not Path(e["image"]).is_absolute() for e in meta[key])  # stored relative
    assert tuple(counts) == split_counts(4) == (2, 1, 1)


def test_dataset_deterministic_and_prefix_stable(dataset, tmp_path):
    # Same seed, fewer cases: the first cases are the same arrays; another seed differs.
    write_demo_dataset(tmp_path / "same", num=3, seed=3, shape=SHAPE, spacing=SPACING, progress=False)
    write_demo_dataset(tmp_path / "other", num=3, seed=4, shape=SHAPE, spacing=SPACING, progress=False)
    for case in range(3):
        for x, y in zip(_arrays(dataset, case), _arrays(tmp_path / "same", case)):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(_arrays(dataset, 0)[0], _arrays(tmp_path / "other", 0)[0])


def test_lps_orientation_round_trips_through_orientationd(dataset, tmp_path):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    write_demo_dataset(tmp_path, num=3, seed=3, shape=SHAPE, spacing=SPACING, orientation="LPS", progress=False)
    lps = nib.load(tmp_path / "imagesTr" / "phantom_000.nii.gz")
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    np.testing.assert_allclose(lps.affine, phantom_affine(SHAPE, SPACING, "LPS"))
    keys = ["image", "label"]
    load = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS")])
    item = {"image": "imagesTr/phantom_000.nii.gz", "label": "labelsTr/phantom_000.nii.gz"}
    ras = load({k: str(dataset / v) for k, v in item.items()})
    flipped = load({k: str(tmp_path / v) for k, v in item.items()})
    for k in keys:
        np.testing.assert_array_equal(np.asarray(ras[k]), np.asarray(flipped[k]))
        np.testing.assert_allclose(np.asarray(ras[k].affine), np.asarray(flipped[k].affine), atol=1e-5)


@pytest.mark.parametrize(
    "num, expected", [(3, (1, 1, 1)), (4, (2, 1, 1)), (6, (4, 1, 1)), (12, (8, 2, 2)), (30, (20, 5, 5))]
)
def test_split_counts(num, expected):
    assert split_counts(num) == expected


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num": 2}, "num"),
        ({"seed": -1}, "seed"),
        ({"shape": (16, 16, 16)}, "shape"),
        ({"shape": "48,48"}, "shape"),
        ({"spacing": (1.0, -1.0, 1.0)}, "spacing"),
        ({"orientation": "XYZ"}, "orientation"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    args = {"num": 3, "shape": SHAPE, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=name):
        write_demo_dataset(tmp_path, **args)
    assert not (tmp_path / "datalist.json").exists()


def _run_tools(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "cli"
    proc = _run_tools("demo_data", "--out", str(out), "--num", "3", "--shape", "48,48,16", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out / "datalist.json")
    meta = json.loads((out / "datalist.json").read_text())
    assert [len(meta[k]) for k in ("training", "validation", "test")] == [1, 1, 1]
    expected = make_phantom(SHAPE, SPACING, np.random.default_rng(np.random.SeedSequence(1).spawn(1)[0]))
    for x, y in zip(_arrays(out, 0), expected):
        np.testing.assert_array_equal(x, y)


def test_cli_bad_argument_is_one_line(tmp_path):
    proc = _run_tools("demo_data", "--out", str(tmp_path), "--num", "2")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: num must be")


def test_dispatcher_lists_commands_and_rejects_unknown():
    from tools.__main__ import COMMANDS, main, resolve

    assert {"demo_data", "weights"} <= set(COMMANDS)
    for name in COMMANDS:  # a command is a function, or a dict of sub-commands (text_embeddings add|show)
        target = resolve(name)
        assert callable(target) or (isinstance(target, dict) and all(map(callable, target.values()))), name
    assert main([]) == 0
    with pytest.raises(ValueError, match="command"):
        resolve("nope")
    proc = _run_tools("nope")
    assert proc.returncode != 0
    assert "unknown command" in proc.stderr and "demo_data" in proc.stderr and "weights" in proc.stderr


def test_dispatcher_imports_only_the_requested_command():
    code = (
        "import sys; from tools.__main__ import resolve; resolve('demo_data'); "
        "print('tools.weights' in sys.modules, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
