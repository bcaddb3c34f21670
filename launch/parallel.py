"""Run a function over tasks on N processes, results in task order, a bounded number in flight.

Pool.imap would do, except that its feeder thread pulls the whole task iterator into the
queue at once; with a million files that is the memory this tool promises not to use.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what Slurm or taskset gave us, not the whole node
    except AttributeError:
        return os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], tasks: Iterable[T], workers: int, ahead: int = 4) -> Iterator[R]:
    """``map(fn, tasks)``, on ``workers`` processes when more than one; ``fn`` must be picklable."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    pool = ctx.Pool(workers)
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= workers * ahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
