"""How many cores a process may use, and how many torch threads it should run with.

torch's default (one intra-op thread per core of the machine) is right only when the process has
the machine to itself: OpenMP threads spin-wait at every barrier, so a thread that shares its core
with a loader worker or another job stalls all the others. Measured on the shared 2-core VM: the
demo model's forward ran 13-16x slower with 2 threads than with 1, its training step 8x
(BENCHMARKS.md, "torch threads on a busy CPU"). No torch here: a launcher can use it before any
process imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

THREADS_ENV = "OMP_NUM_THREADS"  # the user's or the launcher's (accelerate launch, slurm/train.sh) choice
SLURM_ALLOCATION = ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE")  # the first one set is this task's share


def usable_cores(env: Mapping[str, str] = os.environ) -> int:
    """The cores this process may run on (taskset, cgroups' cpusets), at most Slurm's allocation for
    the task: without Slurm's affinity plugin a job sees the whole node but was given fewer cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    for name in SLURM_ALLOCATION:
        if (value := env.get(name, "").strip()).isdigit() and int(value) > 0:
            return min(cores, int(value))
    return cores


def torch_threads(
    asked: int | None = None,
    workers: int = 0,
    processes: int = 1,
    env: Mapping[str, str] = os.environ,
    cores: int | None = None,
) -> tuple[int, str]:
    """(threads, where the number came from) for a process that starts `workers` loader processes
    and shares the cores with `processes - 1` others like it. asked (a --threads flag) wins, then
    OMP_NUM_THREADS, then the process's share of the usable cores less its workers (they decode on
    cores of their own), at least 1."""
    if asked is not None:
        return asked, "--threads"
    if (value := env.get(THREADS_ENV, "").strip()).isdigit() and int(value) > 0:
        return int(value), THREADS_ENV
    cores = usable_cores(env) if cores is None else cores
    share = cores // max(processes, 1)
    threads = max(1, share - workers)
    parts = [f"{cores} usable core{'s' if cores != 1 else ''}"]
    if processes > 1:
        parts.append(f"{processes} processes")
    if workers:
        parts.append(f"{workers} loader worker{'s' if workers > 1 else ''}")
    return threads, ", ".join(parts)
