"""OUT's local folder for one make_shards run, settled before the scan: its parent can be written,
one writer at a time holds it, and the partial builds killed runs left beside it are swept.

The lock is an exclusive `flock` on `.OUT.lock` beside OUT, held for the whole run. The kernel drops
it when the process dies, so a killed run leaves no stale lock; where the file system has no locks
the run goes on with a note. The holder deletes the file as it lets go, so a finished run leaves
nothing beside OUT; whoever takes the lock checks that it holds the file still at that name.

A partial build is shards/writer.py's staging folder, `.OUT.partial-<pid>`; the host and pid that
build it are written into it (BUILDER, removed before it becomes OUT), so that only one whose
process is gone from this host is swept, never another machine's on a shared file system.

For OUT on object storage the local folder it is built in (`scratch`) is what is locked and swept:
a bucket has no locks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from toolbox import lock
from toolbox.errors import UserError

BUILDER = ".builder.json"  # in a partial build only
HOST = socket.gethostname()


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def scratch(location: str) -> Path:
    """The local folder a remote OUT is built in: the same for every run of this user to it, so
    that two runs find each other's lock and a killed run's partial build."""
    digest = hashlib.sha256(location.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"make_shards-{os.getuid()}-{digest}"


@contextmanager
def claim(out: Path) -> Iterator[list[str]]:
    """Holds OUT for the run; -> the notes to show (no locks here, partial builds swept or left)."""
    out = Path(out)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        _check_writable(out)
        fd, note = _lock(out)
        try:
            yield ([note] if note else []) + sweep(out, locked=note is None)
        finally:
            _release(fd, out, locked=note is None)
    finally:
        for folder in made:  # the folders made for OUT's lock, when the run left nothing in them
            with suppress(OSError):
                folder.rmdir()


def _check_writable(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"cannot write OUT {out}: its folder {out.parent} is not writable ({e.strerror or e}) — "
            "choose an OUT in a writable folder, or make that folder writable"
        ) from e


def _lock(out: Path) -> tuple[int, str | None]:
    """-> the lock file's descriptor, held, and None; or a note where the file system has no locks."""
    path = lock_path(out)
    for _ in range(100):  # another holder deleting the file as we open it: open it again
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            who = lock.flock(fd)
        except OSError as e:
            if e.errno not in lock.NO_LOCKS:
                os.close(fd)
                raise
            return fd, (
                f"note: the file system of {out.parent} does not support locks ({e.strerror}), so nothing "
                "stops a second make_shards from writing this OUT at the same time"
            )
        if who is not None:
            os.close(fd)
            raise UserError(
                f"OUT {out} is being written by another make_shards ({lock.describe(who)}) — wait for it to end, "
                "stop it, or choose another OUT"
            )
        if _still_named(fd, path):
            lock.hold(fd)
            return fd, None
        os.close(fd)
    raise UserError(f"cannot take the lock {path}: it keeps being replaced — stop the other make_shards on {out}")


def _still_named(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _release(fd: int, out: Path, locked: bool) -> None:
    lock.let_go(fd)
    if locked:  # deleted while still held: the next holder sees it gone and opens a new one
        with suppress(OSError):
            lock_path(out).unlink()
    os.close(fd)


def mark(stage: Path) -> None:
    """Names this host and process in a partial build, for a later run's sweep."""
    (stage / BUILDER).write_text(json.dumps(lock.holder()))


def unmark(stage: Path) -> None:
    """Before the partial build becomes OUT (or is uploaded)."""
    (stage / BUILDER).unlink(missing_ok=True)


def sweep(out: Path, locked: bool) -> list[str]:
    """Deletes the partial builds of OUT whose process is gone from this host; -> a note for each
    one deleted or left. One without a BUILDER (killed in its first instant) counts as this host's
    only while the lock is held: then no other make_shards anywhere is building OUT."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.partial-(\d+)")
    notes = []
    for entry in sorted(os.scandir(out.parent), key=lambda e: e.name):
        found = pattern.fullmatch(entry.name)
        if not found or int(found[1]) == os.getpid() or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(found[1])
        who = _read_marker(Path(entry.path))
        host = who.get("host", HOST if locked else None)
        if host == HOST and not lock.alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            notes.append(f"note: deleted {entry.path}, the partial build of an earlier run (pid {pid}, gone)")
        else:
            whose = lock.describe(who) if who.get("host") else f"pid {pid}" + (" on this host" if host else "")
            notes.append(f"note: left {entry.path} alone, a partial build by {whose} — delete it once that run is gone")
    return notes


def _read_marker(stage: Path) -> dict:
    try:
        return json.loads((stage / BUILDER).read_text())
    except (OSError, ValueError):
        return {}


def clear(folder: Path) -> None:
    """Everything in a scratch folder but its lock files (the run holds the lock)."""
    for entry in os.scandir(folder):
        if not entry.name.endswith(".lock"):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
