"""Test harness every bundle plugs into with one line::

    from tests.bundle_harness import BundleHarness

    class TestMASAM(BundleHarness):
        bundle = "ma_sam"

It runs the bundle the way users do (``configs/*.json`` + ``configs/demo.json`` with command-line
style overrides) on a copy of the bundle in a temporary folder, on phantom data:

* ``metadata.json`` validates against MONAI's schema (``../shared`` copy, else MONAI's download);
* ``ConfigWorkflow.check_properties()`` for train, inference and evaluate;
* train for a few iterations (loss must fall), then inference (NIfTI outputs with the input's
  shape and affine), then evaluate (a metrics file with finite values);
* ``multi_gpu_train.json`` under ``torchrun --nproc_per_node 2`` on CPU (gloo).

Subclasses set class attributes to adapt it (see :class:`BundleHarness`).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SCHEMA = SHARED / "data" / "monai_schema" / "meta_schema_20240725.json"
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


def write_initial_model(bundle_root: Path, configs: tuple[str, ...] = ("inference.json", "demo.json")) -> Path:
    """Save the freshly built (untrained, seed 0) ``network_def`` of ``configs`` as ``<bundle_root>/models/model.pt``.

    Thin wrapper of :func:`tools.init_model.write_initial_model`, which also reads the bundle's
    ``metadata.json`` (S-SAM takes its class names from it) and writes atomically."""
    from tools.init_model import write_initial_model as write

    return write(bundle_root, list(configs))


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a bundle child process: one OpenMP/MKL thread each, this checkout first on the path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def torchrun_bundle_command(
    root: Path, configs: list[str], overrides: dict[str, Any] | None = None, nproc: int = 2
) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m monai.bundle run ...`` for the bundle copy at ``root``.

    Args:
        root: bundle folder (its ``configs/``, ``metadata.json`` and ``logging.conf`` are used).
        configs: config file names under ``configs/``, merged in order.
        overrides: ``--key value`` pairs; strings pass as they are, anything else as JSON.
        nproc: processes (ranks); ``--standalone`` picks a free rendezvous port, so parallel runs do not collide.
    """
    files = "[" + ",".join(f"'{root / 'configs' / c}'" for c in configs) + "]"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "monai.bundle", "run",
        "--config_file", files,
        "--meta_file", str(root / "configs" / "metadata.json"),
        "--logging_file", str(root / "configs" / "logging.conf"),
        "--bundle_root", str(root),
    ]  # fmt: skip
    for k, v in (overrides or {}).items():
        args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return args


def run_workflow(
    bundle_root: Path, configs: list[str], workflow_type: str, overrides: dict[str, Any], collect_losses: bool = False
) -> list[float]:
    """Run a bundle workflow in-process (``shared_nets.engine.run_bundle_workflow``); returns train losses."""
    from shared_nets.engine import run_bundle_workflow

    losses: list[float] = []

    def collect(engine) -> None:
        out = engine.state.output
        losses.append(float((out[0] if isinstance(out, list) else out)["loss"]))

    run_bundle_workflow(
        bundle_root, configs, workflow_type, overrides, on_iteration=collect if collect_losses else None
    )
    return losses


def relabelled_datalist(data_dir: Path, out: Path, label_key: str) -> Path:
    """A copy of ``data_dir``'s datalist in ``out`` whose ``label`` entries are ``label_key``'s files (e.g. the
    phantoms' ``tumour`` masks for 3DSAM-adapter); the volumes are symlinked, not copied. Returns ``out``."""
    content = json.loads((data_dir / "datalist.json").read_text())
    for split in ("training", "validation", "test"):
        for item in content.get(split, []):
            item["label"] = item[label_key]
    for entry in data_dir.iterdir():
        if entry.name != "datalist.json":
            (out / entry.name).symlink_to(entry)
    (out / "datalist.json").write_text(json.dumps(content))
    return out


class BundleHarness:
    """Base class of the per-bundle test classes.

    Class attributes:
        bundle: folder name under ``bundles/``.
        overrides: extra config overrides for all quick runs (e.g. smaller crops).
        train_overrides: overrides for the short training run (epochs, intervals...).
        max_epochs: epochs of the short training run.
        label_key: the datalist key whose files hold the bundle's label (``label`` or ``tumour``).
        infer_configs / evaluate_configs: config files (before ``demo.json``) of those workflows.
        check_loss_falls: assert the mean loss of the last iterations is below that of the first.
    """

    bundle: ClassVar[str] = ""
    overrides: ClassVar[dict[str, Any]] = {}
    train_overrides: ClassVar[dict[str, Any]] = {}
    max_epochs: ClassVar[int] = 4
    label_key: ClassVar[str] = "label"
    train_configs: ClassVar[list[str]] = ["train.json"]
    infer_configs: ClassVar[list[str]] = ["inference.json"]
    evaluate_configs: ClassVar[list[str]] = ["train.json", "evaluate.json"]
    multi_gpu_configs: ClassVar[list[str]] = ["train.json", "multi_gpu_train.json"]
    check_loss_falls: ClassVar[bool] = True
    # real CT check: label mapping from BTCV ids (after TotalSegmentator → BTCV) to the bundle's
    # classes (None: BTCV ids as they are), extra overrides, or skip it with a reason
    real_ct_label_map: ClassVar[dict[int, int] | None] = None
    real_ct_overrides: ClassVar[dict[str, Any]] = {}
    real_ct_skip: ClassVar[str | None] = None

    # -- fixtures ------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    def bundle_copy(self, tmp_path_factory) -> Path:
        src = REPO / "bundles" / self.bundle
        assert src.is_dir(), f"no bundle folder {src}"
        dst = tmp_path_factory.mktemp(f"bundle_{self.bundle}") / self.bundle
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("models", "eval", "runs", "__pycache__"))
        return dst

    @pytest.fixture(scope="class")
    def data_dir(self, demo_data, tmp_path_factory) -> Path:  # demo_data: tests/conftest.py
        """The demo datalist, with ``label`` pointing at ``label_key``'s files when they differ."""
        if self.label_key == "label":
            return demo_data
        return relabelled_datalist(demo_data, tmp_path_factory.mktemp(f"data_{self.bundle}"), self.label_key)

    def _overrides(self, data_dir: Path, **extra: Any) -> dict[str, Any]:
        return {"dataset_dir": str(data_dir), **self.overrides, **extra}

    def _configs(self, names: list[str]) -> list[str]:
        return [*names, "demo.json"]

    @pytest.fixture(scope="class")
    def trained(self, bundle_copy, data_dir) -> dict[str, Any]:
        """Train once per class (short run); later tests use the written model.pt."""
        losses = run_workflow(
            bundle_copy,
            self._configs(self.train_configs),
            "train",
            self._overrides(data_dir, max_epochs=self.max_epochs, val_interval=1, **self.train_overrides),
            collect_losses=True,
        )
        return {"losses": losses}

    # -- tests ---------------------------------------------------------------------------------
    def test_metadata_validates_against_monai_schema(self, bundle_copy, tmp_path):
        from monai.bundle import verify_metadata

        if SCHEMA.is_file():
            schema = tmp_path / SCHEMA.name
            shutil.copy(SCHEMA, schema)
        else:  # no ../shared beside the checkout: MONAI downloads it (skip when offline)
            schema = tmp_path / "schema.json"
            try:
                from monai.apps import download_url

                download_url(SCHEMA_URL, str(schema))
            except Exception as e:  # noqa: BLE001 - any download failure means "no schema here"
                pytest.skip(f"MONAI metadata schema unavailable: ../shared is absent and the download failed ({e})")
        verify_metadata(meta_file=str(bundle_copy / "configs" / "metadata.json"), filepath=str(schema))
        meta = json.loads((bundle_copy / "configs" / "metadata.json").read_text())
        assert "sam-adapter-bundles" in meta["required_packages_version"]
        assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["0"] == "background"
        # the model zoo reads eval_metrics as what this bundle's weights measured: no paper numbers there
        # (they are in docs/README.md); no weights trained on real data ship, so it is empty
        assert not [k for k in meta.get("eval_metrics", {}) if "paper" in k], meta["eval_metrics"]

    def test_bundle_file_set_is_complete(self, bundle_copy):
        for rel in (
            "configs/metadata.json",
            "configs/common.json",
            "configs/train.json",
            "configs/inference.json",
            "configs/evaluate.json",
            "configs/multi_gpu_train.json",
            "configs/multi_gpu_inference.json",
            "configs/logging.conf",
            "configs/demo.json",
            "large_files.yml",
            "docs/README.md",
            "docs/data_license.txt",
            "LICENSE",
        ):
            assert (bundle_copy / rel).is_file(), f"bundle {self.bundle} lacks {rel}"

    @pytest.mark.parametrize("kind", ["train", "infer", "evaluate"])
    def test_check_properties(self, bundle_copy, data_dir, kind):
        from monai.bundle import ConfigWorkflow

        configs = {"train": self.train_configs, "infer": self.infer_configs, "evaluate": self.evaluate_configs}[kind]
        wf = ConfigWorkflow(
            config_file=[str(bundle_copy / "configs" / c) for c in self._configs(configs)],
            meta_file=str(bundle_copy / "configs" / "metadata.json"),
            logging_file=str(bundle_copy / "configs" / "logging.conf"),
            workflow_type="infer" if kind == "evaluate" else kind,
            **self._overrides(data_dir, bundle_root=str(bundle_copy)),
        )
        if kind == "evaluate":  # evaluate = train.json + evaluate.json: check the validation side
            wf.parser.read_config([str(bundle_copy / "configs" / c) for c in self._configs(configs)])
            for key in (
                "validate#evaluator",
                "validate#dataset",
                "validate#inferer",
                "validate#postprocessing",
                "network_def",
            ):
                assert key in wf.parser, f"evaluate config lacks {key}"
            return
        wf.initialize()
        missing = wf.check_properties()
        assert missing is None or isinstance(missing, list)

    def test_train_loss_falls_and_writes_model(self, trained, bundle_copy):
        losses = trained["losses"]
        assert len(losses) >= 4 and all(np.isfinite(losses))
        if self.check_loss_falls:
            k = max(1, len(losses) // 4)
            assert np.mean(losses[-k:]) < np.mean(losses[:k]), f"loss did not fall: {losses}"
        assert (bundle_copy / "models" / "model.pt").is_file()
        assert glob.glob(str(bundle_copy / "models" / "checkpoint*.pt"))

    def test_inference_writes_nifti_in_input_space(self, trained, bundle_copy, data_dir):
        out_dir = bundle_copy / "eval" / "infer"
        run_workflow(
            bundle_copy, self._configs(self.infer_configs), "infer", self._overrides(data_dir, output_dir=str(out_dir))
        )
        test_items = json.loads((data_dir / "datalist.json").read_text())["test"]
        outputs = sorted(glob.glob(str(out_dir / "**" / "*.nii.gz"), recursive=True))
        assert len(outputs) == len(test_items), outputs
        meta = json.loads((bundle_copy / "configs" / "metadata.json").read_text())
        n_out = int(meta["network_data_format"]["outputs"]["pred"]["num_channels"])
        for item in test_items:
            stem = Path(item["image"]).name.replace(".nii.gz", "")
            match = [o for o in outputs if Path(o).name.startswith(stem)]
            assert match, f"no prediction for {stem} in {outputs}"
            src, pred = nib.load(str(data_dir / item["image"])), nib.load(match[0])
            assert pred.shape[:3] == src.shape[:3]
            np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
            values = np.unique(np.asarray(pred.dataobj))
            assert values.min() >= 0 and values.max() < max(n_out, 2)

    def test_one_slice_input_keeps_its_shape_and_affine(self, trained, bundle_copy, data_dir, tmp_path):
        """A 1-slice volume (``H x W x 1``) is predicted as ``H x W x 1`` with the input's affine (the writer
        used to drop the trailing singleton axis and write ``H x W``)."""
        item = json.loads((data_dir / "datalist.json").read_text())["test"][0]
        label = np.asarray(nib.load(str(data_dir / item["label"])).dataobj)
        z = int(np.argmax((label > 0).reshape(-1, label.shape[2]).sum(0)))  # the slice with most foreground
        one = tmp_path / "one_slice"
        one.mkdir()
        entry = {}
        for key, rel in item.items():
            if not (isinstance(rel, str) and rel.endswith(".nii.gz")):
                entry[key] = rel
                continue
            src = nib.load(str(data_dir / rel))
            affine = src.affine.copy()
            affine[:3, 3] = src.affine[:3, :3] @ np.array([0, 0, z]) + src.affine[:3, 3]
            nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[:, :, z : z + 1], affine), str(one / f"{key}.nii.gz"))
            entry[key] = f"{key}.nii.gz"
        (one / "datalist.json").write_text(json.dumps({"training": [entry], "validation": [entry], "test": [entry]}))
        out_dir = tmp_path / "pred"
        run_workflow(
            bundle_copy, self._configs(self.infer_configs), "infer", self._overrides(one, output_dir=str(out_dir))
        )
        outputs = sorted(out_dir.rglob("*.nii.gz"))
        assert len(outputs) == 1, outputs
        src, pred = nib.load(str(one / "image.nii.gz")), nib.load(str(outputs[0]))
        assert src.shape[2] == 1 and pred.shape == src.shape, (pred.shape, src.shape)
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)

    def test_evaluate_writes_metrics(self, trained, bundle_copy, data_dir):
        out_dir = bundle_copy / "eval" / "evaluate"
        run_workflow(
            bundle_copy,
            self._configs(self.evaluate_configs),
            "infer",
            self._overrides(data_dir, output_dir=str(out_dir)),
        )
        files = sorted(glob.glob(str(out_dir / "*.csv")))
        assert files, f"evaluate wrote no CSV in {out_dir}"
        summary = [f for f in files if "summary" in Path(f).name]
        rows = list(csv.reader(open(summary[0] if summary else files[0])))
        assert len(rows) >= 2
        # shared_nets.metrics: distances in mm, NSD, per-case CSVs and a per-class markdown summary
        raw = {Path(f).name for f in glob.glob(str(out_dir / "**" / "*_raw.csv"), recursive=True)}
        assert {"val_mean_dice_raw.csv", "val_hd95_mm_raw.csv"} <= raw, raw
        assert any(n.startswith("val_nsd_") and n.endswith("mm_raw.csv") for n in raw), raw
        md = sorted(glob.glob(str(out_dir / "**" / "metrics.md"), recursive=True))
        assert md, f"evaluate wrote no metrics.md under {out_dir}"
        text = Path(md[0]).read_text()
        assert "val_hd95_mm" in text and "**mean of classes**" in text and "millimetres" in text
        per_class = list(csv.DictReader(open(Path(md[0]).parent / "metrics_per_class.csv")))
        dice = [r for r in per_class if r["metric"] == "val_mean_dice" and r["class"] != "mean_of_classes"]
        assert dice and all(0.0 <= float(r["mean"]) <= 1.0 for r in dice if r["mean"] != "nan")

    @pytest.mark.slow
    def test_multi_gpu_config_runs_under_torchrun_on_cpu(self, bundle_copy, data_dir, tmp_path):
        root = tmp_path / "mgpu"
        shutil.copytree(bundle_copy, root, ignore=shutil.ignore_patterns("models", "eval"))
        # two ranks need at least two validation volumes: validate on validation + test here
        content = json.loads((data_dir / "datalist.json").read_text())
        content["validation"] = content["validation"] + content["test"]
        mg_data = tmp_path / "data"
        mg_data.mkdir()
        for entry in data_dir.iterdir():
            if entry.name != "datalist.json":
                (mg_data / entry.name).symlink_to(entry.resolve())
        (mg_data / "datalist.json").write_text(json.dumps(content))
        data_dir = mg_data
        overrides = {"dataset_dir": str(data_dir), "max_epochs": 1, "val_interval": 1}
        overrides.update({**self.overrides, **self.train_overrides})
        args = torchrun_bundle_command(root, self._configs(self.multi_gpu_configs), overrides)
        env = child_env()
        proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (root / "models" / "model.pt").is_file()

    def test_real_ct_trains_and_infers_in_input_space(self, real_ct, tmp_path):
        """Real abdominal CT (data/totalsegmentator_example): the bundle's own preprocessing, a few iterations,
        inference; predictions keep each input's exact shape, affine and orientation. No accuracy bar."""
        if self.real_ct_skip:
            pytest.skip(self.real_ct_skip)
        data = real_ct
        if self.real_ct_label_map is not None or self.label_key != "label":
            data = tmp_path / "real_ct"
            data.mkdir()
            content = json.loads((real_ct / "datalist.json").read_text())
            for name in {i[self.label_key] for split in ("training", "validation", "test") for i in content[split]}:
                lab = nib.load(str(real_ct / name))
                arr = np.asarray(lab.dataobj)
                if self.real_ct_label_map is not None:
                    mapped = np.zeros_like(arr)
                    for src, dst in self.real_ct_label_map.items():
                        mapped[arr == src] = dst
                    arr = mapped
                nib.save(nib.Nifti1Image(arr, lab.affine), str(data / name))
            for split in ("training", "validation", "test"):
                for item in content[split]:
                    item["label"] = item[self.label_key]
            for name in ("ct.nii.gz", "ct_lps.nii.gz"):
                (data / name).symlink_to(real_ct / name)
            (data / "datalist.json").write_text(json.dumps(content))
        root = tmp_path / self.bundle
        shutil.copytree(REPO / "bundles" / self.bundle, root, ignore=shutil.ignore_patterns("models", "eval"))
        over = self._overrides(data, max_epochs=1, val_interval=1, **self.train_overrides, **self.real_ct_overrides)
        losses = run_workflow(root, self._configs(self.train_configs), "train", over, collect_losses=True)
        assert losses and all(np.isfinite(losses))
        out_dir = tmp_path / "pred"
        run_workflow(
            root,
            self._configs(self.infer_configs),
            "infer",
            {k: v for k, v in {**over, "output_dir": str(out_dir)}.items() if k not in ("max_epochs", "val_interval")},
        )
        for name in ("ct", "ct_lps"):
            preds = sorted(out_dir.glob(f"**/{name}_*.nii.gz")) or sorted(out_dir.glob(f"**/{name}*.nii.gz"))
            preds = [p for p in preds if not p.name.startswith("ct_lps") or name == "ct_lps"]
            assert preds, f"no prediction for {name} in {sorted(out_dir.rglob('*'))}"
            src, pred = nib.load(str(data / f"{name}.nii.gz")), nib.load(str(preds[0]))
            assert pred.shape[:3] == src.shape, (pred.shape, src.shape)
            np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
            assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(src.affine)
