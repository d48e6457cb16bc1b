"""shared_nets.io: atomic writes leave the old file or the new one, never a partial one or a temp file."""

from __future__ import annotations

import json

import pytest

from shared_nets.io import atomic_write_json, atomic_write_text


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json({"x": 1}, path)
    atomic_write_json({"x": 2}, path)
    assert json.loads(path.read_text()) == {"x": 2} and path.read_text().endswith("\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "dice.md"
    atomic_write_text(path, "old\n")
    with pytest.raises(TypeError):
        atomic_write_json({"x": object()}, path)  # not JSON-serialisable: fails before anything is written
    with pytest.raises(TypeError):
        atomic_write_text(path, 123)  # fails inside the temporary file
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dice.md"]


@pytest.mark.parametrize("shape", [(7, 5, 1), (7, 5, 3), (1, 5, 4)])
def test_nifti_writer_keeps_singleton_spatial_axes(tmp_path, shape):
    """A one-channel prediction of a 1-slice volume (``(1, H, W, 1)``) is written as ``(H, W, 1)`` with the
    input's affine: ``squeeze_end_dims`` drops the channel only (MONAI's writer also drops the spatial
    singleton, giving ``(H, W)``)."""
    import nibabel as nib
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SaveImaged

    affine = torch.tensor([[0.8, 0, 0, -10.0], [0, 0.7, 0, 5.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]], dtype=torch.float64)
    pred = MetaTensor(
        torch.randint(0, 3, (1, *shape)).to(torch.uint8),
        affine=affine,
        meta={"filename_or_obj": "case.nii.gz", "spatial_shape": shape},
    )
    saver = SaveImaged(
        keys="pred",
        output_dir=str(tmp_path),
        output_postfix="seg",
        output_dtype=np.uint8,
        writer="shared_nets.io.AtomicNibabelWriter",
        resample=False,
        separate_folder=False,
        squeeze_end_dims=True,
    )
    saver({"pred": pred})
    out = nib.load(str(tmp_path / "case_seg.nii.gz"))
    assert out.shape == shape
    np.testing.assert_allclose(out.affine, affine.numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.dataobj), pred[0].numpy())


def test_nifti_writer_keeps_channels_of_multichannel_output(tmp_path):
    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SaveImaged

    pred = MetaTensor(
        torch.rand(3, 6, 5, 1), affine=torch.eye(4, dtype=torch.float64), meta={"filename_or_obj": "case.nii.gz"}
    )
    SaveImaged(
        keys="pred",
        output_dir=str(tmp_path),
        writer="shared_nets.io.AtomicNibabelWriter",
        resample=False,
        separate_folder=False,
        squeeze_end_dims=True,
    )({"pred": pred})
    out = nib.load(str(tmp_path / "case_trans.nii.gz"))
    assert out.shape == (6, 5, 1, 3)
