"""Atomic file writes: a temporary file in the target folder, then ``os.replace``.

A killed or failing writer never leaves a truncated file under the real name, and the
temporary file is removed on failure; a full disk raises :class:`DiskFullError`, one line naming the file.
Everything a bundle writes goes through here:
checkpoints (:func:`atomic_torch_save`), predictions (:class:`AtomicNibabelWriter`),
metric reports (:class:`AtomicMetricsSaver`), datalists and JSON/text files.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = [
    "DiskFullError",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "AtomicNibabelWriter",
    "AtomicMetricsSaver",
]


def _suffix(path: str) -> str:
    """File-type suffix to keep on the temporary name (writers pick the format from it): ``.nii.gz``, ``.pt``..."""
    name = os.path.basename(path)
    for multi in (".nii.gz", ".tar.gz"):
        if name.endswith(multi):
            return multi
    return os.path.splitext(name)[1]


_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write that found no space left on the device (or the quota spent); the message is one line naming the
    file and saying that the previous version was kept. A process that dies of it prints that line alone."""


def _disk_full(e: OSError, path: str) -> DiskFullError:
    return DiskFullError(
        e.errno,
        f"no space left on device writing '{path}' ({os.strerror(e.errno)}); the "
        "previous file was kept and no temporary file is left. Free space, then run again.",
    )


def _disk_full_line(value: BaseException) -> str | None:
    """The message of a :class:`DiskFullError` behind ``value``: in its chain of causes, or in its text (MONAI's
    ``SaveImage`` turns a writer's error into the text of a new ``RuntimeError``, without the chain)."""
    import re

    seen, e = set(), value
    while e is not None and id(e) not in seen:
        if isinstance(e, DiskFullError):
            return e.strerror
        found = re.search(r"DiskFullError: \[Errno \d+\] ([^\n]*)", str(e))
        if found:
            return found.group(1)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _excepthook(kind, value, tb, _previous=sys.excepthook) -> None:
    """Print a :class:`DiskFullError` (also when MONAI wrapped it) as its one line, not a traceback."""
    line = _disk_full_line(value)
    if line is None:
        _previous(kind, value, tb)
    else:
        print(f"error: {line}", file=sys.stderr)


sys.excepthook = _excepthook


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on normal exit it replaces ``path`` atomically.

    The caller writes the whole file to the yielded path (any writer, any format: the temporary
    name keeps ``path``'s suffix). On an exception the temporary file is removed and ``path`` is
    left as it was. The file gets the permissions a plain ``open()`` would give (umask honoured).

    Args:
        path: final file name (parent folders are created).
        fsync: flush the file to disk before the rename, so a power loss cannot leave an empty file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp" + _suffix(path))
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, stat.S_IMODE(0o666 & ~umask))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _FULL and not isinstance(e, DiskFullError):
            raise _disk_full(e, path) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` atomically (parent folders are created); returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return os.fspath(path)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> str:
    """Write ``obj`` as indented JSON (trailing newline) to ``path`` atomically; returns the path."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save(obj, path)`` through a temporary file; returns the path."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return os.fspath(path)


# The MONAI-based writers below are built on first use (PEP 562), so that light tools (demo data,
# dataset recipes) can use the helpers above without importing torch and MONAI.
@functools.cache
def _monai_classes() -> dict[str, type]:
    from monai.data import NibabelWriter
    from monai.handlers import MetricsSaver

    class AtomicNibabelWriter(NibabelWriter):
        """MONAI's ``NibabelWriter`` writing through a temporary file, for ``SaveImaged(writer=...)``.

        ``SaveImaged`` writes straight to the output name; a job killed mid-write would leave a
        truncated ``*_seg.nii.gz`` that looks like a finished prediction.

        The written array has the spatial axes of the data it is given, no more and no fewer:
        ``squeeze_end_dims`` drops a single channel only. MONAI's writer squeezes every trailing
        singleton axis after moving the channel last, so a ``(1, H, W, 1)`` prediction of a 1-slice
        volume would be written as ``(H, W)``, not in the input's ``(H, W, 1)`` shape; and it pads
        to 3 spatial axes (``spatial_ndim=3``), which here is off unless asked for.
        """

        def set_data_array(self, data_array, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs):
            from monai.utils import ensure_tuple

            kwargs.setdefault("spatial_ndim", None)
            super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=False, **kwargs)
            # channel-last now: the channel axes (or the one axis added when there is none) are the last ones
            n_chn_axes = 1 if channel_dim is None else len(ensure_tuple(channel_dim))
            if channel_dim is None or squeeze_end_dims:
                while n_chn_axes and self.data_obj.ndim > 1 and self.data_obj.shape[-1] == 1:
                    self.data_obj = self.data_obj[..., 0]
                    n_chn_axes -= 1

        def write(self, filename, verbose: bool = False, **obj_kwargs):
            with atomic_path(filename) as tmp:
                super().write(tmp, verbose=verbose, **obj_kwargs)

    class AtomicMetricsSaver(MetricsSaver):
        """MONAI's ``MetricsSaver`` that writes its CSV reports to a temporary folder and then moves each
        file into ``save_dir`` with an atomic rename (a killed evaluation never leaves a half-written CSV)."""

        def __call__(self, engine) -> None:
            final_dir = os.path.abspath(self.save_dir)
            os.makedirs(final_dir, exist_ok=True)
            tmp_dir = tempfile.mkdtemp(dir=final_dir, prefix=".metrics.")
            self.save_dir = tmp_dir
            try:
                super().__call__(engine)
                for name in sorted(os.listdir(tmp_dir)):
                    os.replace(os.path.join(tmp_dir, name), os.path.join(final_dir, name))
            except OSError as e:
                if e.errno in _FULL and not isinstance(e, DiskFullError):
                    raise _disk_full(e, os.path.join(final_dir, "*.csv")) from e
                raise
            finally:
                self.save_dir = final_dir
                shutil.rmtree(tmp_dir, ignore_errors=True)

        def write_reports(self, metrics: dict, metric_details: dict, images: list[str] | None) -> None:
            """Write the reports this saver writes at the end of a run, from values gathered elsewhere (a
            sharded evaluation's merged records): same selection (``metrics``/``metric_details`` names),
            same files and format, each moved into ``save_dir`` atomically."""
            from monai.handlers.utils import write_metrics_reports

            def chosen(values: dict, names) -> dict:
                if names is None:
                    return {}
                return {k: v for k, v in values.items() if k in names or "*" in names}

            final_dir = os.path.abspath(self.save_dir)
            os.makedirs(final_dir, exist_ok=True)
            tmp_dir = tempfile.mkdtemp(dir=final_dir, prefix=".metrics.")
            try:
                write_metrics_reports(
                    save_dir=tmp_dir,
                    images=images or None,
                    metrics=chosen(metrics, self.metrics),
                    metric_details=chosen(metric_details, self.metric_details),
                    summary_ops=self.summary_ops,
                    deli=self.deli,
                    output_type=self.output_type,
                )
                for name in sorted(os.listdir(tmp_dir)):
                    os.replace(os.path.join(tmp_dir, name), os.path.join(final_dir, name))
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)

    classes = {"AtomicNibabelWriter": AtomicNibabelWriter, "AtomicMetricsSaver": AtomicMetricsSaver}
    for name, cls in classes.items():  # importable and picklable as shared_nets.io.<name>
        cls.__qualname__ = name
    return classes


def __getattr__(name: str):
    if name in ("AtomicNibabelWriter", "AtomicMetricsSaver"):
        return _monai_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
