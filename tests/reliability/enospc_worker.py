"""Run ``python -m monai.bundle ...`` with a disk that fills up: ``os.fsync`` of a file whose path contains
PATTERN raises ``OSError(ENOSPC)`` after ALLOWED such calls succeeded (every atomic write flushes through it).

    python enospc_worker.py PATTERN ALLOWED run --config_file ... (the monai.bundle arguments)
"""

from __future__ import annotations

import errno
import os
import runpy
import sys

pattern, allowed = sys.argv[1], int(sys.argv[2])
_real_fsync = os.fsync
_count = [0]


def _fsync(fd: int) -> None:
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if pattern in name:
        _count[0] += 1
        if _count[0] > allowed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _real_fsync(fd)


os.fsync = _fsync
sys.argv = ["monai.bundle", *sys.argv[3:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
