"""3DSAM-adapter prompt encoder (visual sampler + global queries) and multi-level 3D CNN decoder."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from segment_anything.modeling.transformer import TwoWayAttentionBlock
from torch import nn

__all__ = ["PositionEmbeddingRandom3D", "PromptEncoder3D", "MultiLevelDecoder3D", "PROMPT_ENCODINGS", "PROMPT_LAYERS"]

PROMPT_ENCODINGS = ("visual_sampler", "positional_encoding")
PROMPT_LAYERS = ("two_way", "official")


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier position encoding of 3D coordinates (SAM's ``PositionEmbeddingRandom`` in 3D).

    Args:
        num_pos_feats: frequencies; the encoding has ``2 * num_pos_feats`` channels.
    """

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("gaussian_matrix", torch.randn(3, num_pos_feats))

    def forward(self, coords01: torch.Tensor) -> torch.Tensor:
        """``[..., 3]`` coordinates in ``[0, 1]`` (h, w, d order) -> ``[..., 2 * num_pos_feats]``."""
        x = (2 * coords01 - 1).to(self.gaussian_matrix.dtype) @ self.gaussian_matrix
        x = 2 * math.pi * x
        return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)

    def grid(self, size: Sequence[int]) -> torch.Tensor:
        """Encoding of every voxel centre of a ``size = (h, w, d)`` grid: ``[h * w * d, C]`` (h-major)."""
        axes = [(torch.arange(s, device=self.gaussian_matrix.device, dtype=torch.float32) + 0.5) / s for s in size]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return self(coords).flatten(0, 2)


class PromptEncoder3D(nn.Module):
    """3D point prompts -> prompt-conditioned image features (poster "Prompt Encoding by Visual Sampler").

    The visual sampler reads the image features at each 3D point (trilinear ``grid_sample``);
    those point tokens, with learnable global queries (a fresh set per layer, 10 in the
    official code), and the image tokens exchange information through SAM's two-way attention
    blocks; the updated image tokens are returned as the level's feature map.

    Modes (poster ablation "visual sampler vs positional encoding"):
        ``encoding="visual_sampler"`` (the method) or ``"positional_encoding"`` (SAM-style point
        tokens: Fourier encoding of the coordinate plus a positive/negative label embedding).
    Layers:
        ``layer="two_way"`` runs ``segment_anything``'s ``TwoWayAttentionBlock`` unchanged
        (tokens attend to the image, MLP, image attends to all tokens, with position
        encodings). ``layer="official"`` reproduces the released code: point tokens and global
        queries only self-attend (no position encoding), the global queries go through the
        MLP, and the image attends to the global queries alone. The released code builds the
        tokens-to-image attention but never calls it; that mode does not build it (131,712
        fewer parameters per ViT-B layer).

    Args:
        dim: feature width (neck output, 256 for ViT-B).
        num_heads: attention heads (8).
        mlp_dim: MLP width (2048).
        depth: two-way layers (2).
        num_global_queries: learnable global queries per layer (10).
        encoding: see above.
        layer: see above.
        use_point_labels: add a learned positive/negative label embedding to sampled point tokens
            (the official visual sampler ignores click labels; always on for
            ``positional_encoding``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        depth: int = 2,
        num_global_queries: int = 10,
        encoding: str = "visual_sampler",
        layer: str = "two_way",
        use_point_labels: bool = False,
    ) -> None:
        super().__init__()
        if encoding not in PROMPT_ENCODINGS:
            raise ValueError(f"prompt encoding must be one of {PROMPT_ENCODINGS}, got {encoding!r}.")
        if layer not in PROMPT_LAYERS:
            raise ValueError(f"prompt_layer must be one of {PROMPT_LAYERS}, got {layer!r}.")
        if num_global_queries < 1:
            raise ValueError(f"num_global_queries must be a positive integer, got {num_global_queries!r}.")
        if dim % 2:
            raise ValueError(f"prompt encoder width must be even (Fourier features), got {dim}.")
        self.encoding = encoding
        self.layer = layer
        self.num_global_queries = int(num_global_queries)
        self.layers = nn.ModuleList(
            # keep the residual and position encodings in the first layer too: our first queries are
            # sampled image features, not SAM's prompt embeddings
            TwoWayAttentionBlock(dim, num_heads, mlp_dim=mlp_dim, skip_first_layer_pe=False)
            for _ in range(depth)
        )
        if layer == "official":
            for blk in self.layers:
                del blk.cross_attn_token_to_image
        self.global_queries = nn.Parameter(0.1 * torch.randn(depth, self.num_global_queries, dim))
        self.pe = PositionEmbeddingRandom3D(dim // 2)
        self.label_embed = nn.Embedding(2, dim) if (use_point_labels or encoding == "positional_encoding") else None
        if self.label_embed is not None and encoding == "visual_sampler":
            nn.init.zeros_(self.label_embed.weight)  # starts as the label-agnostic sampler

    def _point_tokens(self, feat: torch.Tensor, coords01: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.encoding == "visual_sampler":
            grid = (2 * coords01 - 1).flip(-1).to(feat.dtype)  # grid_sample wants (x=d, y=w, z=h)
            tok = F.grid_sample(feat, grid.view(1, 1, 1, -1, 3), mode="bilinear", align_corners=False)
            tok = tok.flatten(2).transpose(1, 2)  # [1, P, C]
        else:
            tok = self.pe(coords01)[None].to(feat.dtype)
        if self.label_embed is not None:
            tok = tok + self.label_embed(labels.long())[None].to(tok.dtype)
        return tok

    def _official_layer(
        self, blk: TwoWayAttentionBlock, glob: torch.Tensor, points: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = glob.shape[1]
        q = torch.cat([glob, points], dim=1)
        q = blk.norm2(q + blk.norm1(blk.self_attn(q=q, k=q, v=q)))
        glob, points = q[:, :g], q[:, g:]
        glob = blk.norm3(glob + blk.mlp(glob))
        image = blk.norm4(image + blk.cross_attn_image_to_token(q=image, k=glob, v=glob))
        return points, image

    def forward(
        self, feat: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, patch_size: Sequence[int]
    ) -> torch.Tensor:
        """Condition image features on the clicks of each batch item.

        Args:
            feat: ``[B, C, h, w, d]`` image features of one level.
            coords: ``[B, P, 3]`` click voxel coordinates ``(i, j, k)`` in the input patch.
            labels: ``[B, P]`` 1 positive, 0 negative, -1 padding (ignored).
            patch_size: ``(H, W, D)`` of the input patch.

        Returns:
            ``[B, C, h, w, d]``.
        """
        size = torch.as_tensor(patch_size, dtype=torch.float32, device=feat.device)
        image_pe = self.pe.grid(feat.shape[2:])[None].to(feat.dtype) if self.layer == "two_way" else None
        out = []
        for b in range(feat.shape[0]):
            keep = labels[b] >= 0
            coords01 = (coords[b][keep].float() + 0.5) / size  # [P, 3]
            f = feat[b : b + 1]
            points = self._point_tokens(f, coords01, labels[b][keep])
            point_pe = self.pe(coords01)[None].to(feat.dtype) if image_pe is not None else None
            image = f.flatten(2).transpose(1, 2)  # [1, N, C]
            for i, blk in enumerate(self.layers):
                glob = self.global_queries[i][None].to(image.dtype)
                if self.layer == "official":
                    points, image = self._official_layer(blk, glob, points, image)
                    continue
                g = glob.shape[1]
                tokens = torch.cat([glob, points], dim=1)
                query_pe = torch.cat([torch.zeros_like(glob), point_pe], dim=1)
                tokens, image = blk(queries=tokens, keys=image, query_pe=query_pe, key_pe=image_pe)
                points = tokens[:, g:]
            out.append(image.transpose(1, 2).reshape(f.shape))
        return torch.cat(out, 0)


class MultiLevelDecoder3D(nn.Module):
    """Light 3D CNN decoder with multi-layer aggregation (poster "Lightweight Mask Decoder").

    Each feature level passes through ``(3D Conv + IN + ReLU) x 2`` and is upsampled x2
    (trilinear); the levels are concatenated with the image resized to that grid, reduced by
    ``3D Conv + IN + ReLU + 3D Conv`` to class logits and upsampled to the patch size.

    Args:
        in_channels: width of each level's features (256 for ViT-B).
        channels: width of each level's head (128 for ViT-B).
        num_classes: output channels ``K``.
        num_levels: feature levels aggregated (4; 1 = bottleneck only, the poster's
            "without multi-layer aggregation" ablation).
        image_channels: image channels concatenated before the classifier (1).
    """

    def __init__(
        self, in_channels: int, channels: int, num_classes: int, num_levels: int = 4, image_channels: int = 1
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.num_levels = int(num_levels)

        def block(cin: int, cout: int) -> Convolution:
            return Convolution(3, cin, cout, kernel_size=3, act="RELU", norm="INSTANCE", bias=False)

        self.heads = nn.ModuleList(
            nn.Sequential(block(in_channels, channels), block(channels, channels)) for _ in range(num_levels)
        )
        self.cls = nn.Sequential(
            block(num_levels * channels + image_channels, channels),
            Convolution(3, channels, num_classes, kernel_size=3, bias=False, conv_only=True),
        )

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """Decode.

        Args:
            features: ``num_levels`` tensors ``[B, C, h, w, d]``, shallow to deep.
            image: ``[B, image_channels, H, W, D]``.
            out_size: ``(H, W, D)`` of the logits.

        Returns:
            ``[B, K, H, W, D]`` logits.
        """
        self._check_levels(features)
        x = [self._level(i, f) for i, f in enumerate(features)]
        img = F.interpolate(image.to(x[0].dtype), size=x[0].shape[2:], mode="trilinear")
        x = self.cls(torch.cat([*x, img], dim=1))
        return F.interpolate(x, size=tuple(out_size), mode="trilinear", align_corners=True)

    def _check_levels(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != len(self.heads):
            raise ValueError(f"decoder expects {len(self.heads)} feature levels, got {len(features)}.")

    def _level(self, i: int, f: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.heads[i](f), scale_factor=2, mode="trilinear", align_corners=True)

    def _first_conv_part(self, x: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
        """The classifier's first convolution restricted to input ``channels`` (it has no bias, so
        the convolution of the concatenation is the sum of these parts)."""
        conv = self.cls[0].conv
        weight = conv.weight[:, list(channels)]
        return F.conv3d(x, weight, None, conv.stride, conv.padding, conv.dilation)

    def _width(self) -> int:
        return self.heads[0][-1].conv.out_channels

    def _channels(self, levels: Sequence[int]) -> list[int]:
        return [lv * self._width() + c for lv in levels for c in range(self._width())]

    def static_part(
        self, features: Sequence[torch.Tensor], image: torch.Tensor, prompted: Sequence[int]
    ) -> torch.Tensor:
        """What the decoder computes from the levels without a prompt and the image (cacheable per image).

        Args:
            features: the levels as in :meth:`forward` (the ``prompted`` ones are not read).
            image: ``[B, image_channels, H, W, D]``.
            prompted: indices of the levels that depend on the prompt.

        Returns:
            The classifier's first convolution over those channels, ``[B, channels, 2h, 2w, 2d]``.
        """
        self._check_levels(features)
        static = [i for i in range(len(self.heads)) if i not in prompted]
        grid = [2 * s for s in features[0].shape[2:]]
        parts = [self._level(i, features[i]) for i in static]
        img = F.interpolate(image.to(features[0].dtype), size=grid, mode="trilinear")
        n_img = img.shape[1]
        channels = self._channels(static) + [len(self.heads) * self._width() + c for c in range(n_img)]
        return self._first_conv_part(torch.cat([*parts, img], dim=1), channels)

    def forward_with_static(
        self, features: Sequence[torch.Tensor], static: torch.Tensor, prompted: Sequence[int], out_size: Sequence[int]
    ) -> torch.Tensor:
        """:meth:`forward` from :meth:`static_part`: only the ``prompted`` levels' path runs (a re-prompt).

        Equal to :meth:`forward` up to float summation order.
        """
        self._check_levels(features)
        parts = [self._level(i, features[i]) for i in prompted]
        x = static + self._first_conv_part(torch.cat(parts, dim=1), self._channels(prompted))
        x = self.cls[1](self.cls[0].adn(x))
        return F.interpolate(x, size=tuple(out_size), mode="trilinear", align_corners=True)
