"""3DSAM-adapter bundle through the shared harness (tiny SAM, phantoms with a tumour label, CPU)."""

import pytest
import torch

from tests.bundle_harness import BundleHarness


class TestSAM3DAdapterBundle(BundleHarness):
    bundle = "sam3d_adapter"
    label_key = "tumour"

    @pytest.fixture(scope="class", autouse=True)
    def _one_thread(self):
        """Tiny 3D tensors: one intra-op thread is several times faster than two on a shared 2-core machine."""
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)
