"""The CPU thread rule: explicit count, then OMP_NUM_THREADS, then the cores the machine's load leaves free."""

from __future__ import annotations

import pytest
import torch

from shared_nets.threads import choose_num_threads, configure_threads


@pytest.mark.parametrize(
    "num_threads, environ, cores, load, expected",
    [
        (3, {"OMP_NUM_THREADS": "1"}, 2, 0.0, 3),  # explicit wins over the environment
        (None, {"OMP_NUM_THREADS": "2"}, 8, 7.9, 2),  # the environment wins over the load
        (0, {}, 2, 0.1, 2),  # idle 2-core machine: both cores
        (None, {}, 2, 1.2, 1),  # one core busy elsewhere
        (None, {}, 2, 5.0, 1),  # three jobs on two cores: never below one
        (None, {}, 16, 4.4, 12),
    ],
)
def test_choose_num_threads(num_threads, environ, cores, load, expected):
    count, reason = choose_num_threads(num_threads, environ=environ, cores=cores, load=load)
    assert count == expected
    assert reason


@pytest.mark.parametrize("bad", [{"OMP_NUM_THREADS": "zero"}, {"OMP_NUM_THREADS": "-2"}])
def test_bad_omp_num_threads_names_the_variable(bad):
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        choose_num_threads(None, environ=bad, cores=2, load=0.0)


def test_negative_num_threads_is_refused():
    with pytest.raises(ValueError, match="num_threads"):
        choose_num_threads(-1, environ={}, cores=2, load=0.0)


def test_configure_threads_sets_torch():
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
