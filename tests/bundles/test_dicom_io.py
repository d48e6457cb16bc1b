"""Every bundle's inference.json on a DICOM series written from the real CT example (data/totalsegmentator_example).

A series folder in the datalist gives the same prediction as the NIfTI it was written from (same voxels once
both are re-oriented to RAS); with ``output_dicom_seg`` the DICOM SEG written beside the NIfTI reads back
(highdicom) to the same mask. The prompted bundles (Med-SA, 3DSAM-adapter) take their click in the voxel
coordinates of the image as loaded, so the DICOM run gets the click mapped through the two affines. Tiny
randomly initialised models (``demo.json`` + ``tools.init_model``): the predictions are not anatomy, but they
vary over the volume, so a flipped or shifted axis would show.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from shared_nets.data import root_cause
from shared_nets.dicom import nifti_to_dicom
from tests.bundle_harness import run_workflow
from tests.conftest import REAL_CT

REPO = Path(__file__).resolve().parents[2]
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
TOTALSEG_LIVER = 5

# per bundle: overrides of inference.json + demo.json, and whether it takes a click
BUNDLES: dict[str, tuple[dict[str, Any], bool]] = {
    "ma_sam": ({"sw_batch_size": 8}, False),
    "s_sam": ({"img_size": 64, "sw_batch_size": 32}, False),
    "h_sam": ({"output_btcv_ids": True}, False),  # SEG segment names follow the BTCV ids written
    "med_sa": ({"prompt_source": "input", "prompt_margin": 2}, True),
    "sam3d_adapter": ({"prompt_source": "user"}, True),
}


@pytest.fixture(scope="module")
def ct_pair(tmp_path_factory) -> dict[str, Any]:
    """The real CT as NIfTI and as an LPS DICOM series folder, with a liver click in each one's voxels."""
    if not (REAL_CT / "ct.nii.gz").is_file():
        pytest.skip(f"real CT example not found at {REAL_CT} (data/totalsegmentator_example is not in this checkout)")
    from shared_nets.data import LoadImaged

    out = tmp_path_factory.mktemp("ct_pair")
    (out / "ct.nii.gz").symlink_to(REAL_CT / "ct.nii.gz")
    nifti_to_dicom(REAL_CT / "ct.nii.gz", out / "ct_dicom")
    nii = nib.load(str(REAL_CT / "ct.nii.gz"))
    liver = np.asarray(nib.load(str(REAL_CT / "seg.nii.gz")).dataobj) == TOTALSEG_LIVER
    from scipy import ndimage

    click = np.unravel_index(ndimage.distance_transform_edt(liver).argmax(), liver.shape)
    loaded = LoadImaged("image", image_only=True)({"image": str(out / "ct_dicom")})["image"]
    to_dicom = np.linalg.inv(np.asarray(loaded.affine)) @ nii.affine
    dicom_click = np.rint(to_dicom @ np.r_[click, 1.0])[:3].astype(int)
    return {"dir": out, "click": [int(v) for v in click], "dicom_click": [int(v) for v in dicom_click]}


def _bundle(name: str, tmp_path: Path, overrides: dict[str, Any]) -> Path:
    from tools.init_model import write_initial_model

    root = tmp_path / name
    shutil.copytree(REPO / "bundles" / name, root, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    write_initial_model(root, ["inference.json", "demo.json"], overrides=overrides)
    return root


def _infer(root: Path, data: Path, entries: list[dict], out_dir: Path, overrides: dict[str, Any], **extra) -> None:
    datalist = out_dir.parent / f"{out_dir.name}_datalist.json"
    datalist.write_text(json.dumps({"test": [{**e, "image": str(data / e["image"])} for e in entries]}))
    run_workflow(
        root,
        ["inference.json", "demo.json"],
        "infer",
        {
            "dataset_dir": str(data),
            "data_list_file_path": str(datalist),
            "output_dir": str(out_dir),
            **overrides,
            **extra,
        },
    )


def _canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(arr), np.asarray(affine, dtype=np.float64)))
    return np.asarray(img.dataobj), img.affine


def _prompts(click: list[int]) -> dict[str, Any]:
    return {"foreground": [click]}


@pytest.mark.parametrize("name", list(BUNDLES))
def test_dicom_series_predicts_as_its_nifti_and_the_seg_reads_back(name, ct_pair, tmp_path):
    overrides, prompted = BUNDLES[name]
    root = _bundle(name, tmp_path, overrides)
    data = ct_pair["dir"]
    nifti_entry = {"image": "ct.nii.gz", **(_prompts(ct_pair["click"]) if prompted else {})}
    dicom_entry = {"image": "ct_dicom", **(_prompts(ct_pair["dicom_click"]) if prompted else {})}
    _infer(root, data, [nifti_entry], tmp_path / "from_nifti", overrides)
    _infer(root, data, [dicom_entry], tmp_path / "from_dicom", overrides, output_dicom_seg=True)
    (pred_n,) = sorted((tmp_path / "from_nifti").glob("*.nii.gz"))
    (pred_d,) = sorted((tmp_path / "from_dicom").glob("*.nii.gz"))
    (seg_file,) = sorted((tmp_path / "from_dicom").glob("*.dcm"))
    assert seg_file.name == "ct_dicom_seg.dcm"
    n, d = nib.load(str(pred_n)), nib.load(str(pred_d))
    arr_n, aff_n = _canonical(np.asarray(n.dataobj), n.affine)
    arr_d, aff_d = _canonical(np.asarray(d.dataobj), d.affine)
    np.testing.assert_allclose(aff_d, aff_n, atol=1e-3)
    assert len(np.unique(arr_n)) >= 2, f"{name}: constant prediction, the comparison would prove nothing"
    np.testing.assert_array_equal(arr_d, arr_n)
    assert nib.aff2axcodes(d.affine) == ("L", "P", "S")  # written in the series' own voxel order

    seg = hd.seg.segread(seg_file)
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    if name == "h_sam":  # Synapse channels written as BTCV ids: the SEG's classes are keyed by the written ids
        from shared_nets.labels import BTCV_TO_SYNAPSE

        channel_def = {str(b): channel_def[str(s)] for b, s in enumerate(BTCV_TO_SYNAPSE) if s}
    values = sorted(int(k) for k in channel_def if k != "0")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [channel_def[str(v)] for v in values]
    # read back per source slice (empty frames are omitted from the SEG, so its own volume may be shorter):
    # the series is LPS with ascending slices, so slice k's frame is the prediction's [:, :, k] transposed
    source = sorted(
        (pydicom.dcmread(str(p), stop_before_pixels=True) for p in (ct_pair["dir"] / "ct_dicom").iterdir()),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    frames = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source], combine_segments=True, relabel=False
    )
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    numbers = np.zeros(max(values) + 1, np.uint8)
    numbers[values] = np.arange(1, len(values) + 1)
    expected = numbers[np.asarray(d.dataobj).astype(np.int64)].transpose(2, 1, 0)
    assert frames.shape == expected.shape and expected.any()
    np.testing.assert_array_equal(frames, expected)


def test_nifti_input_with_dicom_seg_on_is_refused_naming_the_image(ct_pair, tmp_path):
    """output_dicom_seg with a NIfTI entry: skipped before inference with one line naming the image (a SEG must
    reference a DICOM series), the series in the same list still gets its SEG; a NIfTI-only list fails."""
    overrides = BUNDLES["ma_sam"][0]
    root = _bundle("ma_sam", tmp_path, overrides)
    out = tmp_path / "out"
    _infer(root, ct_pair["dir"], [{"image": "ct.nii.gz"}, {"image": "ct_dicom"}], out, overrides, output_dicom_seg=True)
    skipped = json.loads((out / "skipped.json").read_text())["skipped"]
    image = ct_pair["dir"] / "ct.nii.gz"
    expected = f"output_dicom_seg needs a DICOM series folder as input; image '{image}' is not one"
    assert [s["image"] for s in skipped] == [str(image)] and expected in skipped[0]["reason"]
    written = sorted(p.name for p in out.iterdir() if p.name != "skipped.json")
    assert written == ["ct_dicom_seg.dcm", "ct_dicom_seg.nii.gz"]
    with pytest.raises(Exception) as info:
        _infer(root, ct_pair["dir"], [{"image": "ct.nii.gz"}], tmp_path / "out2", overrides, output_dicom_seg=True)
    message = root_cause(info.value)
    assert expected in message and "\n" not in message
    assert not list((tmp_path / "out2").glob("*.nii.gz"))


def test_a_series_with_a_missing_slice_is_skipped_with_the_folder_named(ct_pair, tmp_path):
    """Batch inference: the broken series is reported in skipped.json (one line naming the folder) and the good
    one is still written; with only the broken one the run fails with that line."""
    overrides = BUNDLES["ma_sam"][0]
    root = _bundle("ma_sam", tmp_path, overrides)
    data = tmp_path / "data"
    shutil.copytree(ct_pair["dir"] / "ct_dicom", data / "gap_dicom")
    (data / "gap_dicom" / "slice_0010.dcm").unlink()
    (data / "ct_dicom").symlink_to(ct_pair["dir"] / "ct_dicom")
    out = tmp_path / "out"
    _infer(root, data, [{"image": "gap_dicom"}, {"image": "ct_dicom"}], out, overrides)
    skipped = json.loads((out / "skipped.json").read_text())["skipped"]
    assert len(skipped) == 1 and skipped[0]["image"].endswith("gap_dicom")
    reason = skipped[0]["reason"]
    assert f"DICOM series folder '{data / 'gap_dicom'}' has a gap of 6 mm" in reason and "\n" not in reason
    assert [p.name for p in out.glob("*.nii.gz")] == ["ct_dicom_seg.nii.gz"]
    with pytest.raises(Exception) as info:
        _infer(root, data, [{"image": "gap_dicom"}], tmp_path / "out2", overrides)
    message = root_cause(info.value)
    assert f"DICOM series folder '{data / 'gap_dicom'}' has a gap of 6 mm" in message and "\n" not in message
