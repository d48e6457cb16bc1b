"""Parameter-efficient fine-tuning pieces for SAM's image encoder (method-agnostic).

Weight-delta layers follow Hugging Face ``peft``'s contract (:class:`PeftLayer`): LoRA
(SAMed, H-SAM), FacT-TT (MA-SAM), singular-value tuning (S-SAM). Adapters (Med-SA,
MA-SAM) are plain modules. Injection functions work on a built (checkpoint-loaded) SAM
encoder; :func:`freeze_except` and :func:`trainable_parameter_report` handle freezing and
counting; :func:`export_merged_state_dict` folds everything back into stock SAM weights.
:func:`apply_peft` applies one ``peft`` setting (:data:`PEFT_METHODS`) to an encoder.
"""

from __future__ import annotations

from .adapters import Adapter3D, BottleneckAdapter
from .base import PeftLayer
from .fact import FacTFactors, FacTQKV, inject_fact
from .freeze import ParameterReport, ParameterRow, freeze_except, log_trainable_parameters, trainable_parameter_report
from .lora import LoRALinear, LoRAQKV, inject_lora
from .merge import export_merged_state_dict, find_unmergeable, merge_peft, unmerge_peft
from .setting import (
    PEFT_METHODS,
    SVD_TARGETS_TINY_VIT,
    SVD_TARGETS_VIT,
    AttentionAdapter,
    MlpAdapter,
    apply_peft,
    check_peft,
    inject_adapters,
    log_peft_build,
    peft_globs,
    resolve_peft,
    svd_targets,
)
from .svd import SVDConv2d, SVDLinear, inject_svd

__all__ = [
    "PEFT_METHODS",
    "SVD_TARGETS_TINY_VIT",
    "SVD_TARGETS_VIT",
    "Adapter3D",
    "AttentionAdapter",
    "MlpAdapter",
    "apply_peft",
    "check_peft",
    "inject_adapters",
    "log_peft_build",
    "peft_globs",
    "resolve_peft",
    "svd_targets",
    "BottleneckAdapter",
    "FacTFactors",
    "FacTQKV",
    "LoRALinear",
    "LoRAQKV",
    "ParameterReport",
    "ParameterRow",
    "PeftLayer",
    "SVDConv2d",
    "SVDLinear",
    "export_merged_state_dict",
    "find_unmergeable",
    "freeze_except",
    "inject_fact",
    "inject_lora",
    "inject_svd",
    "log_trainable_parameters",
    "merge_peft",
    "trainable_parameter_report",
    "unmerge_peft",
]
