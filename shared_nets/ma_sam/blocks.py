"""MA-SAM's building blocks: the encoder block halves its 3D adapters sit between, and the two
up-sampling decoders of Table 6 (progressive up-sampling, multi-scale fusion)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from torch import nn

from shared_nets.sam.tiny_vit import TinyViTBlock

__all__ = ["MultiScaleFusion", "ProgressiveUpsampling", "attention_residual", "mlp_residual"]


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
    official ``output_upscaling[0:6]``); ``extra`` = the remaining stages, one flat ``Sequential``
    (so the state-dict keys stay ``extra.0.*``, ``extra.1.*``, ...), each stage ×2:
    ``[ConvT, LN, GELU]``, the last ``[ConvT, GELU]``. :meth:`run_stage` runs one of them.

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
        bounds: list[tuple[int, int]] = []
        for i in range(stages):
            start = len(layers)
            layers.append(nn.ConvTranspose2d(widths[i], widths[i + 1], kernel_size=2, stride=2))
            if i < stages - 1:
                layers.append(LayerNorm2d(widths[i + 1]))
            layers.append(nn.GELU())
            bounds.append((start, len(layers)))
        self.sam_upscaling = nn.Sequential(*sam_layers[:4], norm, sam_layers[4])
        self.extra = nn.Sequential(*layers)
        self.stage_bounds: tuple[tuple[int, int], ...] = tuple(bounds)  # [start, end) of each stage in ``extra``
        self.out_channels = widths[-1]

    @property
    def num_stages(self) -> int:
        """Stages after SAM's own two (×2 each)."""
        return len(self.stage_bounds)

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` of the new up-sampling stages (``0 <= i < num_stages``): ×2 resolution."""
        if not 0 <= i < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages - 1}], got {i}.")
        start, end = self.stage_bounds[i]
        for layer in self.extra[start:end]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.sam_upscaling(x))


class MultiScaleFusion(nn.Module):
    """Table 6's "multi-scale fusion" decoder: U-shaped skips from four encoder stages (sec. 3.4).

    The encoder is divided uniformly into four stages; the features after stages 1-3 are
    projected, up-sampled and convolved, and added to the decoder's up-sampling path at H/4,
    H/2 and H (stage 3 joins earliest, stage 1 at full resolution).

    Args:
        sam_upscaling: the pretrained ``output_upscaling`` (H/16 → H/4).
        embed_dim: encoder token width E.
        transformer_dim: decoder width C.
    """

    def __init__(self, sam_upscaling: nn.Module, embed_dim: int, transformer_dim: int) -> None:
        super().__init__()
        self.progressive = ProgressiveUpsampling(sam_upscaling, transformer_dim)
        c2 = transformer_dim // 8  # output width of SAM's own two stages
        c3, c4 = max(transformer_dim // 16, 8), max(transformer_dim // 32, 8)
        self.out_channels = c4
        # (channels, up-sampling factor from H/16) for the skips joining at H/4, H/2, H
        self.skips = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(embed_dim, c, kernel_size=1, bias=False),
                nn.Upsample(scale_factor=f, mode="bilinear", align_corners=False),
                nn.Conv2d(c, c, kernel_size=3, padding=1),
                LayerNorm2d(c),
                nn.GELU(),
            )
            for c, f in ((c2, 4), (c3, 8), (c4, 16))
        )

    def forward(self, x: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Up-sample the decoder map with the encoder skips.

        Args:
            x: decoder map ``[N, C, h, w]`` (``h = H/16``).
            features: the tokens ``[N, h, w, E]`` after encoder stages 3, 2 and 1, in that order.

        Returns:
            ``[N, out_channels, 16h, 16w]``.
        """
        if len(features) != 3:
            raise ValueError(
                f"MultiScaleFusion needs the tokens after encoder stages 3, 2 and 1, got {len(features)} feature maps."
            )
        feats = [f.permute(0, 3, 1, 2) for f in features]
        p = self.progressive
        x = p.sam_upscaling(x) + self.skips[0](feats[0])
        x = p.run_stage(0, x) + self.skips[1](feats[1])
        return p.run_stage(1, x) + self.skips[2](feats[2])
