"""Synthetic CT-like abdominal phantoms with BTCV label ids, written as a MONAI decathlon datalist.

The phantoms are the embedded demo and test data of every bundle (no download, no licence, the same
arrays for the same seed): a body outline (soft tissue inside a fat rim, air outside) holding liver,
spleen, both kidneys, stomach and optionally the aorta, each a randomly placed, sized, rotated and
deformed smooth blob with its own Hounsfield value, plus a small hypodense "tumour" inside the liver
or a kidney that is written as a separate binary label (the point-prompted tumour task of
3DSAM-adapter). ``python -m tools demo_data`` is the command line (``tools/demo_data.py``).

Layout written under ``out`` by :func:`write_demo_dataset`: ``imagesTr/phantom_XXX.nii.gz`` (int16 HU),
``labelsTr/phantom_XXX.nii.gz`` (uint8 BTCV ids), ``tumoursTr/phantom_XXX.nii.gz`` (uint8,
1 = tumour) and ``datalist.json`` with ``training`` / ``validation`` / ``test`` lists of relative
paths, readable by ``monai.data.load_decathlon_datalist(path, data_list_key=..., base_dir=out)``.

Geometry: the arrays are generated in RAS voxel order (first axis towards the patient's right,
second anterior, third superior, so the last axis is axial), the affine has the spacing on its
diagonal and a non-zero origin. ``orientation="LPS"`` stores the same anatomy with the first two
axes flipped and a matching affine, so ``Orientationd(axcodes="RAS")`` recovers the RAS arrays.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from shared_nets.io import atomic_path, atomic_write_text
from shared_nets.labels import BTCV_LABELS

__all__ = [
    "PHANTOM_LABELS",
    "make_phantom",
    "phantom_affine",
    "split_counts",
    "write_demo_dataset",
]

# The phantoms use the BTCV ids in PHANTOM_LABELS.
PHANTOM_LABELS: dict[int, str] = {i: BTCV_LABELS[i] for i in (0, 1, 2, 3, 6, 7, 8)}

_MIN_SHAPE = (32, 32, 8)
_ORIENTATIONS = ("RAS", "LPS")
_AIR_HU = -1000.0
_HU_RANGE = (-1024, 3071)

# Organ templates in normalised coordinates (each axis mapped to [-1, 1] across the volume;
# +x patient right, +y anterior, +z superior): centre, semi-axes, base HU range.
# Painted in this order, later organs win where blobs touch.
_ORGANS: tuple[tuple[int, tuple[float, float, float], tuple[float, float, float], tuple[float, float]], ...] = (
    (6, (0.40, 0.05, 0.25), (0.38, 0.40, 0.55), (55.0, 70.0)),  # liver
    (1, (-0.55, -0.20, 0.30), (0.16, 0.22, 0.35), (40.0, 48.0)),  # spleen
    (7, (-0.22, 0.32, 0.20), (0.22, 0.18, 0.35), (-30.0, -10.0)),  # stomach contents (wall added below)
    (2, (0.38, -0.42, -0.20), (0.15, 0.19, 0.42), (140.0, 165.0)),  # right kidney (contrast)
    (3, (-0.38, -0.42, -0.10), (0.15, 0.19, 0.42), (140.0, 165.0)),  # left kidney (contrast)
)
_TUMOUR_HOSTS = (6, 2, 3)
_TUMOUR_RADIUS_VOX = (3.0, 6.0)


def _triple(value: object, name: str, kind: type) -> tuple:
    """Parse ``value`` (``"96,96,48"``, ``"96x96x48"`` or a 3-sequence) into a 3-tuple of ``kind``."""
    if isinstance(value, str):
        parts = value.replace("x", ",").replace(" ", "").strip("()[]").split(",")
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        parts = []
    try:
        out = tuple(kind(p) for p in parts)
        if kind is int and any(float(p) != int(float(p)) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise ValueError(f"{name} must be three {kind.__name__}s like 96,96,48, got {value!r}.")
    return out


def _check_shape_spacing(shape: object, spacing: object) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = _triple(shape, "shape", int)
    spacing = _triple(spacing, "spacing", float)
    if any(s < m for s, m in zip(shape, _MIN_SHAPE)):
        raise ValueError(f"shape must be at least {_MIN_SHAPE} voxels, got {shape}.")
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must be three positive millimetre values, got {spacing}.")
    return shape, spacing


def phantom_affine(shape: Sequence[int], spacing: Sequence[float], orientation: str = "RAS") -> np.ndarray:
    """Voxel-to-world (RAS mm) affine of a phantom, for arrays stored in ``orientation`` order.

    Args:
        shape: array shape ``(H, W, D)`` as stored.
        spacing: voxel size in mm along the three axes.
        orientation: ``"RAS"`` (spacing on the diagonal) or ``"LPS"`` (first two axes flipped).

    Returns:
        ``[4, 4]`` float64 affine. The volume is centred at world ``(0, 0, -150)`` mm, so the
        origin (world position of voxel ``(0, 0, 0)``) is never zero.
    """
    orientation = str(orientation).upper()
    if orientation not in _ORIENTATIONS:
        raise ValueError(f"orientation must be one of {_ORIENTATIONS}, got {orientation!r}.")
    shape = np.asarray(shape, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = -(shape - 1) / 2 * spacing + np.array([0.0, 0.0, -150.0])
    if orientation == "RAS":
        return ras
    # LPS voxel (i, j, k) is RAS voxel (H-1-i, W-1-j, k).
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    return ras @ flip


def _smooth_field(
    rng: np.random.Generator, grids: Sequence[np.ndarray], n_waves: int = 3, max_freq: float = 2.0
) -> np.ndarray:
    """Sum of a few random plane waves over the (broadcastable) coordinate ``grids``, in [-1, 1]."""
    field = np.zeros(np.broadcast_shapes(*(g.shape for g in grids)), dtype=np.float32)
    for _ in range(n_waves):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) + 1e-8
        freq = rng.uniform(0.5, max_freq) * np.pi
        phase = rng.uniform(0, 2 * np.pi)
        arg = sum(np.float32(freq * d) * g for d, g in zip(direction, grids))
        field += np.sin(arg + np.float32(phase))
    return field / n_waves


def _rotation(rng: np.random.Generator, max_axial_deg: float, max_tilt_deg: float) -> np.ndarray:
    """Random rotation: up to ``max_axial_deg`` about the axial axis, small tilts about the others."""
    a, b, c = np.deg2rad(
        [
            rng.uniform(-max_axial_deg, max_axial_deg),
            rng.uniform(-max_tilt_deg, max_tilt_deg),
            rng.uniform(-max_tilt_deg, max_tilt_deg),
        ]
    )
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


def _blob(
    rng: np.random.Generator,
    grids: Sequence[np.ndarray],
    centre: Sequence[float],
    radii: Sequence[float],
    deform: float = 0.12,
) -> tuple[np.ndarray, np.ndarray]:
    """A rotated, smoothly deformed ellipsoid.

    Returns:
        ``(mask, rho)``: boolean mask and the normalised radial distance (``rho < 1`` inside),
        both of the broadcast grid shape ``[H, W, D]``.
    """
    rot = _rotation(rng, 25.0, 8.0).astype(np.float32)
    d = [g - np.float32(c) for g, c in zip(grids, centre)]
    rho2 = np.zeros(np.broadcast_shapes(*(g.shape for g in grids)), dtype=np.float32)
    for row, r in zip(rot, radii):
        local = row[0] * d[0] + row[1] * d[1] + row[2] * d[2]
        rho2 += (local / np.float32(r)) ** 2
    rho = np.sqrt(rho2)
    # Deform the surface with a low-frequency field in the organ's own scale.
    local_grids = [dd / np.float32(max(radii)) for dd in d]
    bound = 1.0 + np.float32(deform) * _smooth_field(rng, local_grids, n_waves=3, max_freq=1.5)
    return rho < bound, rho / bound


def make_phantom(
    shape: Sequence[int] = (96, 96, 48),
    spacing: Sequence[float] = (1.5, 1.5, 3.0),
    rng: np.random.Generator | int | None = None,
    *,
    aorta: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic abdominal CT phantom in RAS voxel order.

    Organs (BTCV ids, base HU): liver 6 (~+60), spleen 1 (~+45), right kidney 2 and left kidney 3
    (~+150, contrast), stomach 7 (contents ~-20 HU inside a ~+80 HU wall, sometimes a gas pocket)
    and optionally aorta 8 (~+200, a tube along the axial axis), in soft tissue (0..+15 HU) inside a
    fat rim (~-100 HU), air (-1000 HU) outside. A hypodense tumour of radius 3-6 voxels (smaller
    only when the host organ is too thin) lies inside the liver or one kidney; it keeps the host's
    id in the organ label. The clean image is slightly smoothed (partial-volume edges), then white
    Gaussian noise with sigma 10-15 HU is added.

    Args:
        shape: ``(H, W, D)``, at least ``(32, 32, 8)``; the last axis is axial (superior = high k).
        spacing: voxel size in mm; it sets the tumour's through-plane radius so it is round in mm.
        rng: a ``numpy.random.Generator`` (or a seed); the output is a pure function of its state.
        aorta: also draw the aorta (label 8).

    Returns:
        ``(image, label, tumour)``: ``image [H, W, D]`` int16 HU, ``label [H, W, D]`` uint8 BTCV ids,
        ``tumour [H, W, D]`` uint8 (1 = tumour, always inside a liver or kidney voxel).
    """
    shape, spacing = _check_shape_spacing(shape, spacing)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    # Normalised coordinates, broadcastable: x [H,1,1], y [1,W,1], z [1,1,D].
    grids = [
        np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([n if a == i else 1 for a in range(3)])
        for i, n in enumerate(shape)
    ]
    x, y, _ = grids
    full = tuple(shape)

    # Body outline: an elliptic cylinder along the axial axis with a fat rim.
    ax, ay = rng.uniform(0.84, 0.92), rng.uniform(0.66, 0.76)
    cx, cy = rng.uniform(-0.03, 0.03), rng.uniform(-0.05, 0.02)
    body_r = np.sqrt(((x - np.float32(cx)) / np.float32(ax)) ** 2 + ((y - np.float32(cy)) / np.float32(ay)) ** 2)
    rim = np.float32(rng.uniform(0.08, 0.12))
    body = np.broadcast_to(body_r < 1.0, full)
    inner = np.broadcast_to(body_r < 1.0 - rim, full)

    image = np.full(full, _AIR_HU, dtype=np.float32)
    image[body] = rng.uniform(-110.0, -90.0)
    tissue = np.float32(rng.uniform(0.0, 15.0)) + np.float32(6.0) * _smooth_field(rng, grids, n_waves=2, max_freq=1.0)
    image = np.where(inner, tissue, image)
    label = np.zeros(full, dtype=np.uint8)

    # Solid organs; positions jittered, sizes scaled, rotated and deformed per case.
    organ_hu: dict[int, float] = {}
    for organ_id, centre, radii, hu_range in _ORGANS:
        centre = np.asarray(centre) + rng.uniform(-0.05, 0.05, size=3)
        radii = np.asarray(radii) * rng.uniform(0.85, 1.15, size=3)
        mask, rho = _blob(rng, grids, centre, radii)
        mask &= inner
        hu = float(rng.uniform(*hu_range))
        organ_hu[organ_id] = hu
        label[mask] = organ_id
        if organ_id == 7:
            # Stomach: fluid contents inside a brighter wall, sometimes gas in the anterior part.
            wall = mask & (rho > 1.0 - 2.0 / (min(radii) * min(shape[:2]) / 2))
            contents = np.full(full, hu, dtype=np.float32)
            if rng.random() < 0.5:
                gas_level = centre[1] + radii[1] * rng.uniform(0.3, 0.6)
                contents = np.where(np.broadcast_to(y > np.float32(gas_level), full), np.float32(-850.0), contents)
            contents[wall] = rng.uniform(70.0, 90.0)
            image = np.where(mask, contents, image)
        else:
            # A gentle internal gradient keeps solid organs from being perfectly flat.
            image = np.where(mask, np.float32(hu) + np.float32(5.0) * (1.0 - rho), image)

    if aorta:
        # Aorta: a slightly wavy tube along the axial axis, left of midline, in front of the spine.
        acx = -0.08 + rng.uniform(-0.03, 0.03) + 0.03 * np.sin(np.pi * grids[2] + rng.uniform(0, np.pi))
        acy = -0.28 + rng.uniform(-0.03, 0.03)
        radius = max(0.07 * rng.uniform(0.85, 1.15), 2.5 / min(shape[:2]) * 2)
        tube = np.broadcast_to(((x - acx) ** 2 + (y - np.float32(acy)) ** 2) < np.float32(radius**2), full) & inner
        hu = float(rng.uniform(185.0, 215.0))
        organ_hu[8] = hu
        label[tube] = 8
        image[tube] = hu

    tumour = _add_tumour(rng, image, label, organ_hu, spacing)

    image = ndimage.gaussian_filter(image, sigma=0.6, mode="nearest")
    image += rng.normal(0.0, rng.uniform(10.0, 15.0), size=full).astype(np.float32)
    image = np.clip(np.rint(image), *_HU_RANGE).astype(np.int16)
    return image, label, tumour


def _add_tumour(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray,
    organ_hu: dict[int, float],
    spacing: tuple[float, float, float],
) -> np.ndarray:
    """Paint a hypodense spherical tumour (round in mm) into the liver or a kidney; return its mask."""
    r_vox = rng.uniform(*_TUMOUR_RADIUS_VOX)
    hosts = list(rng.permutation(_TUMOUR_HOSTS))
    unit = min(spacing[:2])  # radius in in-plane voxels, converted to mm
    best: tuple[float, int, np.ndarray, tuple[slice, ...]] | None = None
    for host in hosts:
        host_mask = label == host
        if not host_mask.any():
            continue
        # Depth of each host voxel (mm to the nearest non-host voxel), on the padded bounding box.
        (i0, i1), (j0, j1), (k0, k1) = [(int(a.min()), int(a.max()) + 1) for a in np.nonzero(host_mask)]
        box = (slice(i0, i1), slice(j0, j1), slice(k0, k1))
        depth = ndimage.distance_transform_edt(np.pad(host_mask[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
        if best is None or depth.max() > best[0]:
            best = (float(depth.max()), int(host), depth, box)
        if depth.max() >= r_vox * unit:
            best = (float(depth.max()), int(host), depth, box)
            break
    if best is None:  # cannot happen for valid shapes: the liver is always painted
        raise RuntimeError("no host organ for the tumour")
    max_depth, host, depth, box = best
    r_mm = min(r_vox * unit, max_depth)
    # Centre: a random voxel deep enough for the sphere to stay inside the host.
    candidates = np.argwhere(depth >= r_mm - 1e-6)
    centre = candidates[rng.integers(len(candidates))] + np.array([b.start for b in box])
    idx = np.ogrid[tuple(slice(0, n) for n in label.shape)]
    dist2 = sum(((g - c) * np.float32(s)) ** 2 for g, c, s in zip(idx, centre, spacing))
    tumour = (dist2 <= r_mm**2) & (label == host)
    image[tumour] = organ_hu[host] - rng.uniform(50.0, 80.0)
    return tumour.astype(np.uint8)


def split_counts(num: int) -> tuple[int, int, int]:
    """``(training, validation, test)`` case counts: about 2/3, 1/6, 1/6, at least one each.

    Args:
        num: number of cases, at least 3.

    Returns:
        Three counts summing to ``num``.
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 3:
        raise ValueError(f"num must be an integer >= 3 (one case each for training, validation and test), got {num!r}.")
    n_val = max(1, round(num / 6))
    n_test = max(1, round(num / 6))
    return int(num - n_val - n_test), int(n_val), int(n_test)


def _atomic_save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` as NIfTI to a temporary name next to ``path``, then rename it into place."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def write_demo_dataset(
    out: str | os.PathLike,
    num: int = 12,
    seed: int = 0,
    shape: Sequence[int] | str = (96, 96, 48),
    spacing: Sequence[float] | str = (1.5, 1.5, 3.0),
    orientation: str = "RAS",
    aorta: bool = True,
    progress: bool = True,
) -> Path:
    """Write ``num`` phantoms and their decathlon-format ``datalist.json`` under ``out``.

    Case ``i`` is drawn from ``numpy.random.SeedSequence(seed).spawn(...)[i]``, so its arrays depend
    only on ``(seed, i, shape, spacing, aorta)``: the same seed gives the same arrays, and a larger
    ``num`` adds cases without changing the first ones. Every file is written to a temporary name
    in its folder and renamed into place.

    Args:
        out: output folder (created if missing).
        num: number of cases (>= 3); split about 2/3 training, 1/6 validation, 1/6 test.
        seed: non-negative integer seed.
        shape: ``(H, W, D)`` per volume, e.g. ``(96, 96, 48)`` or ``"96,96,48"``.
        spacing: voxel size in mm, e.g. ``(1.5, 1.5, 3.0)``.
        orientation: ``"RAS"`` or ``"LPS"`` voxel order of the stored arrays (see ``phantom_affine``).
        aorta: also draw the aorta (label 8).
        progress: show a tqdm progress bar.

    Returns:
        Path of ``datalist.json``.
    """
    n_train, n_val, n_test = split_counts(num)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    shape, spacing = _check_shape_spacing(shape, spacing)
    orientation = str(orientation).upper()
    affine = phantom_affine(shape, spacing, orientation)  # also validates orientation
    out = Path(out)
    folders = {"image": "imagesTr", "label": "labelsTr", "tumour": "tumoursTr"}
    for folder in folders.values():
        (out / folder).mkdir(parents=True, exist_ok=True)

    entries = []
    children = np.random.SeedSequence(int(seed)).spawn(num)
    for i in tqdm(range(num), desc="phantoms", unit="case", disable=not progress, file=sys.stderr):
        arrays = make_phantom(shape, spacing, np.random.default_rng(children[i]), aorta=aorta)
        entry = {}
        for (key, folder), array in zip(folders.items(), arrays):
            if orientation == "LPS":
                array = np.ascontiguousarray(array[::-1, ::-1, :])
            rel = f"{folder}/phantom_{i:03d}.nii.gz"
            _atomic_save_nifti(array, affine, out / rel)
            entry[key] = rel
        entries.append(entry)

    labels = PHANTOM_LABELS if aorta else {k: v for k, v in PHANTOM_LABELS.items() if k != 8}
    datalist = {
        "name": "phantom",
        "description": (
            f"Synthetic CT-like abdominal phantoms (seed {seed}, shape {list(shape)}, spacing {list(spacing)} mm, "
            f"{orientation} voxel order) with BTCV organ ids; 'tumour' is a binary tumour label per case."
        ),
        "reference": "generated by python -m tools demo_data",
        "licence": "CC0 (synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in labels.items()},
        "tumour_labels": {"0": "background", "1": "tumour"},
        "numTraining": n_train + n_val,
        "numTest": n_test,
        "training": entries[:n_train],
        "validation": entries[n_train : n_train + n_val],
        "test": entries[n_train + n_val :],
    }
    path = out / "datalist.json"
    atomic_write_text(path, json.dumps(datalist, indent=2) + "\n")
    return path
