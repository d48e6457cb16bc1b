"""SAM backbone: named variants and starting checkpoints, builders at any input size, official-checkpoint
loading, and the pieces the method networks share (slice stacking, block-by-block encoder runs, per-image mask
decoding, embedding cache)."""

from .attention import REL_POS_MODES, SdpaAttention, decomposed_rel_pos_bias, enable_sdpa, is_sdpa_enabled
from .builder import build_image_encoder, build_sam, check_img_size, expand_mask_tokens
from .cache import EmbeddingCache
from .decoding import decode_masks
from .encoder_blocks import block_width, run_encoder
from .grad_checkpoint import enable_gradient_checkpointing, is_gradient_checkpointed
from .slices import check_input, slices_to_volume, to_rgb, upsample_to, volume_to_slices
from .variants import SAM_CHECKPOINTS, SAM_VARIANTS, SamCheckpoint, SamVariant, get_checkpoint, get_variant
from .weights import (
    SamCheckpointError,
    check_sam_layout,
    fit_state_dict_to_model,
    infer_variant,
    load_sam_state_dict,
    read_sam_state_dict,
    resize_pos_embed,
    resize_rel_pos,
)

__all__ = [
    "EmbeddingCache",
    "REL_POS_MODES",
    "SAM_CHECKPOINTS",
    "SAM_VARIANTS",
    "SamCheckpoint",
    "SamCheckpointError",
    "SamVariant",
    "SdpaAttention",
    "block_width",
    "build_image_encoder",
    "build_sam",
    "check_sam_layout",
    "check_img_size",
    "check_input",
    "decode_masks",
    "decomposed_rel_pos_bias",
    "enable_gradient_checkpointing",
    "enable_sdpa",
    "expand_mask_tokens",
    "fit_state_dict_to_model",
    "get_checkpoint",
    "get_variant",
    "infer_variant",
    "is_gradient_checkpointed",
    "is_sdpa_enabled",
    "load_sam_state_dict",
    "read_sam_state_dict",
    "resize_pos_embed",
    "resize_rel_pos",
    "run_encoder",
    "slices_to_volume",
    "to_rgb",
    "upsample_to",
    "volume_to_slices",
]
