"""3DSAM-adapter at ``lite``: LiteMedSAM's TinyViT as a slice-wise encoder with the method's 3D adapters.

The method (Gong et al., arXiv 2306.13465, "Adapting Image Encoder for Volumetric Inputs") turns a plain
ViT into a 3D one: cube tokens from a depth-merged patch embedding, 3D window attention with depth
positions, a 3D spatial adapter at the start of every block, and necks on four blocks of one width.
LiteMedSAM's TinyViT has no plain patch embedding or uniform blocks to make 3D (convolutional first stage,
windows with per-offset 2D biases, stages of widths 128/160/320 on two grids), so the ``lite`` variant
keeps the whole TinyViT 2D and adds the third axis only through the adapters:

* the patch ``[B, 3, H, W, D]`` is resized (trilinear) so that every axial slice is ``S x S``
  (``sam_input_size``) and TinyViT's stride-4 embedding grid ``S/4`` has the same step in depth:
  ``D' = D * (S/4) / H`` slices (a 128^3 patch at ``S = 128`` gives a 32^3 grid, the paper's ViT-B grid);
* TinyViT (weights and BatchNorm statistics frozen, BatchNorms kept in eval mode) runs on each slice;
* before each of its 10 attention blocks a :class:`~shared_nets.sam3d_adapter.encoder.SpatialAdapter3D`
  (the paper's bottleneck: down-projection, depth-wise 3x3x3 convolution, up-projection; half the
  stage's width) mixes the tokens of neighbouring slices. Up-projections start at zero, so at
  initialisation the encoder computes LiteMedSAM's embedding of every slice;
* the four feature levels are TinyViT's stage outputs, made 3D by stacking the slices: stage 1 (128
  channels, average-pooled 2x2 to the S/4 grid), stage 2 (160), stage 3 (320) and the 256-channel
  LiteMedSAM embedding after TinyViT's own neck; each gets the bundle's trainable 3D neck
  (:class:`~shared_nets.sam3d_adapter.encoder.Neck3D`) to the 256-wide features that the 3D point
  prompt encoder and the multi-level decoder take, as at ViT-B.

Not carried over: the depth-merging patch embedding, the learned depth position embedding and depth
relative positions, and 3D window attention (TinyViT's attention stays within each slice); depth is
mixed by the adapters' 3D convolutions and by the 3D necks, prompt encoder and decoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shared_nets.peft import freeze_except
from shared_nets.sam.tiny_vit import TinyViTEncoder

from .encoder import Neck3D, SpatialAdapter3D
from .heads import MultiLevelDecoder3D, PromptEncoder3D
from .network import SAM3DAdapter

__all__ = ["LITE_TRAINABLE_PATTERNS", "LiteSAM3DAdapter", "LiteVolumeEncoder", "lite_grid"]

# What trains at lite (the method's set where it exists): adapters, TinyViT's block LayerNorms (the
# paper's block norms), necks, decoder, prompt encoder(s); TinyViT's weights and BatchNorms stay frozen.
LITE_TRAINABLE_PATTERNS = (
    "encoder.adapters.*",
    "encoder.vit.layers.*.blocks.*.attn.norm.*",
    "encoder.vit.layers.*.blocks.*.mlp.norm.*",
    "necks.*",
    "decoder.*",
)


def lite_grid(patch: Sequence[int], sam_input_size: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Feature grid and resized patch ``(S, S, D')`` of a ``patch = (H, W, D)`` at ``sam_input_size = S``.

    Raises:
        ValueError: ``H != W``, ``S`` not a positive multiple of 4, or ``D * (S/4)`` not a multiple of ``H``.
    """
    h, w, d = (int(s) for s in patch)
    if h != w:
        raise ValueError(f"img_size {list(patch)}: the lite 3DSAM-adapter needs H == W (square slices).")
    if not isinstance(sam_input_size, int) or sam_input_size <= 0 or sam_input_size % 4:
        raise ValueError(
            f"sam_input_size must be a positive multiple of 4 (TinyViT's stride-4 embedding), got {sam_input_size!r}."
        )
    g = sam_input_size // 4
    if (d * g) % h:
        raise ValueError(
            f"img_size {list(patch)}: at sam_input_size {sam_input_size} the in-plane grid is {g} tokens for {h} "
            f"voxels, and the depth D must map to whole slices at that step (D * {g} divisible by {h})."
        )
    depth = d * g // h
    return (g, g, depth), (sam_input_size, sam_input_size, depth)


class LiteVolumeEncoder(nn.Module):
    """LiteMedSAM's TinyViT run on every axial slice, with 3D spatial adapters before its attention blocks.

    Args:
        vit: LiteMedSAM's :class:`~shared_nets.sam.tiny_vit.TinyViTEncoder` (its weights loaded).
        patch: input patch ``(H, W, D)``.
        sam_input_size: slice side ``S`` fed to TinyViT.
        adapter_ratio: adapter bottleneck width / the stage's width (0.5 as the paper's 384 of 768).
        adapter_final_relu, adapter_zero_init: as :class:`~shared_nets.sam3d_adapter.encoder.SpatialAdapter3D`.
        chunk: slices per TinyViT call when no gradient flows (bounds peak memory).
    """

    def __init__(
        self,
        vit: TinyViTEncoder,
        patch: Sequence[int],
        sam_input_size: int,
        adapter_ratio: float = 0.5,
        adapter_final_relu: bool = False,
        adapter_zero_init: bool = True,
        chunk: int = 32,
    ) -> None:
        super().__init__()
        if not isinstance(vit, TinyViTEncoder):
            raise ValueError(f"vit must be LiteMedSAM's TinyViTEncoder, got {type(vit).__name__}.")
        self.grid, self.resized = lite_grid(patch, sam_input_size)
        self.vit = vit
        self.vit.img_size = sam_input_size
        widths = [layer.blocks[0].attn.qkv.in_features for layer in vit.layers[1:]]
        self.adapters = nn.ModuleList(
            nn.ModuleList(
                SpatialAdapter3D(
                    c, max(1, int(c * adapter_ratio)), final_relu=adapter_final_relu, zero_init=adapter_zero_init
                )
                for _ in layer.blocks
            )
            for c, layer in zip(widths, vit.layers[1:])
        )
        # levels 1-3: the attention stages' outputs; level 4: the LiteMedSAM embedding (neck output)
        self.level_dims = (*widths, int(vit.neck[0].out_channels))
        self.chunk = int(chunk)

    def train(self, mode: bool = True) -> LiteVolumeEncoder:
        """As ``nn.Module.train``, but frozen BatchNorms (TinyViT's ``ConvBN``) stay in eval mode: training
        the adapters must not replace LiteMedSAM's running statistics with a batch's."""
        super().train(mode)
        for m in self.vit.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self

    @staticmethod
    def _to_volume(x: torch.Tensor, b: int) -> torch.Tensor:
        """Slice tokens ``[B*D, h, w, C]`` -> ``[B, h, w, D, C]``."""
        n, h, w, c = x.shape
        return x.view(b, n // b, h, w, c).permute(0, 2, 3, 1, 4)

    @staticmethod
    def _to_slices(x: torch.Tensor) -> torch.Tensor:
        """``[B, h, w, D, C]`` -> ``[B*D, h, w, C]``."""
        b, h, w, d, c = x.shape
        return x.permute(0, 3, 1, 2, 4).reshape(b * d, h, w, c)

    def _stem(self, slices: torch.Tensor) -> torch.Tensor:
        """Patch embedding and the MBConv stage (no adapters there): ``[N, 3, S, S]`` -> tokens ``[N, h, w, C]``."""
        frozen = not any(p.requires_grad for m in (self.vit.patch_embed, self.vit.layers[0]) for p in m.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            parts = slices.split(self.chunk) if frozen else (slices,)
            stem = (
                self.vit.layers[0](self.vit.patch_embed(p.contiguous(memory_format=torch.channels_last))) for p in parts
            )
            return torch.cat(list(stem))

    def forward(
        self, image: torch.Tensor, levels: Sequence[int] = (1, 2, 3, 4), use_checkpoint: bool = False
    ) -> list[torch.Tensor]:
        """``[B, 3, H, W, D]`` patch -> one ``[B, C_level, S/4, S/4, D']`` feature volume per level in ``levels``."""
        b = image.shape[0]
        x = F.interpolate(image, size=self.resized, mode="trilinear", align_corners=False)
        slices = x.permute(0, 4, 1, 2, 3).reshape(-1, x.shape[1], *self.resized[:2])  # [B*D', 3, S, S]
        x = self._stem(slices)
        out: dict[int, torch.Tensor] = {}
        for i, (layer, adapters) in enumerate(zip(self.vit.layers[1:], self.adapters), start=1):
            for blk, adapter in zip(layer.blocks, adapters):
                x = self._to_slices(adapter(self._to_volume(x, b)))
                if use_checkpoint and torch.is_grad_enabled():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
            if i in levels:
                f = x.permute(0, 3, 1, 2)
                if f.shape[-1] != self.grid[0]:
                    f = F.adaptive_avg_pool2d(f, self.grid[:2])
                out[i] = self._to_volume(f.permute(0, 2, 3, 1), b).permute(0, 4, 1, 2, 3)
            if layer.downsample is not None:
                x = layer.downsample(x.permute(0, 3, 1, 2))
        if 4 in levels:
            emb = self.vit.neck(x.permute(0, 3, 1, 2))  # [B*D', 256, S/4, S/4]: LiteMedSAM's embedding
            out[4] = self._to_volume(emb.permute(0, 2, 3, 1), b).permute(0, 4, 1, 2, 3)
        return [out[k] for k in levels]


class LiteSAM3DAdapter(SAM3DAdapter):
    """:class:`~shared_nets.sam3d_adapter.network.SAM3DAdapter` with a :class:`LiteVolumeEncoder` instead of
    the ViT's 3D tokenizer and blocks; necks, 3D point prompt encoder, decoder, input contract and
    caching are the same.

    Args:
        encoder: the slice-wise TinyViT with its 3D adapters.
        necks, decoder, prompt_encoders, in_channels, max_points, no_positive, background_logit,
            use_checkpoint, cache_image_embedding, cache_size, variant: as :class:`SAM3DAdapter`.
        img_size: input patch ``H = W = D`` (int) or ``[H, W, D]``; must match the encoder's.
    """

    def __init__(
        self,
        encoder: LiteVolumeEncoder,
        necks: Mapping[int, Neck3D],
        decoder: MultiLevelDecoder3D,
        prompt_encoders: Mapping[int, PromptEncoder3D] | None = None,
        *,
        img_size: int | Sequence[int],
        in_channels: int = 1,
        max_points: int = 64,
        no_positive: str = "error",
        background_logit: float = 10.0,
        use_checkpoint: bool = False,
        cache_image_embedding: bool = False,
        cache_size: int = 8,
        variant: str | None = "lite",
    ) -> None:
        nn.Module.__init__(self)
        from .network import _as_patch_size

        patch = _as_patch_size(img_size)
        grid, resized = lite_grid(patch, encoder.resized[0])
        if grid != encoder.grid:
            raise ValueError(
                f"img_size {list(patch)} gives a {list(grid)} grid; the encoder was built for {list(encoder.grid)}."
            )
        self._init_options(
            patch,
            grid,
            necks,
            decoder,
            prompt_encoders,
            in_channels=in_channels,
            max_points=max_points,
            no_positive=no_positive,
            background_logit=background_logit,
            use_checkpoint=use_checkpoint,
            cache_image_embedding=cache_image_embedding,
            cache_size=cache_size,
            variant=variant,
        )
        self.window_size = None
        self.encoder = encoder
        self._init_heads(necks, decoder, prompt_encoders)

    def set_trainable(self, full_finetune: bool = False) -> int:
        """Adapters, TinyViT's block LayerNorms, necks, prompt encoder(s) and decoder train
        (:data:`LITE_TRAINABLE_PATTERNS`); ``full_finetune`` trains everything."""
        if full_finetune:
            for p in self.parameters():
                p.requires_grad_(True)
            return sum(p.numel() for p in self.parameters())
        patterns = list(LITE_TRAINABLE_PATTERNS) + (["prompt_encoders.*"] if self.prompt_levels else [])
        return freeze_except(self, patterns)

    def _encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        rgb = image.expand(-1, 3, -1, -1, -1) if image.shape[1] == 1 else image
        feats = self.encoder(rgb, self.decoded_levels, use_checkpoint=self.use_checkpoint and self.training)
        return [self.necks[str(k)](f) for k, f in zip(self.decoded_levels, feats)]
