"""Run a command and measure its own peak resident memory.

``os.wait4`` on a direct child of a large process (a pytest session that has already built many
networks) does not give the child's own peak: Linux starts a forked or vforked child with its
parent's memory accounting, and ``exec`` records the old address space's high-water mark in the
child's ``ru_maxrss``. A child started from a 5 GiB pytest process therefore reports at least
5 GiB, whatever it uses itself. So the command is started by a small launcher process, and the
launcher reads the command's ``ru_maxrss`` with ``os.wait4``: forked from a ~10 MiB interpreter,
that figure is the command's own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run_with_peak_rss"]

# argv: result file, then the command; writes "<exit code> <ru_maxrss KiB>" (exit code < 0: killed by signal)
_LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[1], 'w').write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}')\n"
)


def run_with_peak_rss(
    cmd: list[str], log: Path, env: dict[str, str], timeout: float, cwd: str | os.PathLike
) -> tuple[int, int, float]:
    """Run ``cmd`` (stdout and stderr to ``log``) and return ``(exit status, peak RSS in bytes, wall seconds)``.

    Raises:
        TimeoutError: the command ran longer than ``timeout`` seconds (it is killed with its launcher).
    """
    start = time.monotonic()
    fd, result = tempfile.mkstemp(prefix="peak_rss_", suffix=".txt")
    os.close(fd)
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, result, *cmd],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(cwd), start_new_session=True,
            )  # fmt: skip
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"{cmd[:4]} ... did not finish within {timeout} s; log: {log}") from None
        wall = time.monotonic() - start
        text = Path(result).read_text().split()
        if len(text) != 2:
            raise RuntimeError(f"the measuring launcher exited {proc.returncode} without a result; log: {log}")
        return int(text[0]), int(text[1]) * 1024, wall  # Linux reports KiB
    finally:
        os.unlink(result)
