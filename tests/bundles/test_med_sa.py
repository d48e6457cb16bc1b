"""Med-SA bundle on phantoms through the shared harness."""

import pytest

from tests.bundle_harness import BundleHarness


class TestMedSA(BundleHarness):
    bundle = "med_sa"

    # -- Med-SA specific: MONAI Label style prompts in the input -------------------------------------
    def _prompted_inference(self, bundle_copy, data_dir, tmp_path, prompts: dict, **extra):
        import json

        from tests.bundle_harness import run_workflow

        item = json.loads((data_dir / "datalist.json").read_text())["test"][0]
        entry = {"image": str(data_dir / item["image"]), **prompts}
        datalist = tmp_path / "prompted.json"
        datalist.write_text(json.dumps({"test": [entry]}))
        out_dir = tmp_path / "out"
        run_workflow(
            bundle_copy,
            ["inference.json", "demo.json"],
            "infer",
            self._overrides(
                data_dir, data_list_file_path=str(datalist), output_dir=str(out_dir), prompt_source="input", **extra
            ),
        )
        return sorted(out_dir.glob("*.nii.gz"))

    def _liver_click(self, data_dir):
        import json

        import nibabel as nib
        import numpy as np
        from scipy import ndimage

        item = json.loads((data_dir / "datalist.json").read_text())["test"][0]
        liver = np.asarray(nib.load(str(data_dir / item["label"])).dataobj) == 6
        return [int(v) for v in np.unravel_index(ndimage.distance_transform_edt(liver).argmax(), liver.shape)]

    def test_inference_takes_clicks_and_boxes_from_the_input(self, trained, bundle_copy, data_dir, tmp_path):
        import nibabel as nib
        import numpy as np

        i, j, k = self._liver_click(data_dir)
        outputs = self._prompted_inference(
            bundle_copy,
            data_dir,
            tmp_path,
            {
                "foreground": [[i, j, k]],
                "background": [[0, 0, k]],
                "roi": [max(i - 8, 0), max(j - 8, 0), k, i + 8, j + 8, k + 1],
            },
        )
        assert len(outputs) == 1
        pred = np.asarray(nib.load(str(outputs[0])).dataobj)
        assert set(np.unique(pred).tolist()) <= {0, 1}
        assert not pred[..., : max(k - 9, 0)].any()  # prompted-region inference: far slices stay background

    @pytest.mark.parametrize(
        "prompts, extra, match",
        [
            ({}, {}, "no prompt: pass clicks as 'foreground'"),
            ({"foreground": [[200, 1, 1]]}, {}, "outside the image"),
            ({"roi": [10, 10, 3, 10, 20, 6]}, {}, "zero extent or inverted"),
            ({"roi": [20, 10, 3, 10, 20, 6]}, {}, "zero extent or inverted"),
            ({"foreground": [[1, c, 2] for c in range(9)]}, {}, "max_points=8"),
            ({"foreground": [[30, 30, 2]]}, {"num_slices": 2, "network_def#max_depth": 1}, "max_depth=1"),
        ],
    )
    def test_bad_prompts_give_one_clear_error(self, trained, bundle_copy, data_dir, tmp_path, prompts, extra, match):
        with pytest.raises(Exception) as info:
            self._prompted_inference(bundle_copy, data_dir, tmp_path, prompts, **extra)
        chain, e = [], info.value
        while e is not None:
            chain.append(str(e))
            e = e.__cause__ or e.__context__
        assert any(match in m for m in chain), chain

    def test_automatic_mode_runs_without_prompts(self, trained, bundle_copy, data_dir, tmp_path):
        assert len(self._prompted_inference(bundle_copy, data_dir, tmp_path, {}, automatic=True)) == 1

    def test_evaluate_reports_every_prompt_setting_per_class_and_the_refinement_curve(
        self, trained, bundle_copy, data_dir
    ):
        import csv

        out_dir = bundle_copy / "eval" / "evaluate"
        if not (out_dir / "prompt_settings_summary.csv").is_file():
            self.test_evaluate_writes_metrics(trained, bundle_copy, data_dir)
        rows = list(csv.reader(open(out_dir / "prompt_settings_summary.csv")))
        assert rows[0] == ["metric", "1-point", "3-points", "bbox0.5", "bbox0.75"]
        names = {r[0] for r in rows[1:]}
        assert {
            "val_mean_dice",
            "val_iou",
            "val_hd95_mm",
            "val_mean_dice_liver",
            "refine_dice_0",
            "refine_dice_2",
        } <= names
        for setting in rows[0][1:]:
            curve = list(csv.reader(open(out_dir / setting / "refinement_curve.csv")))
            assert curve[0][-1] == "dice_after_2_clicks" and curve[-1][0] == "mean"
