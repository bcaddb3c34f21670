"""The run directory's owner: one trainer per run dir, a truthful status.json, one-line disk errors.

The main process holds an exclusive `flock` on `run.dir/.lock` for the whole run. The kernel
drops it when the process dies, so a killed or requeued trainer leaves no stale lock; on NFSv4
the client turns flock into a lease-backed byte-range lock, and on Lustre it works when mounted
with `-o flock`. Where the file system has no locks at all the run goes on unprotected, with a
note saying so.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

LOCK = ".lock"
STATUS = "status.json"
STATUS_BYTES = 4096  # status.json is padded to one block, so that rewriting it in place needs no new one
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
DISK_ERRORS = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("no space left on the device", "free space"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or raise the quota"),
    errno.EROFS: ("the file system is read-only", "make run.dir writable"),
    errno.EACCES: ("permission denied", "make run.dir writable"),
}


class RunDirBusy(RuntimeError):
    """Another trainer holds the run directory (one-line message)."""


class RunDirError(RuntimeError):
    """The run directory cannot be created or locked (one-line message)."""


class PeerFailed(RuntimeError):
    """Another rank failed and says why itself: this one leaves quietly, with the same exit code."""

    def __init__(self, code: int = 1):
        super().__init__("another process of the job failed")
        self.code = code


def is_disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_ERRORS


def disk_error_line(e: OSError, run_dir: Path | None, then: str) -> str:
    """then: what the same command does next, e.g. 'it resumes from ckpt-000000007'."""
    what, fix = DISK_ERRORS[e.errno]
    return f"cannot write {e.filename or run_dir}: {what} — {fix}, then start the same command: {then}"


@contextmanager
def writing(path: Path):
    """Names the file in an OSError raised by a write to an open file (which carries no name)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def holder() -> dict:
    who = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if os.environ.get("SLURM_JOB_ID"):
        who["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return who


def describe(who: dict) -> str:
    job = f", Slurm job {who['slurm_job']}" if who.get("slurm_job") else ""
    return f"host {who.get('host', '?')}, pid {who.get('pid', '?')}{job}, since {who.get('since', '?')}"


class RunDir:
    """Held by the main process only; on other ranks `owned` stays False and status writes are no-ops."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.owned = False

    def lock(self) -> str | None:
        """Takes the lock before anything is written; returns a note when the file system has no locks."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(
                f"cannot write to run.dir {self.path} ({e.strerror}) — choose a writable run.dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(
                f"run.dir {self.path} is in use by another trainer ({describe(who)}) — wait for it to end, "
                "stop it, or choose another run.dir"
            ) from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
            note = (
                f"note: the file system of {self.path} does not support locks ({e.strerror}), so nothing stops "
                "a second trainer from using this run.dir at the same time"
            )
        else:
            note = None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder()).encode(), 0)
        self.fd, self.owned = fd, True
        _HELD.add(fd)
        return note

    def set_status(self, state: str, reason: str | None = None) -> None:
        """completed | preempted | failed (with the one-line reason) | running. Best effort when the
        disk is full: the padded file is then rewritten in place, which needs no new block."""
        if not self.owned:
            return
        status = {"state": state, "time": time.time(), **({"reason": reason[:1000]} if reason else {})}
        if state == "running":
            status.update(host=socket.gethostname(), pid=os.getpid())
        data = (json.dumps(status, ensure_ascii=False) + "\n").encode().ljust(STATUS_BYTES)
        path = self.path / STATUS
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            path.with_suffix(".tmp").unlink(missing_ok=True)
            try:
                with open(path, "r+b") as f:
                    f.write(data)
            except OSError:
                pass  # nothing more can be done: the one-line error still reaches the log


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):  # being written at this moment
        return {}


_HELD: set[int] = set()


def _drop_inherited_lock() -> None:
    """A forked loader worker would keep the lock alive past the trainer: its copy points at /dev/null."""
    if _HELD:
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in _HELD:
            os.dup2(null, fd)
        os.close(null)
        _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_lock)
