"""3DSAM-adapter bundle through the shared harness (tiny SAM, phantoms with a tumour label, CPU)."""

from tests.bundle_harness import BundleHarness


class TestSAM3DAdapterBundle(BundleHarness):
    bundle = "sam3d_adapter"
    label_key = "tumour"
