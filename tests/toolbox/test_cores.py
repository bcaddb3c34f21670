"""The torch threads a command chooses: --threads, then OMP_NUM_THREADS, then the cores it may use
less its loader workers."""

from __future__ import annotations

import os

import pytest

from toolbox.cores import torch_threads, usable_cores


@pytest.mark.parametrize(
    "asked, workers, processes, env, cores, expected",
    [
        (3, 2, 1, {"OMP_NUM_THREADS": "4"}, 8, (3, "--threads")),
        (None, 2, 1, {"OMP_NUM_THREADS": "4"}, 8, (4, "OMP_NUM_THREADS")),
        (None, 1, 1, {"OMP_NUM_THREADS": ""}, 2, (1, "2 usable cores, 1 loader worker")),
        (None, 0, 1, {}, 2, (2, "2 usable cores")),
        (None, 4, 1, {}, 2, (1, "2 usable cores, 4 loader workers")),  # at least 1
        (None, 2, 2, {}, 16, (6, "16 usable cores, 2 processes, 2 loader workers")),
    ],
)
def test_torch_threads(asked, workers, processes, env, cores, expected):
    assert torch_threads(asked, workers, processes, env, cores) == expected


def test_usable_cores_is_at_most_slurms_allocation():
    mine = len(os.sched_getaffinity(0))
    assert usable_cores({}) == mine
    assert usable_cores({"SLURM_CPUS_PER_TASK": "1", "SLURM_CPUS_ON_NODE": "64"}) == 1
    assert usable_cores({"SLURM_CPUS_ON_NODE": "1"}) == 1
    assert usable_cores({"SLURM_CPUS_PER_TASK": "999"}) == mine  # an allocation never adds cores
    assert usable_cores({"SLURM_CPUS_PER_TASK": "x"}) == mine
