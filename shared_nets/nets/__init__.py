"""Old import paths of the method networks, kept so that existing configs still resolve.

The methods now live in one package each (``shared_nets.ma_sam``, ``shared_nets.med_sa``,
``shared_nets.sam3d_adapter``, ``shared_nets.s_sam``, ``shared_nets.h_sam``; see
docs/architecture.md). Configs written before that move, e.g. the ``inference.json`` copied into a
MONAI Label app, name targets such as ``shared_nets.nets.ma_sam.MASAM``; an import hook serves each
old module name from the new module, on first use, so nothing is imported until it is asked for.
The network classes now take built parts; their old names, called with the old flat keyword
arguments, are served by the methods' builders (``build_ma_sam``, ...). New code should import the
new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

#: old module (under ``shared_nets.nets``) -> the module that now holds its names.
MOVED_MODULES: dict[str, str] = {
    "med_sa_blocks": "shared_nets.med_sa.blocks",
    "med_sa_interactive": "shared_nets.med_sa.interactive",
    "sam3d_adapter_encoder": "shared_nets.sam3d_adapter.encoder",
    "sam3d_adapter_heads": "shared_nets.sam3d_adapter.heads",
    "sam3d_adapter_bench": "shared_nets.sam3d_adapter.bench",
    "s_sam_text": "shared_nets.s_sam.text",
    "h_sam_decoder": "shared_nets.h_sam.decoder",
    "h_sam_loss": "shared_nets.h_sam.loss",
}

#: the network classes, which now take built parts: an old name called with the old flat keyword arguments
#: (as every config written before does) is served by the method's builder, which takes exactly those.
BUILT_BY: dict[str, str] = {
    "MASAM": "shared_nets.ma_sam.builder:build_ma_sam",
    "MedSA": "shared_nets.med_sa.builder:build_med_sa",
    "SAM3DAdapter": "shared_nets.sam3d_adapter.builder:build_sam3d_adapter",
    "SSAM": "shared_nets.s_sam.builder:build_s_sam",
    "HSAM": "shared_nets.h_sam.builder:build_h_sam",
}

#: old modules whose names were split over several new modules: old -> {name: new module, or "module:attr"}.
SPLIT_MODULES: dict[str, dict[str, str]] = {
    "ma_sam": {
        **dict.fromkeys(["ADAPTER_POSITIONS", "DECODERS", "FINETUNE_MODES", "MultiScaleFusion"], "shared_nets.ma_sam"),
        "MASAM": BUILT_BY["MASAM"],
    },
    "med_sa": {
        **dict.fromkeys(["MEDSA_OFFICIAL_CODE_SETTINGS", "PROMPT_SCOPES"], "shared_nets.med_sa"),
        "MedSA": BUILT_BY["MedSA"],
    },
    "sam3d_adapter": {
        **dict.fromkeys(
            ["NO_POSITIVE_MODES", "PROMPT_ENCODER_MODES", "SAM3D_TRAINABLE_PATTERNS"], "shared_nets.sam3d_adapter"
        ),
        "SAM3DAdapter": BUILT_BY["SAM3DAdapter"],
    },
    "s_sam": {
        **dict.fromkeys(["S_SAM_MODES", "TAL_TYPES", "TextAffineLayer"], "shared_nets.s_sam"),
        "SSAM": BUILT_BY["SSAM"],
    },
    "h_sam": {
        **dict.fromkeys(["ENSEMBLE_MODES", "FINETUNE_MODES"], "shared_nets.h_sam"),
        "HSAM": BUILT_BY["HSAM"],
    },
    "common": {
        "attention_residual": "shared_nets.ma_sam.blocks",
        "mlp_residual": "shared_nets.ma_sam.blocks",
        "ProgressiveUpsampling": "shared_nets.ma_sam.blocks",
        "block_width": "shared_nets.sam.encoder_blocks",
        "run_encoder": "shared_nets.sam.encoder_blocks",
        "block_norms": "shared_nets.s_sam.network",
        "to_rgb": "shared_nets.sam.slices",
        "volume_to_slices": "shared_nets.sam.slices",
        "slices_to_volume": "shared_nets.sam.slices",
        "check_input": "shared_nets.sam.slices",
        "upsample_to": "shared_nets.sam.slices",
        "decode_masks": "shared_nets.sam.decoding",
        "EmbeddingCache": "shared_nets.sam.cache",
    },
    "med_sa_prompts": {
        "PROMPT_SETTINGS": "shared_nets.med_sa.transforms",
        "ObjectLabeld": "shared_nets.med_sa.transforms",
        "SimulatePromptSettingd": "shared_nets.med_sa.transforms",
        "CheckPromptsd": "shared_nets.prompts.check",
        "_spatial_shape": "shared_nets.prompts.check",
        "object_datalist": "shared_nets.med_sa.data",
    },
    "h_sam_data": {
        "BTCV_TO_SYNAPSE": "shared_nets.labels",
        "SelectSlicesd": "shared_nets.h_sam.transforms",
        # dataset preparation moved to the command line tools (a checkout's tools/, not the installed package)
        "axial_depth": "tools.recipes.few_shot",
        "write_few_shot_datalist": "tools.recipes.few_shot",
        "label_frequencies": "tools.recipes.few_shot",
        "few_shot": "tools.recipes.few_shot",
        "noise_var": "tools.recipes.few_shot",
    },
    "sam3d_adapter_data": {
        "TUMOUR_DATASETS": "shared_nets.sam3d_adapter.data",
        "RECIPES": "shared_nets.sam3d_adapter.data",
        "check_target_class": "shared_nets.sam3d_adapter.data",
        "check_isotropic": "shared_nets.sam3d_adapter.data",
        "RequirePositiveClicksd": "shared_nets.sam3d_adapter.transforms",
        "_NIFTI": "tools.recipes.tumour",
        "_is_nifti": "tools.recipes.tumour",
        "_stem": "tools.recipes.tumour",
        "_case_number": "tools.recipes.tumour",
        "find_cases": "tools.recipes.tumour",
        "random_split": "tools.recipes.tumour",
        "write_datalist": "tools.recipes.tumour",
    },
}

#: the names this package itself exported before the move.
_PACKAGE_NAMES = {
    **BUILT_BY,
    "MEDSA_OFFICIAL_CODE_SETTINGS": "shared_nets.med_sa",
    "TextAffineLayer": "shared_nets.s_sam",
}


def _resolve(home: str, name: str):
    """``name`` from ``home`` (a module path, or ``module:attr`` when the name now has another one)."""
    module, _, attr = home.partition(":")
    return getattr(importlib.import_module(module), attr or name)


def _collect(old: str) -> types.ModuleType:
    """A module object serving the names of a split old module, each imported from its new home on first use.

    Lazily, so a name whose home is missing (``tools`` outside a checkout) fails alone, with the new home named.
    """
    homes = SPLIT_MODULES[old]
    module = types.ModuleType(f"{__name__}.{old}", f"Names of the former ``{__name__}.{old}``, now split.")

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
        value = _resolve(homes[name], name)
        setattr(module, name, value)
        return value

    module.__getattr__ = __getattr__
    module.__dir__ = lambda: sorted(homes)
    module.__all__ = [name for name in homes if not name.startswith("_")]
    return module


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``shared_nets.nets.<old>`` with the module that replaced it."""

    prefix = f"{__name__}."

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 (importlib protocol)
        old = fullname[len(self.prefix) :] if fullname.startswith(self.prefix) else None
        if old in MOVED_MODULES or old in SPLIT_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):  # noqa: D102
        old = spec.name[len(self.prefix) :]
        if old in SPLIT_MODULES:
            return _collect(old)
        module = importlib.import_module(MOVED_MODULES[old])
        self._own_spec = module.__spec__  # importlib overwrites __spec__; exec_module puts it back
        return module

    def exec_module(self, module):  # noqa: D102
        own = getattr(self, "_own_spec", None)
        if own is not None and own.name == module.__name__:
            module.__spec__ = own
        self._own_spec = None


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


def __getattr__(name: str):
    if name in _PACKAGE_NAMES:
        return _resolve(_PACKAGE_NAMES[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
