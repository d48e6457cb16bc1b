"""Dataset recipes (``python -m tools prepare``) on fake folders with each dataset's published layout and names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shared_nets.data import DataError, load_datalist
from tools.prepare import RECIPES, main, prepare, recipe_options
from tools.recipes.abdomen import BTCV_ORGANS, BTCV_TEST_CASES, BTCV_TRAIN_CASES, SYNAPSE_TEST_CASES
from tools.recipes.common import DatasetLayoutError
from tools.recipes.few_shot import label_frequencies, write_few_shot_datalist
from tools.recipes.heart import LA_TEST_CASES
from tools.recipes.prostate import MA_SAM_PROSTATE_TEST
from tools.recipes.tumour import find_cases, random_split, write_datalist

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (8, 8, 4)
BTCV_IDS = (*range(1, 11), *range(21, 41))
AFFINE = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 90.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _labels(case: int, num_ids: int) -> np.ndarray:
    """Every id 0..num_ids-1 present, shifted per case so cases differ."""
    return ((np.arange(np.prod(SHAPE)) + case) % num_ids).reshape(SHAPE).astype(np.uint8)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _load(out: Path) -> dict:
    return json.loads((out / "datalist.json").read_text())


def _cases(content: dict, key: str) -> list[str]:
    return [item["case"] for item in content[key]]


@pytest.fixture(scope="module")
def btcv(tmp_path_factory) -> Path:
    """The Synapse download: Abdomen/RawData/Training/{img,label}, 30 cases; returns the Abdomen folder."""
    root = tmp_path_factory.mktemp("btcv") / "Abdomen"
    train = root / "RawData" / "Training"
    for n in BTCV_IDS:
        _save(train / "img" / f"img{n:04d}.nii.gz", np.full(SHAPE, n, np.int16))
        _save(train / "label" / f"label{n:04d}.nii.gz", _labels(n, 14))
    (root / "RawData" / "Testing" / "img").mkdir(parents=True)
    return root


def _checked_items(out: Path, key: str) -> list[dict]:
    return load_datalist(out / "datalist.json", key, keys=("image", "label"))


# ---------------------------------------------------------------- BTCV / Synapse


def test_btcv_fixed_split_references_sources(btcv, tmp_path):
    before = _snapshot(btcv)
    path = prepare("btcv", btcv, tmp_path / "out", progress=False)
    content = _load(path.parent)
    assert _cases(content, "training") == [f"img{i:04d}" for i in BTCV_TRAIN_CASES]
    assert _cases(content, "test") == [f"img{i:04d}" for i in range(35, 41)] == [f"img{i:04d}" for i in BTCV_TEST_CASES]
    assert content["validation"] == content["test"]  # the paper validates on its test cases
    assert (content["numTraining"], content["numTest"]) == (24, 6)
    assert content["labels"] == {str(k): v for k, v in BTCV_ORGANS.items()}
    assert content["modality"] == {"0": "CT"} and content["prepare"]["dataset"] == "btcv"
    for item in content["training"] + content["test"]:
        assert not os.path.isabs(item["image"]) and not os.path.isabs(item["label"])
    # labels need no mapping: referenced where they are, nothing written besides the datalist
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["datalist.json"]
    items = _checked_items(tmp_path / "out", "training")
    assert Path(items[0]["label"]).resolve() == (btcv / "RawData/Training/label/label0001.nii.gz").resolve()
    assert _snapshot(btcv) == before


def test_btcv_merge_adrenals_writes_mapped_labels(btcv, tmp_path):
    before = _snapshot(btcv)
    out = tmp_path / "merged"
    prepare("btcv", btcv / "RawData", out, merge_adrenals=True, progress=False)  # --src at RawData works too
    content = _load(out)
    assert set(content["labels"]) == {str(i) for i in range(13)} and content["labels"]["12"] == "adrenal gland"
    items = _checked_items(out, "test")
    for item in items:
        assert Path(item["label"]).parent == out.resolve() / "labelsTr"
        n = int(Path(item["image"]).name[3:7])
        src = _labels(n, 14)
        got = np.asarray(nib.load(item["label"]).dataobj)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, np.where(src == 13, 12, src))
        np.testing.assert_allclose(nib.load(item["label"]).affine, AFFINE)
    assert _snapshot(btcv) == before


def test_synapse_split_and_label_ids(btcv, tmp_path):
    from shared_nets.labels import BTCV_TO_SYNAPSE

    out = tmp_path / "synapse"
    prepare("synapse", btcv, out, label_ids="synapse", progress=False)
    content = _load(out)
    assert _cases(content, "test") == [f"img{i:04d}" for i in (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)]
    assert tuple(int(c[3:]) for c in _cases(content, "test")) == SYNAPSE_TEST_CASES
    assert len(content["training"]) == 18 and not set(_cases(content, "training")) & set(_cases(content, "test"))
    assert content["labels"] == {
        "0": "background",
        "1": "spleen",
        "2": "right kidney",
        "3": "left kidney",
        "4": "gallbladder",
        "5": "liver",
        "6": "stomach",
        "7": "aorta",
        "8": "pancreas",
    }
    for item in _checked_items(out, "training")[:3]:
        n = int(Path(item["image"]).name[3:7])
        got = np.asarray(nib.load(item["label"]).dataobj)
        np.testing.assert_array_equal(got, np.asarray(BTCV_TO_SYNAPSE)[_labels(n, 14)])
        src = _labels(n, 14)
        assert (
            (got[src == 6] == 5).all() and (got[src == 8] == 7).all() and (got[src == 11] == 8).all()
        )  # liver, aorta, pancreas
        assert (got[np.isin(src, (5, 9, 10, 12, 13))] == 0).all()  # organs outside the 8 become background
    # default: keep BTCV ids, which h_sam's default config maps itself (mapping twice corrupts labels)
    prepare("synapse", btcv, tmp_path / "btcv_ids", progress=False)
    assert not (tmp_path / "btcv_ids" / "labelsTr").exists()
    assert _load(tmp_path / "btcv_ids")["labels"] == {str(k): v for k, v in BTCV_ORGANS.items()}


@pytest.mark.parametrize(
    "bundle, dataset, options",
    [("ma_sam", "btcv", {}), ("s_sam", "btcv", {}), ("h_sam", "synapse", {"label_ids": "synapse"})],
)
def test_labels_match_bundle_channel_def(btcv, tmp_path, bundle, dataset, options):
    meta = ROOT / "bundles" / bundle / "configs" / "metadata.json"
    if not meta.is_file():
        pytest.skip(f"{meta} not found")
    channel_def = json.loads(meta.read_text())["network_data_format"]["outputs"]["pred"]["channel_def"]
    prepare(dataset, btcv, tmp_path / "o", progress=False, **options)
    assert _load(tmp_path / "o")["labels"] == channel_def


def test_held_out_validation_is_seeded(btcv, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1), ("d", 2), ("e", 3)):
        prepare("btcv", btcv, tmp_path / name, seed=seed, num_val=2, progress=False)
        runs[name] = _load(tmp_path / name)
    a = runs["a"]
    assert len(a["training"]) == 22 and len(a["validation"]) == 2 and len(a["test"]) == 6
    assert not set(_cases(a, "validation")) & (set(_cases(a, "training")) | set(_cases(a, "test")))
    assert set(_cases(a, "validation")) <= {f"img{i:04d}" for i in BTCV_TRAIN_CASES}
    assert a["training"] == runs["b"]["training"] and a["validation"] == runs["b"]["validation"]
    assert len({tuple(_cases(r, "validation")) for r in runs.values()}) > 1


def test_btcv_bad_layouts(btcv, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match=r"empty.*RawData/Training/img/img0001\.nii\.gz"):
        prepare("btcv", empty, tmp_path / "o1", progress=False)
    (tmp_path / "transunet" / "train_npz").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="TransUNet's preprocessed slices"):
        prepare("synapse", tmp_path / "transunet", tmp_path / "o2", progress=False)
    partial = tmp_path / "partial" / "Training"
    for n in (1, 2, 35):
        _save(partial / "img" / f"img{n:04d}.nii.gz", np.zeros(SHAPE, np.int16))
        _save(partial / "label" / f"label{n:04d}.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(DatasetLayoutError, match="img0003"):
        prepare("btcv", tmp_path / "partial", tmp_path / "o3", progress=False)
    (partial / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(DatasetLayoutError, match=r"img0002\.nii\.gz' has no label"):
        prepare("btcv", tmp_path / "partial", tmp_path / "o4", progress=False)
    with pytest.raises(ValueError, match="inside src"):
        prepare("btcv", btcv, btcv / "prepared", progress=False)
    with pytest.raises(ValueError, match=r"merge_adrenal.*options are"):
        prepare("btcv", btcv, tmp_path / "o5", merge_adrenal=True)
    with pytest.raises(ValueError, match="label_ids must be"):
        prepare("synapse", btcv, tmp_path / "o6", label_ids="transunet", progress=False)
    with pytest.raises(ValueError, match="dataset must be one of"):
        prepare("btcv2", btcv, tmp_path / "o7")
    assert not (btcv / "prepared").exists()


def test_label_ids_outside_dataset_are_rejected(tmp_path):
    train = tmp_path / "src" / "RawData" / "Training"
    for n in BTCV_IDS:
        _save(train / "img" / f"img{n:04d}.nii.gz", np.zeros(SHAPE, np.int16))
        _save(train / "label" / f"label{n:04d}.nii.gz", np.full(SHAPE, 20 if n == 5 else 1, np.uint8))
    with pytest.raises(DataError, match=r"label0005\.nii\.gz' holds ids \[20\]"):
        prepare("synapse", tmp_path / "src", tmp_path / "out", label_ids="synapse", progress=False)


def test_cli_main(btcv, tmp_path, capsys):
    from tools.__main__ import main as tools_main

    assert (
        tools_main(["prepare", "synapse", "--src", str(btcv), "--out", str(tmp_path / "cli"), "--progress", "False"])
        == 0
    )
    assert "training 18, validation 12, test 12" in capsys.readouterr().out
    assert _load(tmp_path / "cli")["prepare"]["command"].startswith(
        "python -m tools prepare synapse --src SRC --out OUT --seed 0"
    )
    assert all(name in main() for name in RECIPES)  # no dataset: lists the recipes
    with pytest.raises(SystemExit) as e:
        (tmp_path / "empty").mkdir()
        main("btcv", src=str(tmp_path / "empty"), out=str(tmp_path / "x"), progress=False)
    assert e.value.code == 1 and "error: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main("btcv", src=str(btcv), out=str(tmp_path / "y"), bogus=1)
    assert e.value.code == 2


# ---------------------------------------------------------------- 3DSAM-adapter tumour sets


def _msd(root: Path, task: str, prefix: str, n: int) -> Path:
    folder = root / task
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "dataset.json").write_text(
        json.dumps({"name": task.split("_")[1], "modality": {"0": "CT"}, "labels": {"0": "background", "1": prefix}})
    )
    for i in range(1, n + 1):
        _save(folder / "imagesTr" / f"{prefix}_{i:03d}.nii.gz", np.zeros(SHAPE, np.int16))
        _save(folder / "labelsTr" / f"{prefix}_{i:03d}.nii.gz", _labels(i, 3))
    (folder / "imagesTr" / f"._{prefix}_001.nii.gz").write_bytes(b"macOS resource fork")
    return folder


@pytest.fixture(scope="module")
def tumour_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tumour")
    sets = {
        "msd_pancreas": _msd(root, "Task07_Pancreas", "pancreas", 10),
        "msd_colon": _msd(root, "Task10_Colon", "colon", 10),
    }
    for i in range(10):
        case = root / "kits21" / "kits21" / "data" / f"case_{i:05d}"
        _save(case / "imaging.nii.gz", np.zeros(SHAPE, np.int16))
        _save(case / "aggregated_MAJ_seg.nii.gz", _labels(i, 4))
    sets["kits21"] = root / "kits21"
    for i in range(10):
        batch = root / "lits" / f"Training Batch {1 + i // 5}"
        _save(batch / f"volume-{i}.nii", np.zeros(SHAPE, np.int16))
        _save(batch / f"segmentation-{i}.nii", _labels(i, 3))
    sets["lits17"] = root / "lits"
    return sets


@pytest.mark.parametrize("dataset", ["msd_pancreas", "msd_colon", "kits21", "lits17"])
def test_tumour_sets_match_3dsam_adapter_split(tumour_sets, tmp_path, dataset):
    from shared_nets.sam3d_adapter.data import TUMOUR_DATASETS

    src = tumour_sets[dataset]
    prepare(dataset, src, tmp_path / "a", seed=3, progress=False)
    prepare(dataset, src, tmp_path / "b", seed=3, progress=False)
    a = _load(tmp_path / "a")
    assert a == _load(tmp_path / "b")
    assert [len(a[k]) for k in ("training", "validation", "test")] == [7, 1, 2]
    assert a["target_class"] == TUMOUR_DATASETS[dataset]["target_class"] and a["split"] == {
        **a["split"],
        "kind": "seeded",
        "seed": 3,
    }
    cases = [c for k in ("training", "validation", "test") for c in _cases(a, k)]
    assert len(set(cases)) == 10 and not any(c.startswith("._") for c in cases)
    # the same cases per list as the 3DSAM-adapter bundle's own writer, for the same seed
    root = {"msd_pancreas": src, "msd_colon": src, "kits21": src / "kits21" / "data", "lits17": src}[dataset]
    ref = json.loads(Path(write_datalist(dataset, root, tmp_path / "ref.json", seed=3)).read_text())
    for key in ("training", "validation", "test"):
        got = [
            str(Path(i["image"]).resolve())
            for i in load_datalist(tmp_path / "a" / "datalist.json", key, keys=("image", "label"))
        ]
        assert got == [i["image"] for i in ref[key]]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["datalist.json"]
    seeds = {tuple(_cases(_load(tmp_path / "a"), "test"))}
    for seed in (4, 5):
        prepare(dataset, src, tmp_path / f"s{seed}", seed=seed, progress=False)
        seeds.add(tuple(_cases(_load(tmp_path / f"s{seed}"), "test")))
    assert len(seeds) > 1


def test_tumour_bad_layouts(tumour_sets, tmp_path):
    with pytest.raises(DatasetLayoutError, match="describes 'Pancreas', not MSD Task10 Colon"):
        prepare("msd_colon", tumour_sets["msd_pancreas"], tmp_path / "o1")
    with pytest.raises(DatasetLayoutError, match=r"case_00000/imaging\.nii\.gz"):
        prepare("kits21", tumour_sets["lits17"], tmp_path / "o2")
    with pytest.raises(DatasetLayoutError, match="volume-0.nii"):
        prepare("lits17", tumour_sets["kits21"], tmp_path / "o3")


# ---------------------------------------------------------------- prostate (ITK .mhd, multi-site NIfTI)


def _itk_write(path: Path, array_xyz: np.ndarray, spacing=(0.6, 0.7, 3.0), origin=(10.0, -20.0, 5.0)) -> None:
    import itk

    path.parent.mkdir(parents=True, exist_ok=True)
    img = itk.image_from_array(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))  # ITK arrays are z, y, x
    img.SetSpacing(list(spacing))
    img.SetOrigin(list(origin))
    itk.imwrite(img, str(path))


def test_promise12_converts_mhd_to_nifti(tmp_path):
    src = tmp_path / "promise12"
    for i in range(10):
        part = src / f"TrainingData_Part{1 + i // 4}"
        _itk_write(part / f"Case{i:02d}.mhd", (np.arange(np.prod(SHAPE)).reshape(SHAPE) + i).astype(np.int16))
        _itk_write(part / f"Case{i:02d}_segmentation.mhd", (_labels(i, 2)))
    _itk_write(src / "TestData" / "Case00.mhd", np.zeros(SHAPE, np.int16))  # unlabelled test images are not used
    before = _snapshot(src)
    prepare("promise12", src, tmp_path / "a", seed=1, num_test=2, progress=False)
    prepare("promise12", src, tmp_path / "b", seed=1, num_test=2, progress=False)
    a = _load(tmp_path / "a")
    assert a == _load(tmp_path / "b") and a["modality"] == {"0": "MRI"}
    assert [len(a[k]) for k in ("training", "validation", "test")] == [8, 2, 2]
    assert sorted(_cases(a, "training") + _cases(a, "test")) == [f"Case{i:02d}" for i in range(10)]
    item = load_datalist(tmp_path / "a" / "datalist.json", "training", keys=("image", "label"))[0]
    i = int(item["case"][4:])
    img, lab = nib.load(item["image"]), nib.load(item["label"])
    np.testing.assert_array_equal(
        np.asarray(img.dataobj), (np.arange(np.prod(SHAPE)).reshape(SHAPE) + i).astype(np.int16)
    )
    np.testing.assert_array_equal(np.asarray(lab.dataobj), _labels(i, 2))
    # ITK's LPS geometry as a RAS affine: x and y flipped, spacing and origin kept
    np.testing.assert_allclose(
        img.affine, [[-0.6, 0, 0, -10.0], [0, -0.7, 0, 20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]], atol=1e-6
    )
    np.testing.assert_allclose(lab.affine, img.affine)
    assert lab.get_data_dtype() == np.uint8 and img.get_data_dtype() == np.int16
    assert not list((tmp_path / "a").rglob(".tmp_*"))
    assert _snapshot(src) == before
    with pytest.raises(DatasetLayoutError, match="CaseNN_segmentation.mhd"):
        prepare("promise12", tmp_path / "b", tmp_path / "c")


@pytest.fixture(scope="module")
def prostate_sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prostate")
    folders = {"A": "RUNMC", "B": "BMC", "C": "I2CVB", "D": "UCL", "E": "BIDMC", "F": "HK"}
    for site, folder in folders.items():
        test = MA_SAM_PROSTATE_TEST[site]
        extra = [i for i in range(50) if i not in test][:2]
        for n in (*test, *extra):
            seg = "Segmentation" if site in "EF" else "segmentation"
            _save(root / folder / f"Case{n:02d}.nii.gz", np.zeros(SHAPE, np.float32))
            _save(root / folder / f"Case{n:02d}_{seg}.nii.gz", _labels(n, 3).astype(np.float32))  # 0, 1, 2 as float
    return root


def test_prostate_multisite_split_and_binary_labels(prostate_sites, tmp_path):
    before = _snapshot(prostate_sites)
    prepare("prostate_multisite", prostate_sites, tmp_path / "all", progress=False)
    content = _load(tmp_path / "all")
    expected_test = {
        f"{name}_Case{n:02d}"
        for site, name in zip("ABCDEF", ("RUNMC", "BMC", "HCRUDB", "UCL", "BIDMC", "HK"))
        for n in MA_SAM_PROSTATE_TEST[site]
    }
    assert set(_cases(content, "test")) == expected_test and len(content["training"]) == 12
    assert content["sites"] == {"A": "RUNMC", "B": "BMC", "C": "HCRUDB", "D": "UCL", "E": "BIDMC", "F": "HK"}
    for item in load_datalist(tmp_path / "all" / "datalist.json", "test", keys=("image", "label"))[:4]:
        n = int(item["case"].split("_Case")[1])
        got = np.asarray(nib.load(item["label"]).dataobj)
        np.testing.assert_array_equal(got, (_labels(n, 3) > 0).astype(np.uint8))
        assert item["site"] in content["sites"].values()
    prepare("prostate_multisite", prostate_sites, tmp_path / "a", sites="A", progress=False)
    site_a = _load(tmp_path / "a")
    assert {i["site"] for i in site_a["training"] + site_a["test"]} == {"RUNMC"} and len(site_a["test"]) == 6
    assert _snapshot(prostate_sites) == before
    with pytest.raises(ValueError, match="sites must be"):
        prepare("prostate_multisite", prostate_sites, tmp_path / "x", sites="G")
    with pytest.raises(DatasetLayoutError, match=r"no folder for Site A \(RUNMC or ISBI\)"):
        prepare("prostate_multisite", prostate_sites / "HK", tmp_path / "y", sites="A")


def test_prostate_multisite_missing_test_case(tmp_path):
    for n in (3, 8):
        _save(tmp_path / "src" / "UCL" / f"Case{n:02d}.nii.gz", np.zeros(SHAPE, np.float32))
        _save(tmp_path / "src" / "UCL" / f"Case{n:02d}_segmentation.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(DatasetLayoutError, match="Site D .*Case01, Case32, Case34"):
        prepare("prostate_multisite", tmp_path / "src", tmp_path / "out", sites="UCL")


# ---------------------------------------------------------------- LA (ITK .nrrd, UA-MT .h5)

LA_TRAIN = (
    "06SR5RBREL16DQ6M8LWS",
    "0RZDK210BSMWAA6467LU",
    "1D7CUD1955YZPGK8XHJX",
    "1GU15S0GJ6PFNARO469W",
    "1MHBF3G6DCPWHSKG7XCP",
)


def test_la_nrrd_split_few_shot_and_labels(tmp_path):
    src = tmp_path / "LA" / "Training Set"
    for k, case in enumerate((*LA_TEST_CASES, *LA_TRAIN[::-1])):
        _itk_write(
            src / case / "lgemri.nrrd", np.full(SHAPE, k, np.uint8), spacing=(0.625, 0.625, 0.625), origin=(0, 0, 0)
        )
        _itk_write(
            src / case / "laendo.nrrd", (_labels(k, 2) * 255).astype(np.uint8), spacing=(0.625,) * 3, origin=(0, 0, 0)
        )
    before = _snapshot(tmp_path / "LA")
    prepare("la", tmp_path / "LA", tmp_path / "out", num_labeled=4, progress=False)
    content = _load(tmp_path / "out")
    assert _cases(content, "test") == list(LA_TEST_CASES) and content["validation"] == content["test"]
    assert _cases(content, "training") == list(LA_TRAIN[:4]) and _cases(content, "unlabeled") == [LA_TRAIN[4]]
    item = load_datalist(tmp_path / "out" / "datalist.json", "training", keys=("image", "label"))[0]
    lab = nib.load(item["label"])
    k = len(LA_TEST_CASES) + LA_TRAIN[::-1].index(item["case"])
    np.testing.assert_array_equal(np.asarray(lab.dataobj), _labels(k, 2))  # 255 -> 1
    np.testing.assert_allclose(lab.affine, np.diag([-0.625, -0.625, 0.625, 1.0]), atol=1e-6)
    assert _snapshot(tmp_path / "LA") == before
    with pytest.raises(ValueError, match="num_labeled must be"):
        prepare("la", tmp_path / "LA", tmp_path / "o2", num_labeled=0)
    (src / LA_TEST_CASES[3] / "lgemri.nrrd").unlink()
    (src / LA_TEST_CASES[3] / "laendo.nrrd").unlink()
    with pytest.raises(DatasetLayoutError, match=f"lacks 1 of UA-MT's 20 LA test scans \\(e.g. {LA_TEST_CASES[3]}"):
        prepare("la", tmp_path / "LA", tmp_path / "o3")


def test_la_uamt_h5(tmp_path):
    h5py = pytest.importorskip("h5py")
    src = tmp_path / "LA" / "2018LA_Seg_Training Set"
    for k, case in enumerate((*LA_TEST_CASES, *LA_TRAIN[:2])):
        (src / case).mkdir(parents=True)
        with h5py.File(src / case / "mri_norm2.h5", "w") as f:
            f["image"] = np.full(SHAPE, k / 10, np.float32)
            f["label"] = _labels(k, 2)
    prepare("la", tmp_path / "LA", tmp_path / "out", progress=False)
    content = _load(tmp_path / "out")
    assert _cases(content, "training") == list(LA_TRAIN[:2]) and len(content["test"]) == 20
    item = load_datalist(tmp_path / "out" / "datalist.json", "training", keys=("image", "label"))[1]
    np.testing.assert_allclose(np.asarray(nib.load(item["image"]).dataobj), 21 / 10)
    np.testing.assert_array_equal(np.asarray(nib.load(item["label"]).dataobj), _labels(21, 2))


def test_every_recipe_takes_seed_and_progress():
    for name in RECIPES:
        opts = recipe_options(name)
        assert opts["seed"] == 0 and opts["progress"] is True, name


# ---------------------------------------------------------------- AMOS 22 (MA-SAM Fig. 6)


@pytest.fixture(scope="module")
def amos(tmp_path_factory) -> Path:
    """amos22/{imagesTr,labelsTr,imagesVa,labelsVa}: CT cases 1-6 (Tr) and 7-8 (Va), MRI 507-509 (Tr)."""
    root = tmp_path_factory.mktemp("amos") / "amos22"
    for part, ids in (("Tr", (1, 2, 3, 4, 5, 6, 507, 508)), ("Va", (7, 8, 509))):
        for n in ids:
            _save(root / f"images{part}" / f"amos_{n:04d}.nii.gz", np.full(SHAPE, n, np.int16))
            _save(root / f"labels{part}" / f"amos_{n:04d}.nii.gz", _labels(n, 16))
    (root / "imagesTs").mkdir()
    return root


def test_amos22_maps_the_twelve_shared_organs_to_btcv_ids(amos, tmp_path):
    from tools.recipes.abdomen import AMOS_TO_BTCV

    before = _snapshot(amos)
    content = _load(prepare("amos22", amos.parent, tmp_path / "ct", progress=False).parent)
    assert _cases(content, "test") == [f"amos_{n:04d}" for n in range(1, 9)]  # Tr + Va, CT only
    assert content["training"] == [] and content["validation"] == content["test"]
    assert content["modality"] == {"0": "CT"} and "10" not in content["labels"]  # no portal vein in AMOS
    assert len(content["labels"]) == 13  # background + 12 organs
    item = _checked_items(tmp_path / "ct", "test")[0]
    src = np.asarray(nib.load(str(amos / "labelsTr" / "amos_0001.nii.gz")).dataobj)
    out = np.asarray(nib.load(item["label"]).dataobj)
    for a, b in [(1, 1), (8, 8), (9, 9), (10, 11), (11, 12), (12, 13), (13, 0), (14, 0), (15, 0)]:
        assert AMOS_TO_BTCV[a] == b and np.all(out[src == a] == b), (a, b)
    assert _snapshot(amos) == before


def test_amos22_mri_shots_and_merged_adrenals(amos, tmp_path):
    content = _load(
        prepare("amos22", amos, tmp_path / "mri", modality="mri", shots=1, merge_adrenals=True, progress=False).parent
    )
    cases = _cases(content, "training") + _cases(content, "test")
    assert sorted(cases) == ["amos_0507", "amos_0508", "amos_0509"] and len(content["training"]) == 1
    assert content["labels"]["12"] == "adrenal gland" and "13" not in content["labels"]
    item = _checked_items(tmp_path / "mri", "test")[0]
    name = Path(item["image"]).name
    part = "Va" if name == "amos_0509.nii.gz" else "Tr"
    src = np.asarray(nib.load(str(amos / f"labels{part}" / name)).dataobj)
    out = np.asarray(nib.load(item["label"]).dataobj)
    assert np.all(out[src == 12] == 12) and np.all(out[src == 11] == 12)
    with pytest.raises(ValueError, match="shots"):
        prepare("amos22", amos, tmp_path / "bad", modality="mri", shots=3, progress=False)
    with pytest.raises(ValueError, match="modality"):
        prepare("amos22", amos, tmp_path / "bad2", modality="pet", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="AMOS 22"):
        prepare("amos22", tmp_path / "empty", tmp_path / "bad3", progress=False)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_tumour_find_cases_for_each_dataset_layout(tmp_path):
    for i in range(3):
        _touch(tmp_path / "kits" / f"case_{i:05d}" / "imaging.nii.gz")
        _touch(tmp_path / "kits" / f"case_{i:05d}" / "aggregated_MAJ_seg.nii.gz")
        _touch(tmp_path / "msd" / "imagesTr" / f"colon_{i:03d}.nii.gz")
        _touch(tmp_path / "msd" / "labelsTr" / f"colon_{i:03d}.nii.gz")
        _touch(tmp_path / "lits" / "batch" / f"volume-{10 - i}.nii")
        _touch(tmp_path / "lits" / "batch" / f"segmentation-{10 - i}.nii")
    _touch(tmp_path / "msd" / "imagesTr" / "._colon_000.nii.gz")  # macOS resource fork: ignored
    kits = find_cases("kits21", tmp_path / "kits")
    assert len(kits) == 3 and kits[0]["label"].endswith("case_00000/aggregated_MAJ_seg.nii.gz")
    assert len(find_cases("msd_colon", tmp_path / "msd")) == 3
    lits = find_cases("lits17", tmp_path / "lits")
    assert [c["image"].rsplit("-", 1)[1] for c in lits] == ["8.nii", "9.nii", "10.nii"]
    assert lits[0]["label"].endswith("segmentation-8.nii")
    _touch(tmp_path / "msd" / "imagesTr" / "colon_999.nii.gz")
    with pytest.raises(ValueError, match="has no label"):
        find_cases("msd_colon", tmp_path / "msd")
    with pytest.raises(ValueError, match="dataset must be one of"):
        find_cases("brats", tmp_path)
    with pytest.raises(ValueError, match="no lits17 cases"):
        find_cases("lits17", tmp_path / "kits")


def test_tumour_random_split_is_seeded_70_10_20(tmp_path):
    items = [{"image": f"img_{i:03d}", "label": f"lab_{i:03d}"} for i in range(50)]
    a, b = random_split(items, seed=3), random_split(list(reversed(items)), seed=3)
    assert a == b
    assert [len(a[k]) for k in ("training", "validation", "test")] == [35, 5, 10]
    names = [i["image"] for k in a for i in a[k]]
    assert sorted(names) == sorted(i["image"] for i in items)
    assert random_split(items, seed=4) != a
    with pytest.raises(ValueError, match="fractions"):
        random_split(items, fractions=(0.5, 0.5, 0.5))
    for i in range(10):
        _touch(tmp_path / "imagesTr" / f"p_{i}.nii.gz")
        _touch(tmp_path / "labelsTr" / f"p_{i}.nii.gz")
    out = json.loads(open(write_datalist("msd_pancreas", tmp_path)).read())
    assert out["target_class"] == 2 and len(out["training"]) == 7 and len(out["test"]) == 2


def test_few_shot_datalists(demo_data, tmp_path):
    src = demo_data / "datalist.json"
    out = tmp_path / "few_shot_10pct.json"  # elsewhere: the writer makes the paths absolute
    summary = write_few_shot_datalist(src, out, fraction=0.1, seed=3)
    content = json.loads(out.read_text())
    original = json.loads(src.read_text())
    depth = 24  # tests/conftest.py DEMO_SHAPE
    assert summary["total_slices"] == depth * len(original["training"])
    kept = sum(len(e["slices"]) for e in content["training"])
    assert kept == summary["slices"] == round(0.1 * summary["total_slices"])
    names = [Path(e["image"]).name for e in content["validation"]]
    assert names == [Path(e["image"]).name for e in original["validation"]]
    assert all(Path(e["image"]).is_file() and Path(e["label"]).is_file() for e in content["training"])
    again = tmp_path / "again.json"
    write_few_shot_datalist(src, again, fraction=0.1, seed=3)
    repeated = json.loads(again.read_text())["training"]
    assert [e["slices"] for e in repeated] == [e["slices"] for e in content["training"]]

    freqs = label_frequencies(out, num_classes=8, label_map="btcv_to_synapse")
    assert len(freqs) == 9 and freqs[4] == 0.0 and freqs[8] == 0.0 and sum(freqs) == pytest.approx(1.0)

    cases = tmp_path / "cases.json"
    write_few_shot_datalist(src, cases, num_cases=2, seed=0)
    chosen = json.loads(cases.read_text())["training"]
    assert len(chosen) == 2 and all(Path(e["image"]).is_file() for e in chosen)  # made absolute elsewhere
    with pytest.raises(ValueError, match="exactly one"):
        write_few_shot_datalist(src, cases, fraction=0.1, num_cases=2)
    with pytest.raises(ValueError, match="num_cases must be"):
        write_few_shot_datalist(src, cases, num_cases=99)
