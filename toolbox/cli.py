"""How every command ends, and how it speaks while it runs.

`run_command` runs a command's body and turns how it ended into an exit code: 0 or the body's own
code; for an error the user can fix, one line on stderr that names the problem and the fix
(`error: ...`); Ctrl-C is exit 130 and SIGTERM 143, each with one line and the command's
unfinished files removed; a full disk, a quota or a read-only folder one line too. `--debug` (or
SE_DENSENET_DEBUG=1, which reaches every rank of a launched job) prints the chained traceback
behind the line first. Anything else is a bug and keeps its traceback.

`Console` says a line once per job: every process of a launched job holds one, and only the one
that speaks for the job (the main process) prints.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable

from tqdm import tqdm

from toolbox.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, UserError, debugging, first_line

DEBUG_HELP = "print the full traceback behind an error's line"
DISK_ERRORS = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("no space left on the device", "free space"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or raise the quota"),
    errno.EROFS: ("the file system is read-only", "make the folder writable"),
    errno.EACCES: ("permission denied", "make the folder writable"),
}

# A command's own reading of an error: (exit code, line), None when it has none. An empty line
# means the error was reported elsewhere (another rank said it).
Explain = Callable[[BaseException], "tuple[int, str] | None"]


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def run_command(
    body: Callable[[], int],
    debug: bool = False,
    *,
    again: str = "run the command again",
    kept: str = "no output was left half-written",
    explain: Explain | None = None,
    cleanup: Callable[[], None] | None = None,
    stop_on_sigterm: bool = True,
) -> int:
    """body's exit code, or the code and one line of how it failed.

    again: what to do after an interruption or a full disk; kept: what an interruption left as it
    was ("OUT was left as it was"). explain: the command's own errors, asked first. cleanup: runs
    however the body ended. stop_on_sigterm: SIGTERM ends the command as Ctrl-C does (the trainer
    passes False: its StopFlag answers SIGTERM with a checkpoint)."""
    for stream in (sys.stdout, sys.stderr):  # a C or Latin-1 locale: a class name in any script still prints
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    handles_sigterm = stop_on_sigterm and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handles_sigterm else None
    try:
        return body()
    except BaseException as e:
        ending = (explain(e) if explain else None) or standard_ending(e, again, kept)
        if ending is None:  # a bug: its traceback is the report
            raise
        code, line = ending
        if debugging(debug):  # the cause of a one-line error stays chained to it
            traceback.print_exception(e, file=sys.stderr)
        if line:
            print(f"error: {line}", file=sys.stderr, flush=True)
        return code
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous)
        if cleanup is not None:
            cleanup()


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's time limit): the command stops as on Ctrl-C, its unfinished
    files removed on the way out. A KeyboardInterrupt, so every cleanup that Ctrl-C runs runs."""


def _terminate(signum, frame):
    raise Terminated()


def _default_sigterm_in_child() -> None:
    """A process forked from a command (a pool's worker) ends on SIGTERM as any process does: with
    the command's handler it could sit in a lock it inherited and never run it."""
    if signal.getsignal(signal.SIGTERM) is _terminate:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


def standard_ending(e: BaseException, again: str, kept: str = "") -> tuple[int, str] | None:
    if isinstance(e, UserError):
        return e.exit_code, first_line(e)
    if is_disk_error(e):
        return EXIT_USAGE, disk_error_line(e, again)
    if isinstance(e, KeyboardInterrupt):
        code, what = (EXIT_TERMINATED, "terminated") if isinstance(e, Terminated) else (EXIT_INTERRUPTED, "interrupted")
        return code, f"{what} — {kept}; {again}" if kept else f"{what} — {again}"
    return None


def is_disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_ERRORS


def disk_error_line(e: OSError, then: str, where: str | None = None) -> str:
    """then: what happens next, e.g. 'start the same command: it resumes from ckpt-000000007'."""
    what, fix = DISK_ERRORS[e.errno]
    return f"cannot write {e.filename or where}: {what} — {fix}, then {then}"


class Console:
    """Lines for the user, said by the process that speaks for the job; the others stay quiet."""

    def __init__(self, speaks: bool = True):
        self.speaks = speaks

    def say(self, line: str) -> None:
        if self.speaks:
            tqdm.write(line, file=sys.stdout)  # above a progress bar, not through it
            sys.stdout.flush()  # a log file sees the line now


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar on the main process; none elsewhere, nor when stderr is not a terminal (log files:
    toolbox.progress's lines show the progress there)."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None if enabled else True)
