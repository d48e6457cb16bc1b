"""Hostile volume files for the size-limit tests: written from headers and repeated gzip members, so that
a file claiming or holding many GB costs a few MB on disk and no memory to build."""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np


def _header_bytes(shape, dtype=np.int16) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header.set_data_offset(352)  # a single-file NIfTI: the voxels follow the 348-byte header + 4 extension bytes
    buf = io.BytesIO()
    header.write_to(buf)
    return buf.getvalue() + b"\x00" * (int(header.get_data_offset()) - len(buf.getvalue()))


def huge_header_nifti(path: Path, shape=(4096, 4096, 4096)) -> Path:
    """An uncompressed ``.nii`` whose header claims ``shape`` (int16) and which holds no voxels at all."""
    path.write_bytes(_header_bytes(shape))
    return path


def gzip_bomb(path: Path, header_shape=(64, 64, 64), zeros_gib: int = 8, member_mib: int = 64) -> Path:
    """A ``.nii.gz``: a header claiming ``header_shape`` (int16) and its voxels, then ``zeros_gib`` GiB of
    zeros as repeated gzip members (valid gzip: readers decompress members one after another)."""
    head = _header_bytes(header_shape)
    voxels = int(np.prod(header_shape)) * 2
    member = gzip.compress(b"\x00" * (member_mib << 20), compresslevel=9, mtime=0)
    with open(path, "wb") as f:
        f.write(gzip.compress(head + b"\x00" * voxels, mtime=0))
        f.writelines(member for _ in range((zeros_gib << 10) // member_mib))
    return path


def honest_gzip_bomb(path: Path, shape=(2048, 2048, 2048), member_mib: int = 64) -> Path:
    """A ``.nii.gz`` whose header tells the truth: ``shape`` int16 voxels of zeros (16 GiB for 2048^3)."""
    head = _header_bytes(shape)
    total = int(np.prod(shape)) * 2
    member = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = member.compress(b"\x00" * (member_mib << 20)) + member.flush()
    with open(path, "wb") as f:
        f.write(gzip.compress(head, mtime=0))
        f.writelines(member for _ in range(total // (member_mib << 20)))
    return path
