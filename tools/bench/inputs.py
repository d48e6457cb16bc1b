"""Inputs: the fixed phantom, its prompts as guidance channels, crops, and the bundles' configs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_nets.interface import BenchCase, bench_case, config_value

OBJECT_ID = 6  # liver (BTCV id) is the prompted object
DATASET_TYPES = ("Dataset", "CacheDataset", "PersistentDataset")
_value = config_value


def bundle_parser(root: Path, configs: Sequence[str], overrides: dict[str, Any]):
    """A MONAI ``ConfigParser`` over the bundle's ``configs`` that exist (merged in order by
    ``tools.init_model.merged_config``, so a ``"a#b"`` key of a later file whose parent ``a`` is absent is
    skipped) plus ``overrides``, with ``configs/metadata.json`` when present."""
    from monai.bundle import ConfigParser

    from tools.init_model import merged_config

    root = Path(root)
    present = [c for c in configs if (root / "configs" / c).exists()]
    parser = ConfigParser(merged_config(root, present, overrides) if present else dict(overrides))
    meta = root / "configs" / "metadata.json"
    if meta.exists():
        parser.read_meta(str(meta))
    return parser


def network_case(config: Any) -> BenchCase:
    """The method's :class:`shared_nets.interface.BenchCase` for a raw config (a ``ConfigParser`` or dict),
    from its ``network_def#_target_`` (nothing is built)."""
    net_def = config.get("network_def") if hasattr(config, "get") else None
    return bench_case(net_def.get("_target_") if isinstance(net_def, dict) else None)


def bundle_case(root: str | os.PathLike) -> BenchCase:
    """:func:`network_case` of a bundle's ``configs/train.json``."""
    from monai.bundle import ConfigParser

    return network_case(ConfigParser.load_config_file(str(Path(root) / "configs" / "train.json")))


@dataclass
class Phantom:
    """The fixed phantom (``tools.demo_data.make_phantom``).

    Attributes:
        image: ``[H, W, D]`` float, HU window [-200, 250] scaled to [0, 1].
        label: ``[H, W, D]`` int64 BTCV ids.
    """

    image: torch.Tensor
    label: torch.Tensor

    @classmethod
    def make(cls, shape: Sequence[int], seed: int = 0) -> Phantom:
        from tools.demo_data import make_phantom

        image, label, _ = make_phantom(tuple(int(s) for s in shape), rng=seed)
        img = (np.clip(image.astype(np.float32), -200, 250) + 200) / 450
        return cls(torch.from_numpy(img), torch.from_numpy(label.astype(np.int64)))

    def resized(self, size: int) -> Phantom:
        """In-plane resize to ``size × size`` (image bilinear, label nearest), as the bundles' pre-processing does."""
        h, w, d = self.image.shape
        if (h, w) == (size, size):
            return self
        img = torch.nn.functional.interpolate(self.image.permute(2, 0, 1)[None], size=(size, size), mode="bilinear")
        lab = torch.nn.functional.interpolate(
            self.label.permute(2, 0, 1)[None].float(), size=(size, size), mode="nearest"
        )
        return Phantom(img[0].permute(1, 2, 0).contiguous(), lab[0].permute(1, 2, 0).long().contiguous())


def _prompts(mask: torch.Tensor) -> dict[str, Any]:
    """MONAI Label style prompts for a binary ``mask [H, W, D]``: one click near its centroid, its box."""
    idx = torch.nonzero(mask)
    if len(idx) == 0:
        return {"foreground": [], "background": [], "roi": None}
    centre = idx.float().mean(0)
    click = idx[(idx.float() - centre).pow(2).sum(1).argmin()].tolist()
    lo, hi = idx.min(0).values.tolist(), (idx.max(0).values + 1).tolist()
    return {"foreground": [click], "background": [], "roi": lo + hi}


def _corrective_clicks(prompts: dict[str, Any], mask: torch.Tensor, step: int = 2) -> dict[str, Any]:
    """``prompts`` plus a re-prompt: a positive click ``step`` voxels from the first click and a
    negative one mirrored about it, on the same slice (clamped to the volume).

    The pair keeps the prompts' bounding box centre, so a prompt-region inferer evaluates the same
    windows as for the first click (a click that moves the region shifts the windows, and each
    shifted window is a new image for the embedding cache).
    """
    if not prompts["foreground"]:
        return prompts
    i, j, k = prompts["foreground"][0]
    hi = mask.shape[0] - 1
    step = min(step, i, hi - i)
    return {
        **prompts,
        "foreground": [*prompts["foreground"], [i + step, j, k]],
        "background": [*prompts["background"], [i - step, j, k]],
    }


def _with_guidance(
    image: torch.Tensor, mask: torch.Tensor, keys: tuple[str, ...], reprompt: bool = False
) -> torch.Tensor:
    """``[1, H, W, D]`` image → ``[1 + len(keys), H, W, D]`` with rasterised prompts (shared_nets.prompts);
    ``reprompt`` adds :func:`_corrective_clicks`."""
    if not keys:
        return image
    from shared_nets.prompts import AddGuidanceChannelsd

    prompts = _prompts(mask)
    data = {"image": image, **(_corrective_clicks(prompts, mask) if reprompt else prompts)}
    return torch.as_tensor(AddGuidanceChannelsd("image", keys)(data)["image"])


def _crop(t: torch.Tensor, centre: Sequence[int], roi: Sequence[int]) -> torch.Tensor:
    """Crop ``t [C, H, W, D]`` to ``roi`` around ``centre`` (clamped to the volume; zero-padded if smaller)."""
    pad = [max(0, int(r) - int(n)) for r, n in zip(roi, t.shape[1:])]
    if any(pad):
        t = torch.nn.functional.pad(t, [q for p in reversed(pad) for q in (0, p)])
    starts = [min(max(0, int(c) - int(r) // 2), int(n) - int(r)) for c, r, n in zip(centre, roi, t.shape[1:])]
    return t[(slice(None), *(slice(a, a + int(r)) for a, r in zip(starts, roi)))]
