"""Pieces shared by the method networks: SAM block halves, slice stacking, per-image mask decoding."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import nn

from shared_nets.sam.tiny_vit import TinyViTBlock, TinyViTEncoder

__all__ = [
    "attention_residual",
    "mlp_residual",
    "block_width",
    "block_norms",
    "run_encoder",
    "to_rgb",
    "volume_to_slices",
    "slices_to_volume",
    "decode_masks",
    "ProgressiveUpsampling",
    "check_input",
    "upsample_to",
    "EmbeddingCache",
]


def attention_residual(block: Block | TinyViTBlock, x: torch.Tensor) -> torch.Tensor:
    """``x + Attn(Norm1(x))`` of a SAM ``Block``, with its window partitioning.

    For a LiteMedSAM :class:`~shared_nets.sam.tiny_vit.TinyViTBlock` it is the block's
    ``x + WindowAttention(x)`` (the LayerNorm sits inside its attention).

    Args:
        block: a ``segment_anything`` image-encoder block or a TinyViT block.
        x: tokens ``[B, h, w, C]``.
    """
    if isinstance(block, TinyViTBlock):
        return x + block.window_attention(x)
    y = block.norm1(x)
    if block.window_size > 0:
        h, w = y.shape[1], y.shape[2]
        y, pad_hw = window_partition(y, block.window_size)
        y = block.attn(y)
        y = window_unpartition(y, block.window_size, pad_hw, (h, w))
    else:
        y = block.attn(y)
    return x + y


def mlp_residual(block: Block | TinyViTBlock, x: torch.Tensor) -> torch.Tensor:
    """``x + MLP(Norm2(x))`` of a SAM ``Block``; ``x`` is ``[B, h, w, C]``.

    For a TinyViT block: its 3×3 depth-wise ``local_conv`` (between attention and MLP), then
    ``x + MLP(x)`` (LayerNorm inside the MLP): the rest of the block after the attention residual.
    """
    if isinstance(block, TinyViTBlock):
        x = block.local_conv(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        return x + block.mlp(x)
    return x + block.mlp(block.norm2(x))


def block_width(block: nn.Module) -> int:
    """Token width of a SAM ViT ``Block`` (``norm1``) or a TinyViT block (its attention's ``norm``)."""
    norm = block.attn.norm if isinstance(block, TinyViTBlock) else block.norm1
    return int(norm.normalized_shape[0])


def block_norms(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The two LayerNorms of an encoder block: ViT ``norm1``/``norm2``; TinyViT ``attn.norm``/``mlp.norm``."""
    if isinstance(block, TinyViTBlock):
        return block.attn.norm, block.mlp.norm
    return block.norm1, block.norm2


def run_encoder(
    encoder: nn.Module, images: torch.Tensor, block_fn: Callable[[int, nn.Module, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """An image encoder's forward pass with each block replaced by ``block_fn(i, block, tokens)``.

    SAM's ViT: patch embedding (+ position embedding), blocks, neck. LiteMedSAM's TinyViT:
    patch embedding, the convolutional stage, then per attention stage its blocks and patch
    merging, neck; ``i`` counts attention blocks over all stages (``encoder.blocks`` order), whose
    token grids and widths change between stages. Tokens are ``[B, h, w, C]`` in both.

    Args:
        encoder: ``ImageEncoderViT`` or :class:`~shared_nets.sam.tiny_vit.TinyViTEncoder`.
        images: ``[B, 3, S, S]``.
        block_fn: runs block ``i`` (e.g. with adapters around it); ``lambda i, b, t: b(t)`` is the encoder.

    Returns:
        The neck output ``[B, C', h, w]``.
    """
    if isinstance(encoder, TinyViTEncoder):
        t = encoder.layers[0](encoder.patch_embed(images))
        i = 0
        for layer in encoder.layers[1:]:
            for blk in layer.blocks:
                t = block_fn(i, blk, t)
                i += 1
            if layer.downsample is not None:
                t = layer.downsample(t.permute(0, 3, 1, 2).contiguous())
        return encoder.neck(t.permute(0, 3, 1, 2).contiguous())
    t = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        t = t + encoder.pos_embed
    for i, blk in enumerate(encoder.blocks):
        t = block_fn(i, blk, t)
    return encoder.neck(t.permute(0, 3, 1, 2))


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Repeat a grey ``[N, 1, H, W]`` batch to SAM's 3 channels (3-channel input passes through)."""
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3:
        return x
    raise ValueError(f"image input must have 1 (grey) or 3 (RGB) channels, got {x.shape[1]}.")


def volume_to_slices(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W, D]`` → ``[B*D, C, H, W]`` with row order ``b*D + d``."""
    b, c, h, w, d = x.shape
    return x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)


def slices_to_volume(x: torch.Tensor, depth: int) -> torch.Tensor:
    """``[B*D, K, H, W]`` → ``[B, K, H, W, D]`` (inverse of :func:`volume_to_slices`)."""
    n, k, h, w = x.shape
    return x.reshape(n // depth, depth, k, h, w).permute(0, 2, 3, 4, 1)


def check_input(x: torch.Tensor, channels: int, img_size: int | None = None, depth: int | None = None, name: str = "network") -> None:
    """Raise ``ValueError`` naming what was expected when ``x`` is not ``[B, channels, H, W, D]``."""
    if x.ndim != 5:
        raise ValueError(f"{name}: expected a 5D input [B, C, H, W, D], got shape {tuple(x.shape)}.")
    if x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} input channel(s) (image + guidance), got {x.shape[1]} in shape {tuple(x.shape)}.")
    if img_size is not None and tuple(x.shape[2:4]) != (img_size, img_size):
        raise ValueError(
            f"{name}: expected in-plane size {img_size}x{img_size} (the network's img_size; resize in pre-processing), "
            f"got {tuple(x.shape[2:4])}."
        )
    if depth is not None and x.shape[4] != depth:
        raise ValueError(f"{name}: expected {depth} slices along the last axis, got {x.shape[4]}.")


class ProgressiveUpsampling(nn.Module):
    """MA-SAM's progressive up-sampling (paper sec. 3.4): SAM's two transposed convs plus more.

    Paper sec. 3.4: "we use progressive up-sampling [...] to recover the prediction resolution
    to the original input size". The layers follow the official network
    (cchen-cc/MA-SAM, ``MA-SAM/segment_anything/modeling/mask_decoder.py``, ``output_upscaling``):
    ``ConvT, LN, GELU`` per stage, the last stage without LN, widths C → C/4 → C/8 → C/16 → C/32
    (256 → 64 → 32 → 16 → 8). The first two transposed convs (and the first LN) are SAM's
    pretrained ``output_upscaling`` (×4), which the official ``load_from`` (``build_sam.py``)
    loads into the same indices; unlike SAM, the official network has a ``LayerNorm2d(C/8)``
    after the *second* transposed conv too, so one is inserted there (new, 2·C/8 parameters).
    New transposed convs (×2 each) recover full resolution: two for SAM's patch 16, one for
    patch 8. Widths have a floor of 8 so narrow test models keep usable feature maps.

    Layout: ``sam_upscaling`` = ``[ConvT, LN, GELU, ConvT, LN (new), GELU]`` (same indices as the
    official ``output_upscaling[0:6]``); ``extra`` = the remaining stages.

    Args:
        sam_upscaling: the pretrained ``MaskDecoder.output_upscaling`` (H/p → 4H/p), SAM's layout
            ``[ConvT, LayerNorm2d, GELU, ConvT, GELU]``.
        transformer_dim: the decoder width C.
        patch_size: the encoder's patch size p (a power of two ≥ 4).
    """

    def __init__(self, sam_upscaling: nn.Module, transformer_dim: int, patch_size: int = 16) -> None:
        super().__init__()
        stages = int(math.log2(patch_size)) - 2
        if stages < 0 or 2 ** (stages + 2) != patch_size:
            raise ValueError(f"patch_size must be a power of two >= 4 for progressive up-sampling, got {patch_size}.")
        sam_layers = list(sam_upscaling)
        kinds = [type(m) for m in sam_layers]
        if len(sam_layers) != 5 or kinds[0] is not nn.ConvTranspose2d or kinds[3] is not nn.ConvTranspose2d:
            raise ValueError(
                "sam_upscaling must be SAM's output_upscaling [ConvTranspose2d, LayerNorm2d, GELU, ConvTranspose2d, "
                f"GELU], got {[k.__name__ for k in kinds]}."
            )
        second = sam_layers[3]
        norm = LayerNorm2d(second.out_channels).to(device=second.weight.device, dtype=second.weight.dtype)
        widths = [transformer_dim // 8] + [max(transformer_dim // 2 ** (4 + i), 8) for i in range(stages)]
        layers: list[nn.Module] = []
        for i in range(stages):
            layers.append(nn.ConvTranspose2d(widths[i], widths[i + 1], kernel_size=2, stride=2))
            if i < stages - 1:
                layers.append(LayerNorm2d(widths[i + 1]))
            layers.append(nn.GELU())
        self.sam_upscaling = nn.Sequential(*sam_layers[:4], norm, sam_layers[4])
        self.extra = nn.Sequential(*layers)
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.sam_upscaling(x))


def decode_masks(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    upscaling: nn.Module | None = None,
    hypernetworks: nn.ModuleList | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a SAM ``MaskDecoder`` with one prompt set per image (row ``n`` with row ``n``).

    ``MaskDecoder.predict_masks`` assumes one image and many prompts and repeats the image
    per prompt row; for a batch of slices each with its own prompt that multiplies the batch.
    This pairs rows instead (sparse/dense with batch 1 broadcast to all images).

    Args:
        decoder: the SAM mask decoder (its transformer, tokens and IoU head are used).
        image_embeddings: ``[N, C, h, w]``.
        image_pe: ``[1, C, h, w]`` dense positional encoding.
        sparse: ``[N or 1, T, C]`` prompt tokens.
        dense: ``[N or 1, C, h, w]`` dense prompt embedding.
        upscaling: replaces ``decoder.output_upscaling`` (e.g. :class:`ProgressiveUpsampling`).
        hypernetworks: replaces ``decoder.output_hypernetworks_mlps`` (matching ``upscaling`` width).

    Returns:
        masks ``[N, num_mask_tokens, H', W']`` and IoU predictions ``[N, num_mask_tokens]``.
    """
    n = image_embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse.expand(n, -1, -1)], dim=1)
    src = image_embeddings + dense
    pos_src = image_pe.expand(n, -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    up = (upscaling or decoder.output_upscaling)(src.transpose(1, 2).reshape(b, c, h, w))
    mlps = hypernetworks or decoder.output_hypernetworks_mlps
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(mlps)], dim=1)
    b, c, h, w = up.shape
    masks = (hyper_in @ up.reshape(b, c, h * w)).reshape(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)


def upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[N, K, h, w]`` logits to ``size`` (no-op when already there)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)



class EmbeddingCache:
    """Small LRU cache of image embeddings for interactive re-prompting (issue 10).

    An entry is found again when the same image (compared with ``torch.equal`` on a stored
    copy, on the image's own device, so no host transfer or hashing), the same ``key`` (e.g.
    the slice count) and the same parameter versions of ``module`` are seen: any in-place
    update of those weights (an optimizer step, ``load_state_dict``) invalidates every entry.
    Only used without autograd (a cached embedding carries no graph); otherwise the cache is
    cleared and bypassed. Each entry also holds a dict ``extra`` for other prompt-independent
    results derived from the embedding (e.g. decoder partial sums), computed once per image.

    Args:
        size: entries kept (the windows of one volume); 0 disables caching.
        module: the module whose parameters the embedding depends on (the image encoder).
    """

    def __init__(self, size: int, module: nn.Module) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"embedding cache size must be an integer >= 0 (0 disables), got {size!r}.")
        self.size = size
        self._module = [module]  # a list, so the cache is not registered as a submodule's owner
        self.entries: list[dict[str, Any]] = []
        self.hits = 0
        self.misses = 0

    def _version(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._module[0].parameters())

    def active(self) -> bool:
        """Caching applies now: enabled and autograd off."""
        return self.size > 0 and not torch.is_grad_enabled()

    def lookup(self, image: torch.Tensor, key: Hashable, compute: Callable[[], Any]) -> dict[str, Any] | None:
        """The entry for ``image``/``key`` (``{"value": compute(), "extra": {}}``), or None when inactive.

        A miss runs ``compute()`` and stores its result (detached tensors or lists of them).
        """
        if not self.active():
            self.entries.clear()
            return None
        version = self._version()
        for i, e in enumerate(self.entries):
            img = e["image"]
            if (
                e["key"] == key and e["version"] == version and img.shape == image.shape and img.dtype == image.dtype
                and img.device == image.device and torch.equal(img, image)
            ):
                self.entries.append(self.entries.pop(i))  # most recently used last
                self.hits += 1
                return e
        self.misses += 1
        value = compute()
        value = [v.detach() for v in value] if isinstance(value, (list, tuple)) else value.detach()
        entry = {"image": image.detach().clone(), "key": key, "version": version, "value": value, "extra": {}}
        self.entries.append(entry)
        del self.entries[: -self.size]
        return entry

    def clear(self) -> None:
        """Drop every entry (hit/miss counters are kept)."""
        self.entries.clear()
