"""The errors a user can meet, for every command: one base that carries its exit code and its one
line, and one for "the data cannot be read". They live in shards/, the layer launch/ and trainer/
both build on, so that neither has to import the other.

Every command prints `error: <first line>` and exits with the error's code; the cause stays chained
(`raise DataError(...) from e`), and `--debug` (or SE_DENSENET_DEBUG=1, which reaches every rank of a
launched job) prints the whole chain as a traceback instead.
"""

from __future__ import annotations

import os

EXIT_FAILURE = 1  # a failure, not a preemption: a job script must not requeue it
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on a signal; start the same command again to resume
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (128 + 15), outside training, where it means "checkpoint and stop"
DEBUG_ENV = "SE_DENSENET_DEBUG"


class UserError(Exception):
    """Something the user can fix; `str(e)` names the problem and the fix in one line."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class DataError(UserError):
    """The data cannot be read, reached, cached or trusted, wherever that is found: the store, the
    node cache, the manifest, the sample index, the shard reader or a loader worker."""


def first_line(e: BaseException) -> str:
    """The one line of an error. A loader worker re-raises ours with the worker's traceback in the
    message (`...\\nshards.errors.DataError: <line>`): that last line is ours."""
    lines = str(e).strip().splitlines()
    marker = f"{type(e).__name__}: "
    for line in reversed(lines):
        if marker in line:
            return line.split(marker, 1)[1]
    return lines[0] if lines else type(e).__name__


def debugging(argv_flag: bool = False) -> bool:
    """Whether to show tracebacks: `--debug`, or SE_DENSENET_DEBUG=1 for every process of a job."""
    return argv_flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")
