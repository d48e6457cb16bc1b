"""SAM backbone: named variants, builders at any input size, official-checkpoint loading."""

from .attention import REL_POS_MODES, SdpaAttention, decomposed_rel_pos_bias, enable_sdpa, is_sdpa_enabled
from .grad_checkpoint import enable_gradient_checkpointing, is_gradient_checkpointed
from .builder import build_image_encoder, build_sam, check_img_size, expand_mask_tokens
from .weights import (
    SamCheckpointError,
    fit_state_dict_to_model,
    infer_variant,
    load_sam_state_dict,
    read_sam_state_dict,
    resize_pos_embed,
    resize_rel_pos,
)
from .variants import SAM_VARIANTS, SamVariant, get_variant

__all__ = [
    "REL_POS_MODES",
    "SAM_VARIANTS",
    "SamCheckpointError",
    "SamVariant",
    "SdpaAttention",
    "build_image_encoder",
    "build_sam",
    "check_img_size",
    "decomposed_rel_pos_bias",
    "enable_gradient_checkpointing",
    "enable_sdpa",
    "expand_mask_tokens",
    "fit_state_dict_to_model",
    "get_variant",
    "infer_variant",
    "is_gradient_checkpointed",
    "is_sdpa_enabled",
    "load_sam_state_dict",
    "read_sam_state_dict",
    "resize_pos_embed",
    "resize_rel_pos",
]
