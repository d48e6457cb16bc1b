"""Export a bundle's network (PEFT merged) as TorchScript, ``torch.export`` and ONNX, checked on a real CT.

Command line (from the checkout)::

    python -m tools export --bundle bundles/ma_sam --configs inference.json,demo.json \
        [--formats ts,pt2,onnx] [--out bundles/ma_sam/models] [--ct data/totalsegmentator_example/ct.nii.gz]

The network is built from ``network_def`` of the merged configs, ``models/model.pt`` is loaded
(strict) when present and the PEFT deltas are merged (``shared_nets.peft.merge_peft``). The part
that the formats can express is exported (``shared_nets.export.export_part``: the whole network,
or Med-SA's / 3DSAM-adapter's core with prompts decoded eagerly). Before anything is written, each
artifact is compared with the eager network on two inputs cut from the CT after the bundle's own
``preprocessing`` (another batch size than the one traced/exported on): max abs logit difference
<= ``atol`` and the same argmax. ``model.ts`` / ``model.pt2`` / ``model.onnx`` and ``export.json``
(part, merge counts, frozen trace lines, the measured differences) are then written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_bundle_network", "ct_inputs", "export_bundle", "main"]

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_CT = _REPO / "data" / "totalsegmentator_example" / "ct.nii.gz"
LIVER = 5  # TotalSegmentator "total" id of the liver in seg.nii.gz


def load_bundle_network(
    bundle: str | os.PathLike,
    configs: Sequence[str] = ("inference.json",),
    overrides: Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike | None = None,
    merge: bool = True,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Build ``network_def`` of a bundle, load its weights and merge the PEFT deltas.

    Args:
        bundle: bundle folder.
        configs: file names under ``configs/``, merged in order (``tools.init_model.merged_config``).
        overrides: extra config ``{id: value}``.
        checkpoint: state dict to load (strict); default ``<bundle>/models/model.pt`` when it exists,
            else the configured initialisation is kept.
        merge: merge mergeable PEFT layers (LoRA, FacT, SVD) into the base weights.

    Returns:
        ``(network in eval mode, ConfigParser, info)``; ``info`` holds the checkpoint, the number of
        merged layers and the names of the adapters kept as modules.
    """
    from monai.bundle import ConfigParser

    from shared_nets.peft.merge import find_unmergeable, merge_peft
    from tools.init_model import _as_list, merged_config

    root = Path(bundle)
    config = merged_config(root, _as_list(configs, "configs"), {"bundle_root": str(root), **dict(overrides or {})})
    parser = ConfigParser(config)
    meta = root / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    if "network_def" not in parser.config:
        raise ValueError(f"bundle config of '{root}' has no 'network_def' to export.")
    net = parser.get_parsed_content("network_def", instantiate=True)
    ckpt = Path(checkpoint) if checkpoint is not None else root / "models" / "model.pt"
    if checkpoint is not None and not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint '{ckpt}' does not exist.")
    info: dict[str, Any] = {"checkpoint": str(ckpt) if ckpt.is_file() else None}
    if ckpt.is_file():
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("network"), Mapping):
            state = state["network"]  # CheckpointSaver's {"network": ...} layout
        net.load_state_dict(state, strict=True)
    net.eval()
    info["merged_layers"] = merge_peft(net) if merge else 0
    info["unmerged_adapters"] = find_unmergeable(net)
    return net, parser, info


def _liver(seg: str | os.PathLike) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np

    lab = np.asarray(nib.load(str(seg)).dataobj)
    idx = np.argwhere(lab == LIVER)
    if idx.size == 0:
        raise ValueError(f"segmentation '{seg}' has no voxel of label {LIVER} (liver) to place the prompts at.")
    return {
        "roi": idx.min(0).tolist() + idx.max(0).tolist(),
        "foreground": [np.round(idx.mean(0)).astype(int).tolist()],
        "z": float(idx.mean(0)[2] / max(lab.shape[2] - 1, 1)),
    }


def ct_inputs(
    net: nn.Module, parser: Any, ct: str | os.PathLike, seg: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two network inputs cut from a CT after the bundle's ``preprocessing``: batch 1 and batch 2.

    Prompted bundles get a box (Med-SA) or a click (3DSAM-adapter) on the liver of ``seg``
    (default ``seg.nii.gz`` beside ``ct``), placed through the bundle's own prompt transforms.
    Windows are centred on the liver slices.
    """
    from monai.transforms import SpatialCrop, SpatialPad

    from shared_nets.med_sa.network import MedSA
    from shared_nets.sam3d_adapter.network import SAM3DAdapter

    ct = Path(ct)
    seg = Path(seg) if seg is not None else ct.with_name("seg.nii.gz")
    if not ct.is_file():
        raise FileNotFoundError(f"CT '{ct}' does not exist (pass --ct).")
    prompts = _liver(seg)
    if isinstance(net, MedSA):
        parser["prompt_source"] = "input"
    if isinstance(net, SAM3DAdapter):
        parser["prompt_source"] = "user"
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    item = pre({"image": str(ct), "roi": prompts["roi"], "foreground": prompts["foreground"]})
    img = item["image"]
    img = (img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)).float()
    depth = img.shape[-1]
    zc = int(round(prompts["z"] * (depth - 1)))

    def window(z0: int, n: int) -> torch.Tensor:
        z0 = max(0, min(z0, depth - n))
        return img[None, ..., z0 : z0 + n]

    if isinstance(net, SAM3DAdapter):
        size = tuple(net.patch_size)
        centre = [int(i) for i in torch.nonzero(img[1])[0]] if net.prompted else [s // 2 for s in img.shape[1:]]
        crops = []
        for shift in (0, size[0] // 8):
            c = [centre[0] + shift, *centre[1:]]
            crops.append(SpatialPad(size)(SpatialCrop(roi_center=c, roi_size=size)(img)).as_tensor())
        return crops[0][None], torch.stack(crops)
    n = int(parser["num_slices"]) if isinstance(net, MedSA) or "num_slices" in parser.config else 1
    n = min(n, depth)
    a = window(zc - n // 2, n)
    b = torch.cat([window(zc - n // 2 - n, n), window(zc - n // 2 + n, n)])
    return a.contiguous(), b.contiguous()


def export_bundle(
    bundle: str | os.PathLike,
    configs: str | Sequence[str] = ("inference.json",),
    formats: str | Sequence[str] = ("ts", "pt2", "onnx"),
    out: str | os.PathLike | None = None,
    ct: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export, check on the CT, then write; returns the summary also written as ``export.json``."""
    from monai.bundle import ConfigParser

    from shared_nets.export import (
        FILE_NAMES,
        FORMATS,
        check_equivalence,
        export_inputs,
        export_onnx,
        export_part,
        export_program,
        export_torchscript,
        load_exported,
        summary_json,
    )
    from tools.init_model import _as_list

    fmts = _as_list(formats, "formats")
    bad = [f for f in fmts if f not in FORMATS]
    if not fmts or bad:
        raise ValueError(f"formats must be a subset of {list(FORMATS)}, got {fmts}.")
    root = Path(bundle)
    target = Path(out) if out is not None else root / "models"
    net, parser, info = load_bundle_network(root, configs, overrides, checkpoint)
    part, what = export_part(net)
    xa, xb = ct_inputs(net, parser, ct if ct is not None else DEFAULT_CT)
    ia, ib = export_inputs(net, xa), export_inputs(net, xb)
    fixed = "fixed batch" in what  # 3DSAM-adapter's core: batch specialised, checked at the example's batch
    summary: dict[str, Any] = {"bundle": str(root), "configs": _as_list(configs, "configs"), "part": what, **info}
    summary["inputs"] = {"A": [list(t.shape) for t in ia], "B": [list(t.shape) for t in ib]}
    sample = ia if fixed else ib  # torch.export needs batch >= 2 to keep the batch dynamic
    cases = (("A", ia),) if fixed else (("A", ia), ("B", ib))
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".export.") as tmp:  # same file system: os.replace
        staged: dict[str, Path] = {}
        program = None
        for fmt in fmts:
            path = Path(tmp) / FILE_NAMES[fmt]
            if fmt == "ts":
                extra = {
                    Path(c).stem: json.dumps(ConfigParser.load_config_file(str(root / "configs" / c))).encode()
                    for c in summary["configs"]
                }
                _, frozen = export_torchscript(part, ia, path, meta=parser.get("_meta_") or {}, extra_files=extra)
                summary["ts_frozen_trace_lines"] = frozen
            else:
                if program is None:
                    program = export_program(part, sample, None)
                if fmt == "pt2":
                    torch.export.save(program, str(path))
                else:
                    export_onnx(program, sample, path)
            run = load_exported(fmt, path)
            summary[fmt] = {
                tag: check_equivalence(part, run, inputs, atol, name=f"{fmt} {FILE_NAMES[fmt]} (input {tag})")
                for tag, inputs in cases
            }
            staged[fmt] = path
        for fmt, path in staged.items():
            os.replace(path, target / FILE_NAMES[fmt])
            summary.setdefault("files", []).append(str(target / FILE_NAMES[fmt]))
    summary_json(target / "export.json", summary)
    return summary


def main(
    bundle: str,
    configs: str | Sequence[str] = "inference.json",
    formats: str | Sequence[str] = "ts,pt2,onnx",
    out: str | None = None,
    ct: str | None = None,
    checkpoint: str | None = None,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """``python -m tools export``: export one bundle (see the module docstring); prints the summary."""
    return export_bundle(bundle, configs, formats, out=out, ct=ct, checkpoint=checkpoint, atol=atol)
