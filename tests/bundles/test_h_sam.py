"""H-SAM bundle on phantoms through the shared harness (tiny SAM, CPU), plus its bad-input errors and few-shot
slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.bundle_harness import REPO, BundleHarness

BUNDLE = REPO / "bundles" / "h_sam"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny slices: one intra-op thread is faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TestHSAM(BundleHarness):
    bundle = "h_sam"
    # demo.json writes predictions in the phantoms' BTCV ids (up to 11) for tools/demo.py's Dice;
    # the harness checks label-map values against the 9 output channels, i.e. Synapse ids
    overrides = {"output_btcv_ids": False}


def _parser(data_dir: Path, *configs: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in (*configs, "demo.json")])
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(data_dir), **overrides})
    return parser


def _cause(exc: BaseException, kind: type) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``'s cause chain (MONAI wraps transform and config errors)."""
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__cause__ or exc.__context__
    return exc


def test_labels_beyond_num_classes_name_the_file(demo_data):
    """Phantom labels hold BTCV ids up to 8: without the BTCV→Synapse map, 5 classes are too few."""
    from shared_nets.data import DataError

    parser = _parser(demo_data, "train.json", map_btcv_to_synapse=False, num_classes=5)
    item = parser.get_parsed_content("train#datalist")[0]
    transform = parser.get_parsed_content("train#preprocessing")
    with pytest.raises(Exception) as info:
        transform(item)
    err = _cause(info.value, DataError)
    assert err is not None and "phantom_000.nii.gz" in str(err) and "[0, 5]" in str(err), info.value
    # with the default mapping the same file passes and holds Synapse ids only
    parser = _parser(demo_data, "train.json")
    out = parser.get_parsed_content("train#preprocessing")(parser.get_parsed_content("train#datalist")[0])
    values = set(torch.cat([o["label"].unique() for o in out]).tolist())
    assert values <= {0, 1, 2, 3, 5, 6, 7} and out[0]["image"].shape == (1, 128, 128, 1)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"img_size": 100}, "img_size must be a positive integer divisible by 16"),
        ({"patch_size": 12}, "patch_size must be a power of two"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_slice_sizes_the_decoder_cannot_produce_are_rejected(demo_data, overrides, match):
    parser = _parser(demo_data, "train.json", **overrides)
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("network_def")
    err = _cause(info.value, ValueError)  # the config parser wraps instantiation errors
    assert err is not None and match in str(err)


def test_missing_sam_checkpoint_names_the_file(demo_data, tmp_path):
    from shared_nets.sam import SamCheckpointError

    missing = tmp_path / "sam_vit_b_01ec64.pth"
    parser = _parser(demo_data, "train.json", sam_checkpoint=str(missing))
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("network_def")
    err = _cause(info.value, SamCheckpointError)
    assert err is not None and str(missing) in str(err) and "does not exist" in str(err)


def test_train_pipeline_keeps_the_few_shot_slices(demo_data, tmp_path):
    """train.json's SelectSlicesd keeps exactly the slices a ``python -m tools few_shot`` datalist lists."""
    from monai.transforms import Compose

    from tools.recipes.few_shot import write_few_shot_datalist

    out = tmp_path / "few_shot_10pct.json"
    write_few_shot_datalist(demo_data / "datalist.json", out, fraction=0.1, seed=3)
    content = json.loads(out.read_text())
    parser = _parser(demo_data, "train.json", data_list_file_path=str(out))
    item = parser.get_parsed_content("train#datalist")[0]
    d = Compose(parser.get_parsed_content("train#deterministic_transforms"))(item)
    assert d["image"].shape[-1] == len(content["training"][0]["slices"]) and "slices" not in d
