"""How many CPU threads torch uses, chosen so a busy machine does not collapse.

torch's default is one OpenMP thread per core. When other processes already keep those cores busy, the
threads of one process wait on each other (OpenMP oversubscription): on 2 shared cores a tiny-SAM epoch took
15–20 s with the default against ~4 s with one thread. The rule here:

1. an explicit count (a bundle's ``num_threads`` key, a tool's ``--num_threads``) wins;
2. otherwise ``OMP_NUM_THREADS``, when set, is respected (torch already read it);
3. otherwise the cores this process may use, less the 1-minute load average of the machine, at least one.

The count used is logged once per call, so a slow run can be explained from its log.
"""

from __future__ import annotations

import logging
import math
import os

import torch

__all__ = ["available_cores", "choose_num_threads", "configure_threads"]

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_num_threads(
    num_threads: int | None = None,
    environ: dict[str, str] | None = None,
    cores: int | None = None,
    load: float | None = None,
) -> tuple[int, str]:
    """The thread count by the rule in this module's docstring, and why it was chosen.

    Args:
        num_threads: explicit count; ``None`` or ``0`` to choose automatically.
        environ: environment to read ``OMP_NUM_THREADS`` from (default ``os.environ``).
        cores: usable cores (default :func:`available_cores`).
        load: the 1-minute load average (default ``os.getloadavg()[0]``, 0 where unavailable).

    Returns:
        ``(count, reason)``.
    """
    if num_threads is not None and int(num_threads) < 0:
        raise ValueError(f"num_threads must be a positive integer or null (automatic), got {num_threads}.")
    if num_threads:
        return int(num_threads), "set explicitly"
    env = os.environ if environ is None else environ
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        try:
            value = int(omp)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {omp!r}.")
        return value, "from OMP_NUM_THREADS"
    cores = available_cores() if cores is None else int(cores)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    free = max(1, min(cores, math.floor(cores - load + 0.5)))
    return free, f"{cores} core(s), load average {load:.1f}"


def configure_threads(num_threads: int | None = None, log: bool = True) -> int:
    """Set torch's intra-op thread count by :func:`choose_num_threads` and log it.

    Args:
        num_threads: explicit count; ``None``/``0`` chooses automatically.
        log: log (and print, when no logging handler is configured) the count used.

    Returns:
        The thread count now in use.
    """
    count, reason = choose_num_threads(num_threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    if log:
        message = f"torch CPU threads: {count} ({reason}; set OMP_NUM_THREADS or num_threads to change)"
        if logging.getLogger().hasHandlers():
            logger.info(message)
        else:
            print(message, flush=True)
    return count
