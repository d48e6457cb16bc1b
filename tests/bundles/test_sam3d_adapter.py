"""3DSAM-adapter bundle through the shared harness (tiny SAM, phantoms with a tumour label, CPU)."""

import pytest
import torch

from tests.bundle_harness import BundleHarness


class TestSAM3DAdapterBundle(BundleHarness):
    bundle = "sam3d_adapter"
    label_key = "tumour"
    real_ct_label_map = {2: 1}  # no tumour in the real CT example: prompt for the right kidney instead


def _parser(names, data_dir):
    from monai.bundle import ConfigParser

    from tests.bundle_harness import REPO

    root = REPO / "bundles" / "sam3d_adapter"
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / n) for n in names])
    parser["bundle_root"] = str(root)
    parser["dataset_dir"] = str(data_dir)
    return parser


def test_automatic_config_drops_the_prompt_path(demo_data):
    """configs/automatic.json: the poster's prompt-free model, sliding windows over the whole volume."""
    from monai.inferers import SlidingWindowInferer

    train = _parser(["train.json", "automatic.json", "demo.json"], demo_data)
    net = train.get_parsed_content("network_def")
    assert net.prompt_mode == "none" and len(net.prompt_encoders) == 0
    assert isinstance(train.get_parsed_content("validate#inferer"), SlidingWindowInferer)
    names = [type(t).__name__ for t in train.get_parsed_content("train#preprocessing").transforms]
    assert "SimulateClicksd" not in names and "AddGuidanceChannelsd" not in names
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    infer = _parser(["inference.json", "automatic.json", "demo.json"], demo_data)
    names = [type(t).__name__ for t in infer.get_parsed_content("preprocessing").transforms]
    assert "RequirePositiveClicksd" not in names and "AddGuidanceChannelsd" not in names
    assert isinstance(infer.get_parsed_content("inferer"), SlidingWindowInferer)


def test_inference_without_positive_click_fails_clearly(demo_data):
    infer = _parser(["inference.json", "demo.json"], demo_data)
    infer["prompt_source"] = "user"
    item = {"image": str(demo_data / "imagesTr" / "phantom_000.nii.gz"), "background": [[5, 5, 5]]}
    with pytest.raises(Exception) as info:  # MONAI's Compose re-raises as RuntimeError from our ValueError
        infer.get_parsed_content("preprocessing")(item)
    err = info.value
    while not isinstance(err, ValueError) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, ValueError) and "no positive click" in str(err)


def test_click_outside_the_image_names_the_input_shape(demo_data):
    """A click outside the input is reported against the image as given, not the resampled grid, and not as
    'no prompt' (the resampling used to drop it with a warning about a (134, 134, 105)-style grid)."""
    import nibabel as nib

    infer = _parser(["inference.json", "demo.json"], demo_data)
    infer["prompt_source"] = "user"
    image = demo_data / "imagesTr" / "phantom_000.nii.gz"
    shape = tuple(int(s) for s in nib.load(str(image)).shape[:3])
    item = {"image": str(image), "foreground": [[shape[0] + 3, 1, 1]]}
    with pytest.raises(Exception) as info:
        infer.get_parsed_content("preprocessing")(item)
    err = info.value
    while not isinstance(err, ValueError) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, ValueError)
    assert f"outside the image of spatial shape {shape}" in str(err) and "no prompt" not in str(err)
