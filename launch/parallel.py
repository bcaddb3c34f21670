"""One pool of worker processes for a whole run, mapping in task order with a bounded number
of tasks in flight.

Pool.imap would do, except that its feeder thread pulls the whole task iterator into the
queue at once; with a million files that is the memory this tool promises not to use.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
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


def _ignore_sigint() -> None:
    # Ctrl-C is the main process's to handle (one line, clean up, terminate the pool); in
    # the workers it would only print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Workers:
    """``with Workers(n) as w: for r in w.map(fn, tasks): ...``; n <= 1 runs in this process."""

    def __init__(self, n: int):
        self.n = n
        self._pool = None

    def __enter__(self) -> Workers:
        if self.n > 1:
            # fork: workers start at once with the modules already imported (spawn would
            # re-import them in every worker); elsewhere the platform's default.
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else None)
            self._pool = ctx.Pool(self.n, initializer=_ignore_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()  # on error or Ctrl-C too: no orphaned workers left reading files
            self._pool.join()

    def map(self, fn: Callable[[T], R], tasks: Iterable[T], ahead: int = 4) -> Iterator[R]:
        """``map(fn, tasks)``, results in order; ``fn`` must be a picklable top-level function."""
        if self._pool is None:
            yield from map(fn, tasks)
            return
        pending: deque = deque()
        for task in tasks:
            pending.append(self._pool.apply_async(fn, (task,)))
            if len(pending) >= self.n * ahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
