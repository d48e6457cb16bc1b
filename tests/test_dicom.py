"""DICOM in and out (shared_nets.dicom): series writer, series checks, DICOM SEG writer, the CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from shared_nets.data import DataError
from shared_nets.dicom import (
    CheckDicomSeriesd,
    SaveDicomSegd,
    check_dicom_series,
    nifti_to_dicom,
    read_dicom_seg,
    segment_codes,
    write_dicom_seg,
    write_dicom_series,
)
from tests.conftest import REAL_CT

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _oblique_affine() -> np.ndarray:
    """RAS affine with anisotropic spacing, rotated about two axes, slice axis perpendicular to the plane."""
    a, b = np.deg2rad(20.0), np.deg2rad(-10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([0.8, 0.9, 2.5])
    aff[:3, 3] = [-12.5, 30.0, 104.0]
    return aff


def _load_ras(path) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of an image loaded the way the bundles load it, then re-oriented to RAS."""
    from monai.transforms import Compose, EnsureChannelFirstd, Orientationd

    from shared_nets.data import LoadImaged

    img = Compose(
        [LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS")]
    )({"image": str(path)})["image"]
    return np.asarray(img[0]), np.asarray(img.affine)


def _canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(arr), np.asarray(affine, dtype=np.float64)))
    return np.asarray(img.dataobj), img.affine


@pytest.fixture()
def small_series(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """An 8-slice oblique float series (written with its stored axes) with the volume and affine it came from."""
    rng = np.random.default_rng(0)
    vol = rng.normal(40.0, 300.0, size=(20, 16, 8)).astype(np.float32)
    aff = _oblique_affine()
    write_dicom_series(vol, aff, tmp_path / "series", series_description="small")
    return tmp_path / "series", vol, aff


# -- writer ------------------------------------------------------------------------------------------
def test_series_from_the_real_ct_loads_as_the_nifti(tmp_path):
    """The real CT written as an LPS series: one file per slice, one series, right geometry and HU; read back by
    MONAI (ITK) and re-oriented, it is the NIfTI voxel for voxel, on the same world grid."""
    src = REAL_CT / "ct.nii.gz"
    if not src.is_file():
        pytest.skip("real CT example absent: no data/totalsegmentator_example/ct.nii.gz (nor a ../shared copy)")
    out = tmp_path / "ct_dicom"
    paths = nifti_to_dicom(src, out)
    nii = nib.load(str(src))
    assert len(paths) == nii.shape[2] == len(os.listdir(out))
    datasets = check_dicom_series(out)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(paths)
    first, last = datasets[0], datasets[-1]
    np.testing.assert_allclose([float(v) for v in first.ImageOrientationPatient], [1, 0, 0, 0, 1, 0], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in first.PixelSpacing], [3.0, 3.0])
    assert float(first.SliceThickness) == pytest.approx(3.0)
    extent = float(last.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    assert extent == pytest.approx(3.0 * (len(paths) - 1))
    # first voxel of the LPS series = the NIfTI voxel (X-1, Y-1, 0), in LPS coordinates
    corner = RAS_TO_LPS @ nii.affine @ np.array([nii.shape[0] - 1, nii.shape[1] - 1, 0, 1.0])
    np.testing.assert_allclose([float(v) for v in first.ImagePositionPatient], corner[:3], atol=1e-3)
    full = pydicom.dcmread(paths[0])
    hu = full.pixel_array * float(full.RescaleSlope) + float(full.RescaleIntercept)
    np.testing.assert_array_equal(hu, np.asarray(nii.dataobj)[::-1, ::-1, 0].T)
    arr_d, aff_d = _load_ras(out)
    arr_n, aff_n = _load_ras(src)
    np.testing.assert_allclose(aff_d, aff_n, atol=1e-3)
    np.testing.assert_array_equal(arr_d, arr_n)


def test_oblique_float_series_keeps_geometry_and_values(small_series):
    """An oblique, anisotropic float volume: ITK reads back the same affine; values within half a rescale step."""
    folder, vol, aff = small_series
    datasets = check_dicom_series(folder)
    slope = float(datasets[0].RescaleSlope)
    assert slope != 1.0 and float(datasets[0].RescaleIntercept) == pytest.approx(float(vol.min()), abs=1e-3)
    arr, affine = _load_ras(folder)
    ref, ref_aff = _canonical(vol, aff)
    got, got_aff = _canonical(arr, affine)
    np.testing.assert_allclose(got_aff, ref_aff, atol=1e-3)
    assert np.abs(got - ref).max() <= slope / 2 + 1e-3


def test_writer_refuses_a_folder_that_holds_files(small_series):
    folder, vol, aff = small_series
    with pytest.raises(ValueError, match="already exists and is not empty"):
        write_dicom_series(vol, aff, folder)
    assert len(os.listdir(folder)) == vol.shape[2]


def test_writer_refuses_a_sheared_affine(tmp_path):
    aff = np.eye(4)
    aff[0, 2] = 0.5  # slices shifted sideways: not a stack along the normal
    with pytest.raises(ValueError, match="sheared"):
        write_dicom_series(np.zeros((4, 4, 3), np.int16), aff, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_cli_command_writes_a_series(tmp_path, capsys):
    from tools.__main__ import main

    src = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(5, 4, 3), np.diag([2.0, 2.0, 3.0, 1.0])), str(src))
    assert main(["nifti_to_dicom", "--nifti", str(src), "--out_dir", str(tmp_path / "dcm")]) == 0
    assert "wrote 3 slices" in capsys.readouterr().out
    assert len(check_dicom_series(tmp_path / "dcm")) == 3


# -- series checks -----------------------------------------------------------------------------------
def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(str(path))
    for k, v in values.items():
        setattr(ds, k, v)
    ds.save_as(str(path))


def _gap(folder: Path, tmp_path: Path) -> None:
    (folder / "slice_0003.dcm").unlink()


def _orientation(folder: Path, tmp_path: Path) -> None:
    _edit(folder / "slice_0005.dcm", ImageOrientationPatient=[0, 1, 0, 0, 0, -1])


def _spacing(folder: Path, tmp_path: Path) -> None:
    _edit(folder / "slice_0002.dcm", PixelSpacing=[0.5, 0.5])


def _size(folder: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(str(folder / "slice_0004.dcm"))
    ds.Rows = ds.Rows - 1
    ds.PixelData = ds.PixelData[: ds.Rows * ds.Columns * 2]
    ds.save_as(str(folder / "slice_0004.dcm"))


def _mixed(folder: Path, tmp_path: Path) -> None:
    write_dicom_series(np.zeros((20, 16, 2), np.int16), _oblique_affine(), tmp_path / "other")
    shutil.copy(tmp_path / "other" / "slice_0001.dcm", folder / "other_0001.dcm")


def _duplicate(folder: Path, tmp_path: Path) -> None:
    shutil.copy(folder / "slice_0006.dcm", folder / "copy_0006.dcm")
    _edit(folder / "copy_0006.dcm", SOPInstanceUID=pydicom.uid.generate_uid())


def _shifted(folder: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(str(folder / "slice_0007.dcm"))
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    position = np.asarray([float(v) for v in ds.ImagePositionPatient]) + 4.0 * iop[:3]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.save_as(str(folder / "slice_0007.dcm"))


def _empty(folder: Path, tmp_path: Path) -> None:
    for f in folder.iterdir():
        f.unlink()
    (folder / "notes.txt").write_text("not DICOM")


@pytest.mark.parametrize(
    "edit, match",
    [
        (_gap, r"gap of 5 mm .*\(about 1 missing slice\)"),
        (_orientation, r"inconsistent slices: 'slice_0005.dcm' has ImageOrientationPatient"),
        (_spacing, r"inconsistent slices: 'slice_0002.dcm' has PixelSpacing"),
        (_size, r"inconsistent slices: 'slice_0004.dcm' has Rows 15"),
        (_mixed, r"mixes 2 series"),
        (_duplicate, r"two slices at the same position"),
        (_shifted, r"'slice_0007.dcm' is shifted in-plane"),
        (_empty, r"holds no DICOM files"),
    ],
    ids=["gap", "orientation", "spacing", "size", "mixed", "duplicate", "shifted", "empty"],
)
def test_bad_series_get_one_line_naming_the_folder(small_series, tmp_path, edit, match):
    folder = small_series[0]
    edit(folder, tmp_path)
    with pytest.raises(DataError, match=match) as info:
        check_dicom_series(folder)
    message = str(info.value)
    assert f"DICOM series folder '{folder}'" in message and "\n" not in message
    with pytest.raises(DataError, match=match):  # the transform the bundles run before LoadImaged
        CheckDicomSeriesd("image")({"image": str(folder)})


def test_series_check_sorts_by_position_and_ignores_other_files(small_series):
    folder, vol, _ = small_series
    (folder / "slice_0000.dcm").rename(folder / "zz_last_name.dcm")  # file names do not give the order
    (folder / ".hidden").write_text("x")
    (folder / "README").write_text("not DICOM")
    datasets = check_dicom_series(folder)
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, vol.shape[2] + 1))


def test_check_transform_passes_files_and_arrays(tmp_path):
    data = {"image": str(tmp_path / "ct.nii.gz"), "label": np.zeros(3)}
    assert CheckDicomSeriesd(["image", "label"])(data) == data


def test_check_transform_requires_a_series_when_a_seg_is_asked_for(small_series, tmp_path):
    """The bundles pass output_dicom_seg as require_series: a NIfTI input fails before any inference runs."""
    check = CheckDicomSeriesd("image", require_series=True)
    with pytest.raises(DataError, match=r"needs a DICOM series folder as input; image '.*ct.nii.gz' is not one"):
        check({"image": str(tmp_path / "ct.nii.gz")})
    assert check({"image": str(small_series[0])})["image"] == str(small_series[0])


# -- DICOM SEG ---------------------------------------------------------------------------------------
CHANNEL_DEF = {
    "0": "background",
    "1": "spleen",
    "2": "right kidney",
    "3": "left kidney",
    "10": "portal vein and splenic vein",
    "13": "left adrenal gland",
}


def test_segment_codes_are_snomed_with_laterality():
    category, kind, side = segment_codes("Right  Kidney")
    assert (category.scheme_designator, category.value) == ("SCT", "91723000")  # Anatomical Structure
    assert (kind.scheme_designator, kind.value, kind.meaning) == ("SCT", "64033007", "Kidney")
    assert (side.value, side.meaning) == ("24028007", "Right")
    assert segment_codes("spleen")[1].value == "78961009" and segment_codes("spleen")[2] is None
    assert segment_codes("tumour")[0].value == "49755003" and segment_codes("tumour")[1].value == "108369006"
    assert segment_codes("something else")[1].meaning == "Tissue"


def _label_on(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A label map with values of CHANNEL_DEF on the series' grid as the bundles load it (ITK order)."""
    from shared_nets.data import LoadImaged

    img = LoadImaged("image", image_only=True)({"image": str(folder)})["image"]
    arr = np.asarray(img)
    lab = np.zeros(arr.shape, np.uint8)
    lab[arr > 200] = 1
    lab[arr < -200] = 2
    lab[:3, :2, 1:4] = 10
    lab[-2:, -3:, 5] = 13
    return lab, np.asarray(img.affine)


def test_seg_references_the_series_and_reads_back_to_the_same_mask(small_series, tmp_path):
    folder = small_series[0]
    lab, affine = _label_on(folder)
    out = write_dicom_seg(lab, affine, folder, tmp_path / "out" / "pred_seg.dcm", CHANNEL_DEF, algorithm_name="MA-SAM")
    seg = hd.seg.segread(out)
    source = check_dicom_series(folder)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= {ds.SOPInstanceUID for ds in source} and referenced
    segments = list(seg.SegmentSequence)
    assert [s.SegmentLabel for s in segments] == [
        "spleen",
        "right kidney",
        "left kidney",
        "portal vein and splenic vein",
        "left adrenal gland",
    ]
    assert segments[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    kidney = segments[1].SegmentedPropertyTypeCodeSequence[0]
    assert kidney.CodeValue == "64033007" and kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Right"
    assert segments[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "MA-SAM"
    vol = seg.get_volume(combine_segments=True, relabel=False)
    back, back_aff = _canonical(vol.array.astype(np.uint8), RAS_TO_LPS @ vol.affine)
    # segment numbers follow channel_def order: map the label values the same way before comparing
    numbers = np.zeros(14, np.uint8)
    numbers[[1, 2, 3, 10, 13]] = [1, 2, 3, 4, 5]
    ref, ref_aff = _canonical(numbers[lab], affine)
    np.testing.assert_allclose(back_aff, ref_aff, atol=1e-3)
    np.testing.assert_array_equal(back, ref)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_read_dicom_seg_gives_the_label_map_on_the_loaded_grid(small_series, tmp_path):
    folder = small_series[0]
    lab, affine = _label_on(folder)
    lab[:, :, 2] = 0  # an empty slice: its frames are omitted from the SEG
    out = write_dicom_seg(lab, affine, folder, tmp_path / "seg.dcm", CHANNEL_DEF)
    back, back_affine = read_dicom_seg(out, folder, CHANNEL_DEF)
    np.testing.assert_allclose(back_affine, affine, atol=1e-4)
    np.testing.assert_array_equal(back, lab)
    numbers, _ = read_dicom_seg(out, folder)
    assert sorted(np.unique(numbers).tolist()) == [0, 1, 2, 4, 5]
    write_dicom_series(np.zeros((20, 16, 8), np.int16), _oblique_affine(), tmp_path / "other")
    with pytest.raises(DataError, match="does not reference the series in"):
        read_dicom_seg(out, tmp_path / "other")


def test_read_dicom_seg_takes_segments_numbered_by_label_value(small_series, tmp_path):
    """A SEG as MONAI Label's pydicom-seg converter writes it: segment number = label value (not 1..N), and
    no Spatial Locations Preserved in the frames' derivation (highdicom refuses those unless told)."""
    import pydicom

    folder = small_series[0]
    lab, affine = _label_on(folder)
    out = write_dicom_seg(lab, affine, folder, tmp_path / "seg.dcm", CHANNEL_DEF)
    ds = pydicom.dcmread(out)
    number = {int(s.SegmentNumber): value for s, value in zip(ds.SegmentSequence, [1, 2, 3, 10, 13])}
    for item in ds.SegmentSequence:
        item.SegmentNumber = number[int(item.SegmentNumber)]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        ident = frame.SegmentIdentificationSequence[0]
        ident.ReferencedSegmentNumber = number[int(ident.ReferencedSegmentNumber)]
        for derivation in frame.DerivationImageSequence:
            for source in derivation.SourceImageSequence:
                del source.SpatialLocationsPreserved
    ds.save_as(tmp_path / "renumbered.dcm")
    with pytest.raises(RuntimeError, match="spatial locations are preserved"):
        read_dicom_seg(tmp_path / "renumbered.dcm", folder)
    back, _ = read_dicom_seg(tmp_path / "renumbered.dcm", folder, ignore_spatial_locations=True)
    np.testing.assert_array_equal(back, lab)
    named, _ = read_dicom_seg(tmp_path / "renumbered.dcm", folder, CHANNEL_DEF, ignore_spatial_locations=True)
    np.testing.assert_array_equal(named, lab)


def test_seg_rejects_values_missing_from_channel_def(small_series, tmp_path):
    folder = small_series[0]
    lab, affine = _label_on(folder)
    lab[0, 0, 0] = 7
    with pytest.raises(DataError, match=r"label values \[7\] are not in channel_def"):
        write_dicom_seg(lab, affine, folder, tmp_path / "x.dcm", CHANNEL_DEF)
    assert not (tmp_path / "x.dcm").exists()


def test_seg_rejects_a_label_off_the_series_grid(small_series, tmp_path):
    folder = small_series[0]
    lab, affine = _label_on(folder)
    with pytest.raises(DataError, match="does not lie on the grid of the source series"):
        write_dicom_seg(lab[:, :, :4], affine @ np.diag([2.0, 1.0, 1.0, 1.0]), folder, tmp_path / "x.dcm", CHANNEL_DEF)


def test_save_transform_needs_a_dicom_input(tmp_path):
    from monai.data import MetaTensor

    pred = MetaTensor(np.zeros((1, 4, 4, 2)), affine=np.eye(4), meta={"filename_or_obj": str(tmp_path / "ct.nii.gz")})
    match = r"needs a DICOM series folder as input; image '.*ct.nii.gz' is not one"
    with pytest.raises(DataError, match=match) as info:
        SaveDicomSegd("pred", tmp_path, CHANNEL_DEF)({"pred": pred})
    assert "\n" not in str(info.value)


def test_save_transform_writes_beside_the_nifti(small_series, tmp_path):
    from monai.data import MetaTensor

    folder = small_series[0]
    lab, affine = _label_on(folder)
    pred = MetaTensor(lab[None].astype(np.float32), affine=affine, meta={"filename_or_obj": str(folder)})
    SaveDicomSegd("pred", tmp_path / "eval", CHANNEL_DEF)({"pred": pred})
    assert (tmp_path / "eval" / "series_seg.dcm").is_file()
