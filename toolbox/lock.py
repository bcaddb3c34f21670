"""An exclusive lock on a file for one process at a time (make_shards on OUT, a trainer on its run
dir): `flock`, which the kernel drops when its holder dies, so a killed process leaves no stale
lock. The holder writes who it is into the file (host, pid, Slurm job, since) for the one refused,
and a forked child's copy of the descriptor points at /dev/null, so a leftover worker process
never keeps the lock alive. On NFSv4 the client turns flock into a lease-backed byte-range lock;
Lustre needs `-o flock`; a file system without locks raises an OSError whose errno is in NO_LOCKS.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager

NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def flock(fd: int) -> dict | None:
    """Takes the lock without waiting: None when taken, else the holder's record. OSError (errno in
    NO_LOCKS) where the file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    return None


def hold(fd: int) -> None:
    """This process holds fd: it says so in the file, and forked children drop their copy."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder()).encode(), 0)
    not_inherited(fd)


def not_inherited(fd: int) -> None:
    """A child forked from now on gets /dev/null in fd's place, so only this process holds its lock."""
    _HELD.add(fd)


def let_go(fd: int) -> None:
    _HELD.discard(fd)


@contextmanager
def held(fd: int):
    """fd is not inherited while the block runs (a lock held for a moment)."""
    not_inherited(fd)
    try:
        yield fd
    finally:
        let_go(fd)


def alive(pid: int) -> bool:
    """Whether a process of this host with that pid exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder() -> dict:
    who = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if os.environ.get("SLURM_JOB_ID"):
        who["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return who


def describe(who: dict) -> str:
    job = f", Slurm job {who['slurm_job']}" if who.get("slurm_job") else ""
    return f"host {who.get('host', '?')}, pid {who.get('pid', '?')}{job}, since {who.get('since', '?')}"


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):  # being written at this moment
        return {}


# Descriptors whose lock is this process's alone. A loader worker forked while another thread (the
# cache's prefetcher) holds one would inherit it, and the lock would live as long as the worker:
# the child's copies point at /dev/null instead (not closed: the number stays taken, so no later
# close can hit a reused descriptor).
_HELD: set[int] = set()


def _drop_inherited_locks() -> None:
    if _HELD:
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in list(_HELD):
            os.dup2(null, fd)
        os.close(null)
        _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)
