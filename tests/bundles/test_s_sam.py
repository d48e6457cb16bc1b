"""S-SAM bundle through the shared harness (tiny SAM, phantoms, CPU), plus its label-name specifics."""

from __future__ import annotations

import glob
import json

import nibabel as nib
import numpy as np
import pytest

from tests.bundle_harness import BundleHarness, run_workflow


def _error_chain(exc: BaseException) -> str:
    """Messages of an exception and its causes (MONAI's config parser wraps the original error)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


class TestSSAMBundle(BundleHarness):
    bundle = "s_sam"
    overrides = {"img_size": 64, "num_samples": 4, "val_sw_batch_size": 24, "sw_batch_size": 24}

    def _network_error(self, bundle_copy, data_dir, **overrides) -> str:
        from monai.bundle import ConfigWorkflow

        wf = ConfigWorkflow(
            config_file=[str(bundle_copy / "configs" / c) for c in self._configs(self.infer_configs)],
            meta_file=str(bundle_copy / "configs" / "metadata.json"),
            workflow_type="infer",
            **self._overrides(data_dir, bundle_root=str(bundle_copy), **overrides),
        )
        with pytest.raises(Exception) as info:
            wf.parser.get_parsed_content("network_def")
        return _error_chain(info.value)

    def test_subset_of_classes_by_name_keeps_channel_def_ids(self, trained, bundle_copy, data_dir):
        out_dir = bundle_copy / "eval" / "subset"
        run_workflow(
            bundle_copy,
            self._configs(self.infer_configs),
            "infer",
            self._overrides(data_dir, output_dir=str(out_dir), class_names=["Liver", "spleen"]),
        )
        outputs = glob.glob(str(out_dir / "*.nii.gz"))
        assert outputs
        for fn in outputs:
            assert set(np.unique(np.asarray(nib.load(fn).dataobj)).tolist()) <= {0, 1, 6}

    def test_class_name_outside_channel_def_is_a_clear_error(self, bundle_copy, data_dir):
        msg = self._network_error(bundle_copy, data_dir, class_names=["liver", "gallblader"])
        assert "['gallblader'] are not in channel_def" in msg

    def test_class_without_stored_embedding_is_a_clear_error(self, bundle_copy, data_dir, tmp_path):
        from shared_nets.s_sam.text import add_text_embeddings

        partial = tmp_path / "partial.json"
        add_text_embeddings(str(partial), ["liver"], encoder="hash")
        msg = self._network_error(bundle_copy, data_dir, class_names=["liver", "spleen"], text_embeddings=str(partial))
        assert f"['spleen'] have no embedding in '{partial}'" in msg

    def test_embedding_file_of_the_wrong_width_is_a_clear_error(self, bundle_copy, data_dir, tmp_path):
        from shared_nets.s_sam.text import add_text_embeddings

        narrow = tmp_path / "narrow.json"
        add_text_embeddings(str(narrow), ["liver"], encoder="hash", dim=128)
        msg = self._network_error(bundle_copy, data_dir, class_names=["liver"], text_embeddings=str(narrow))
        assert "holds 128-d vectors, the network expects text_dim=512" in msg

    def test_shipped_embeddings_cover_channel_def(self, bundle_copy):
        from shared_nets.s_sam.text import foreground_names, load_class_embeddings

        meta = json.loads((bundle_copy / "configs" / "metadata.json").read_text())
        names = foreground_names(meta["network_data_format"]["outputs"]["pred"]["channel_def"])
        assert load_class_embeddings(bundle_copy / "resources" / "text_embeddings.json", names).shape == (
            len(names),
            512,
        )
