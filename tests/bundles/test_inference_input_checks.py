"""Every bundle's inference checks the input image's channels up front and names the file.

A 2-channel (4D) volume given to a one-channel bundle used to fail only inside the network, with a
sliding window's shape (``expected 1 input channel(s) ... got 2 in shape (4, 2, 64, 64, 5)``)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from shared_nets.data import CheckImageShaped, DataError
from tests.bundle_harness import REPO

BUNDLES = ["ma_sam", "med_sa", "sam3d_adapter", "s_sam", "h_sam"]


def _innermost(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


@pytest.mark.parametrize("bundle", BUNDLES)
def test_multichannel_image_is_refused_naming_the_file(bundle, tmp_path):
    path = tmp_path / "two_channels.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 8, 2), np.float32), np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
    root = REPO / "bundles" / bundle
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / c) for c in ("inference.json", "demo.json")])
    parser["bundle_root"] = str(root)
    parser["dataset_dir"] = str(tmp_path)
    prompts_from_user = {"sam3d_adapter": "user", "med_sa": "input"}  # not simulated from a label
    if bundle in prompts_from_user:
        parser["prompt_source"] = prompts_from_user[bundle]
    item = {"image": str(path), "foreground": [[5, 5, 2]], "background": []}
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("preprocessing")(item)
    err = _innermost(info.value)
    assert isinstance(err, DataError), repr(err)
    assert "two_channels.nii.gz" in str(err) and "2 channel(s)" in str(err) and "1 channel(s)" in str(err)


def test_check_image_shape_passes_and_refuses():
    import torch

    ok = {"image": torch.zeros(1, 4, 4, 4)}
    assert CheckImageShaped("image")(ok)["image"] is ok["image"]
    with pytest.raises(DataError, match="3 channel"):
        CheckImageShaped("image", channels=1)({"image": torch.zeros(3, 4, 4, 4)})
    with pytest.raises(DataError, match="non-channel axes"):
        CheckImageShaped("image")({"image": torch.zeros(1, 4, 4, 4, 2)})
