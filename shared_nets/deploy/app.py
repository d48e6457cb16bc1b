"""MONAI Deploy App SDK application: a DICOM series folder in, a DICOM SEG out, with a bundle of this project.

The operators are the SDK's own (monai-deploy-app-sdk 4.0.0, ``monai.deploy.operators``): DICOM loader →
series selector → series to volume → bundle inference → DICOM SEG writer, as in the SDK's bundle
example apps. The bundle inference operator reads the bundle folder itself (its inference config and
``models/model.pt``); :class:`BundleInferenceOperator` only adds what the SDK leaves out for a folder
bundle: ``bundle_root`` is set to the folder (S-SAM reads ``@bundle_root/resources/text_embeddings.json``).
The bundle's ``LoadImaged``/``SaveImaged`` steps are dropped by the SDK (it passes images in memory).

The SDK (``monai.deploy``, which brings NVIDIA Holoscan) is imported on first use of :class:`BundleSegApp`,
:class:`BundleInferenceOperator` or :func:`run_app`, so this module imports without it. The SDK must be
installed into the same ``site-packages`` as ``monai`` (``monai.deploy`` is a sub-package of ``monai``):
``pip install "sam-adapter-bundles[deploy]"``.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared_nets.deploy.bundle import DEFAULT_CONFIGS, bundle_parser, segment_names
from shared_nets.dicom import segment_codes

# BundleSegApp and BundleInferenceOperator come from the module __getattr__ below (they subclass SDK types)
__all__ = ["BundleInferenceOperator", "BundleSegApp", "run_app"]  # noqa: F822


@functools.cache
def _sdk() -> dict[str, Any]:
    """Import the SDK and define the classes that subclass its types (once)."""
    try:
        from monai.deploy.conditions import CountCondition
        from monai.deploy.core import AppContext, Application
        from monai.deploy.core.domain import Image
        from monai.deploy.core.io_type import IOType
        from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
        from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
        from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
        from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
        from monai.deploy.operators.monai_bundle_inference_operator import (
            BundleConfigNames,
            IOMapping,
            MonaiBundleInferenceOperator,
        )
    except ImportError as e:
        raise ImportError(
            "the MONAI Deploy app needs the MONAI Deploy App SDK in the environment that holds monai: "
            f'pip install "sam-adapter-bundles[deploy]" (monai-deploy-app-sdk); import failed with: {e}'
        ) from e

    class BundleInferenceOperator(MonaiBundleInferenceOperator):
        """The SDK's bundle inference operator, with ``bundle_root`` set to the bundle folder before the network
        is built from the bundle config (the SDK keeps the config's ``"."``)."""

        def _init_config(self, config_names) -> None:
            super()._init_config(config_names)
            # The network is built from this parser afterwards (when the first image arrives), so it sees the
            # folder; of the components parsed above only the dropped or disabled savers' output_dir used ".".
            self._parser["bundle_root"] = str(self.bundle_path)
            self._parser.parse()

    class BundleSegApp(Application):
        """DICOM series folder → bundle inference → a DICOM SEG file, for one or several bundles.

        The series is loaded once; each bundle gets its own inference and SEG writer operators (Holoscan runs
        one application per process: a second ``Application`` in the same process crashes, so several bundles
        are branches of this one app, not several apps).

        Args:
            bundles: bundle folder, or several (each with ``configs/`` and ``models/model.pt`` or ``model.ts``).
            input_folder: folder holding the DICOM series; the SDK's operators segment the first series its
                selector picks.
            output_folder: folder of the SEG file (named by its SOP Instance UID); with several bundles, one
                subfolder per bundle folder name.
            config_names: bundle configs merged in order; ``deploy`` last (the plain network whose state dict
                ``models/model.pt`` holds, and label values that number the segments).
            series_rules: the SDK's series selection rules (JSON text; empty: every series).
        """

        def __init__(
            self,
            bundles: str | os.PathLike | Sequence[str | os.PathLike],
            input_folder: str | os.PathLike,
            output_folder: str | os.PathLike,
            config_names: Sequence[str] = DEFAULT_CONFIGS,
            series_rules: str = "",
        ) -> None:
            roots = [bundles] if isinstance(bundles, (str, os.PathLike)) else list(bundles)
            if not roots:
                raise ValueError("bundles must name at least one bundle folder, got none.")
            self.bundles = [Path(b).expanduser().resolve() for b in roots]
            names = [b.name for b in self.bundles]
            if len(set(names)) != len(names):
                raise ValueError(f"bundles must have distinct folder names (their output subfolders), got {names}.")
            self.input_folder = Path(input_folder).expanduser().resolve()
            out = Path(output_folder).expanduser().resolve()
            self.outputs = [out] if len(self.bundles) == 1 else [out / n for n in names]
            self.config_names = [n[:-5] if n.endswith(".json") else n for n in config_names]
            self.series_rules = series_rules
            if not self.input_folder.is_dir():
                raise FileNotFoundError(f"input_folder '{self.input_folder}' is not a folder of DICOM files.")
            self.descriptions = []
            for root in self.bundles:
                if not any((root / "models" / m).is_file() for m in ("model.pt", "model.ts")):
                    raise FileNotFoundError(
                        f"bundle '{root}' has no models/model.pt (nor models/model.ts): train it or write one with "
                        "`python -m tools init_model`."
                    )
                self.descriptions.append(_descriptions(bundle_parser(root, self.config_names), root))
            # Holoscan parses its own flags from argv (default sys.argv): give it none of the caller's
            super().__init__([sys.executable, __name__])

        def compose(self) -> None:
            """Connect the operators (Holoscan calls this when the app runs)."""
            loader = DICOMDataLoaderOperator(
                self, CountCondition(self, 1), input_folder=self.input_folder, name="dicom_loader"
            )
            selector = DICOMSeriesSelectorOperator(self, rules=self.series_rules, name="series_selector")
            volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, volume, {("study_selected_series_list", "study_selected_series_list")})
            for root, out, descriptions in zip(self.bundles, self.outputs, self.descriptions):
                inference = BundleInferenceOperator(
                    self,
                    app_context=AppContext({}),
                    bundle_path=root,
                    bundle_config_names=BundleConfigNames(config_names=self.config_names),
                    input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
                    output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
                    name=f"{root.name}_inference",
                )
                writer = DICOMSegmentationWriterOperator(
                    self, segment_descriptions=descriptions, output_folder=out, name=f"{root.name}_seg_writer"
                )
                self.add_flow(volume, inference, {("image", "image")})
                self.add_flow(inference, writer, {("pred", "seg_image")})
                self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})

    def _descriptions(parser, root: Path) -> list[SegmentDescription]:
        """One SDK segment description per label value 1..K of the bundle, coded like ``shared_nets.dicom``'s SEGs."""
        algorithm = str(parser.get("_meta_#name", root.name))[:64]
        version = str(parser.get("_meta_#version", "0"))
        out = []
        for name in segment_names(parser):
            category, kind, _ = segment_codes(name)
            out.append(
                SegmentDescription(
                    segment_label=name[:64],
                    segmented_property_category=category,
                    segmented_property_type=kind,
                    algorithm_name=algorithm,
                    algorithm_version=version,
                )
            )
        return out

    return {"BundleInferenceOperator": BundleInferenceOperator, "BundleSegApp": BundleSegApp}


def __getattr__(name: str) -> Any:
    """``BundleSegApp`` and ``BundleInferenceOperator`` are created on first access (they subclass SDK types)."""
    if name in ("BundleSegApp", "BundleInferenceOperator"):
        return _sdk()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_app(
    bundles: str | os.PathLike | Sequence[str | os.PathLike],
    input_folder: str | os.PathLike,
    output_folder: str | os.PathLike,
    config_names: Sequence[str] = DEFAULT_CONFIGS,
) -> dict[str, list[Path]]:
    """Run :class:`BundleSegApp` in this process (once per process: Holoscan allows one application).

    Returns:
        ``{bundle folder: [SEG files it wrote]}``; raises RuntimeError naming a bundle that wrote none.
    """
    app = _sdk()["BundleSegApp"](bundles, input_folder, output_folder, config_names)
    before = {out: set(out.glob("*.dcm")) if out.is_dir() else set() for out in app.outputs}
    app.run()
    written = {}
    for root, out in zip(app.bundles, app.outputs):
        files = sorted(set(out.glob("*.dcm")) - before[out])
        if not files:
            raise RuntimeError(f"the Deploy app wrote no DICOM SEG in '{out}' for bundle '{root}' (see its log).")
        written[str(root)] = files
    return written
