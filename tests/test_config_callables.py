"""The named callables the bundle configs reference return what the inline expressions they replaced returned.

Each test evaluates the old ``$`` expression (as it stood in the bundle JSON) with MONAI's ConfigParser and
compares it with the callable on the same inputs.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

import shared_nets.med_sa.transforms  # noqa: F401 - the old Med-SA expressions name it
from shared_nets import data, metrics, schedules
from shared_nets.h_sam import config as h_sam_config
from shared_nets.labels import BTCV_LABELS, BTCV_TO_SYNAPSE
from shared_nets.ma_sam import config as ma_sam_config
from shared_nets.med_sa import config as med_sa_config
from shared_nets.sam3d_adapter import config as sam3d_config

BTCV_CHANNEL_DEF = {str(k): v for k, v in BTCV_LABELS.items()}


def old(expression: str, **refs):
    """The value of a config expression with ``refs`` as the config keys it reads."""
    modules = {"os": "os", "torch": "torch", "shared_nets": "shared_nets"}
    parser = ConfigParser({**refs, "value": expression}, globals=modules)
    return parser.get_parsed_content("value")


@pytest.fixture
def datalist(tmp_path):
    """Two 8x8x6 volumes with labels 0..13 (one without 13 and 1), keys image/label/tumour; its JSON path."""
    rng = np.random.default_rng(0)
    entries = []
    for i, ids in enumerate([(0, 1, 6, 13), (0, 2, 12)]):
        img = rng.normal(size=(8, 8, 6)).astype(np.float32)
        lab = rng.choice(ids, size=(8, 8, 6)).astype(np.uint8)
        for name, arr in (("img", img), ("lab", lab), ("tum", (lab > 5).astype(np.uint8))):
            nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / f"{name}{i}.nii.gz"))
        entries.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz", "tumour": f"tum{i}.nii.gz"})
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": entries, "validation": entries[:1], "test": entries}))
    return str(path)


@pytest.mark.parametrize("merge", [False, True])
def test_checked_datalist_matches_the_ma_sam_expression(datalist, merge):
    expr = (
        "$shared_nets.data.check_volumes(shared_nets.data.load_datalist(@data_list_file_path, 'training', "
        "keys=['image', 'label']), min_depth=@num_slices, "
        "num_classes=None if @merge_adrenals else @num_classes + 1)"
    )
    num_classes = 12 if merge else 13
    want = old(expr, data_list_file_path=datalist, num_slices=5, merge_adrenals=merge, num_classes=num_classes)
    got = data.checked_datalist(datalist, "training", min_depth=5, num_classes=None if merge else num_classes + 1)
    assert got == want and len(got) == 2


def test_checked_datalist_maps_the_label_key_as_3dsam_adapter_did(datalist):
    expr = (
        "$shared_nets.data.check_volumes([dict(item, label=item[@label_key]) for item in "
        "shared_nets.data.load_datalist(@data_list_file_path, 'validation', keys=['image', @label_key])])"
    )
    want = old(expr, data_list_file_path=datalist, label_key="tumour")
    got = data.checked_datalist(datalist, "validation", label_key="tumour")
    assert got == want and got[0]["label"].endswith("tum0.nii.gz")


def test_checked_datalist_still_checks_the_volumes(datalist):
    with pytest.raises(data.DataError, match="expected at least 7"):
        data.checked_datalist(datalist, "training", min_depth=7)
    with pytest.raises(data.DataError, match="channel"):
        data.checked_datalist(datalist, "training", channels=3)


@pytest.mark.parametrize("env", [None, "/elsewhere/data"])
def test_demo_data_dir_matches_the_demo_expression(monkeypatch, tmp_path, env):
    if env is None:
        monkeypatch.delenv("SAM_BUNDLES_DEMO_DATA", raising=False)
    else:
        monkeypatch.setenv("SAM_BUNDLES_DEMO_DATA", env)
    root = str(tmp_path / "repo" / "bundles" / "ma_sam")
    expr = (
        "$os.environ.get('SAM_BUNDLES_DEMO_DATA', os.path.abspath(os.path.join(@bundle_root, '..', '..', "
        "'demo_output', 'data')))"
    )
    assert data.demo_data_dir(root) == old(expr, bundle_root=root)
    assert data.demo_data_dir(root) == (env or str(tmp_path / "repo" / "demo_output" / "data"))


def _batch():
    return [
        {
            "image": MetaTensor(torch.zeros(1, 2, 2), meta={"filename_or_obj": f"case{i}.nii.gz"}),
            "object_id": torch.tensor(i + 3),
        }
        for i in range(2)
    ]


def test_image_meta_matches_the_metrics_saver_lambda():
    batch = _batch()
    want = old("$lambda x: [xx['image'].meta for xx in x]")(batch)
    assert metrics.image_meta(batch) == want
    assert [m["filename_or_obj"] for m in metrics.image_meta(batch)] == ["case0.nii.gz", "case1.nii.gz"]


def test_med_sa_object_meta_matches_its_lambda():
    batch = _batch()
    want = old("$lambda batch: [dict(x['image'].meta, object_id=int(x['object_id'])) for x in batch]")(batch)
    got = med_sa_config.object_meta(batch)
    assert got == want and [m["object_id"] for m in got] == [3, 4]


@pytest.mark.parametrize("schedule, warmup", [("poly", 0), ("poly", 5), ("exponential", 5), ("cosine", 0)])
def test_warmup_start_factor_matches_the_ma_sam_expression(schedule, warmup):
    expr = "$1.0 / max(1, @warmup_iters) if @lr_schedule == 'poly' else 0.01"
    assert schedules.warmup_start_factor(schedule, warmup) == old(expr, warmup_iters=warmup, lr_schedule=schedule)


@pytest.mark.parametrize("merge", [False, True])
def test_ma_sam_metric_class_names_match_the_evaluate_expression(merge):
    expr = (
        "$shared_nets.metrics.foreground_names(@channel_def, 11) + ['adrenal glands'] if @merge_adrenals else "
        "shared_nets.metrics.foreground_names(@channel_def, @num_classes)"
    )
    num_classes = 12 if merge else 13
    want = old(expr, channel_def=BTCV_CHANNEL_DEF, merge_adrenals=merge, num_classes=num_classes)
    assert ma_sam_config.metric_class_names(BTCV_CHANNEL_DEF, num_classes, merge) == want
    assert len(want) == num_classes


OLD_MED_SA_TABLE = {
    "1": "spleen",
    "2": "right kidney",
    "3": "left kidney",
    "4": "gallbladder",
    "5": "esophagus",
    "6": "liver",
    "7": "stomach",
    "8": "aorta",
    "9": "inferior vena cava",
    "10": "portal vein and splenic vein",
    "11": "pancreas",
    "12": "right adrenal gland",
    "13": "left adrenal gland",
}


@pytest.mark.parametrize("merge", [False, True])
def test_med_sa_class_names_match_the_evaluate_table(merge):
    expr = (
        "${k: v for k, v in @btcv_class_names.items() if k != '13'} | {'12': 'adrenal glands'} "
        "if @merge_adrenals else @btcv_class_names"
    )
    want = old(expr, btcv_class_names=OLD_MED_SA_TABLE, merge_adrenals=merge)
    got = med_sa_config.class_names(merge)
    assert list(got.items()) == list(want.items())


@pytest.mark.parametrize("merge", [False, True])
def test_med_sa_object_datalist_matches_the_validate_expression(datalist, merge):
    expr = (
        "$shared_nets.med_sa.data.object_datalist(shared_nets.data.check_volumes("
        "shared_nets.data.load_datalist(@data_list_file_path, 'test', keys=['image', 'label']), "
        "min_depth=@num_slices, channels=@in_channels), @class_ids, "
        "label_map={13: 12} if @merge_adrenals else None)"
    )
    class_ids = list(range(1, 13 if merge else 14))
    want = old(
        expr, data_list_file_path=datalist, num_slices=4, in_channels=1, class_ids=class_ids, merge_adrenals=merge
    )
    got = med_sa_config.object_datalist_from_file(datalist, "test", class_ids, 4, 1, merge)
    assert got == want
    assert [d["object_id"] for d in got] == ([1, 6, 12, 2, 12] if merge else [1, 6, 13, 2, 12])


@pytest.mark.parametrize("keys", [["image"], ["image", "label"]])
def test_med_sa_inference_datalist_matches_its_expression(datalist, keys):
    expr = (
        "$[dict(d, object_id=oid) for oid, items in [(@infer_object_id, shared_nets.data.load_datalist("
        "@data_list_file_path, 'test', check_files=False, keys=@image_keys))] for d in items]"
    )
    want = old(expr, data_list_file_path=datalist, infer_object_id=6, image_keys=keys)
    got = med_sa_config.inference_datalist(datalist, 6, keys)
    assert got == want and all(d["object_id"] == 6 for d in got)


@pytest.mark.parametrize("use_label_prompts", [False, True])
def test_sam3d_inference_datalist_matches_its_expression(datalist, use_label_prompts):
    expr = (
        "$[dict(item, label=item[@label_key]) if @use_label_prompts else item for item in "
        "shared_nets.data.load_datalist(@data_list_file_path, 'test', check_files=False, "
        "keys=['image', @label_key] if @use_label_prompts else ['image'])]"
    )
    want = old(expr, data_list_file_path=datalist, label_key="tumour", use_label_prompts=use_label_prompts)
    got = sam3d_config.inference_datalist(datalist, "tumour", use_label_prompts)
    assert got == want
    assert got[0]["label"].endswith("tum0.nii.gz" if use_label_prompts else "lab0.nii.gz")


def test_h_sam_add_depth_axis_and_final_stage_match_their_lambdas():
    x = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(h_sam_config.add_depth_axis(x), old("$lambda x: x.unsqueeze(-1)")(x))
    assert h_sam_config.add_depth_axis(x).shape == (1, 3, 4, 1)
    final = old("$lambda x: x[-1] if isinstance(x, (list, tuple)) else x")
    stages = [torch.zeros(1), torch.ones(1)]
    assert h_sam_config.final_stage(stages) is final(stages) is stages[-1]
    assert h_sam_config.final_stage(tuple(stages)) is stages[-1]
    assert h_sam_config.final_stage(x) is final(x) is x


@pytest.mark.parametrize("output_btcv_ids", [False, True])
def test_h_sam_output_channel_def_matches_the_inference_expression(output_btcv_ids):
    synapse = {
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
    expr = (
        "${str(b): @channel_def[str(s)] for b, s in enumerate(@label_map) if s} if @output_btcv_ids else @channel_def"
    )
    want = old(expr, channel_def=synapse, label_map=BTCV_TO_SYNAPSE, output_btcv_ids=output_btcv_ids)
    got = h_sam_config.output_channel_def(synapse, BTCV_TO_SYNAPSE, output_btcv_ids)
    assert got == want
    if output_btcv_ids:
        assert got == {
            "1": "spleen",
            "2": "right kidney",
            "3": "left kidney",
            "4": "gallbladder",
            "6": "liver",
            "7": "stomach",
            "8": "aorta",
            "11": "pancreas",
        }
