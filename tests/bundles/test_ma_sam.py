"""MA-SAM bundle through the shared harness (tiny SAM, phantoms, CPU)."""

from tests.bundle_harness import BundleHarness


class TestMASAMBundle(BundleHarness):
    bundle = "ma_sam"
    overrides = {"img_size": 64, "val_sw_batch_size": 8, "sw_batch_size": 8}
