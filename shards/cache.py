"""The node-local shard cache: every remote file is downloaded once per node, verified, and
evicted least recently used under a size limit.

All ranks and loader workers of a node share one folder; files are named by their sha256, so
two datasets never collide and a rebuilt dataset is never served stale. Coordination is by
``flock`` only, which the kernel drops when a process dies (no stale locks):

- ``<sha>.lock``: held while ``<sha>`` is downloaded, so one process downloads, the rest wait;
- ``.space.lock``: held while space is counted, reserved or handed over (the ``.part`` file is
  allocated at its full size at once and renamed under it, so the files in the folder never add
  up to more than the limit);
- a shared lock on a file a process maps for the whole run (the sample index): eviction only
  removes files it can lock exclusively. Shards are opened for each read and closed at once.

Least recently used means the oldest modification time: a download sets it, and `touch` moves
the files a reader is about to need to the back of the queue.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from toolbox import lock
from toolbox.errors import DataError

SUBDIR = "se-densenet-shards"
WAIT_FOR_SPACE_S = 1800.0  # a full cache of files in use this long is a stuck reader, not a busy one


@dataclass(frozen=True)
class Entry:
    """A file the cache can hold: its manifest size and sha256, and a name to show."""

    sha256: str
    size: int
    suffix: str  # .tar or .npy
    shown: str

    @property
    def name(self) -> str:
        return self.sha256 + self.suffix


def default_dir() -> Path:
    """$SLURM_TMPDIR (the job's node-local disk), else $TMPDIR, else the system's temp dir."""
    import tempfile

    base = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or tempfile.gettempdir()
    return Path(base) / SUBDIR


class ShardCache:
    def __init__(self, root: Path, limit: int | None):
        self.root = Path(root)
        self.limit = limit
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(
                f"cannot create data.cache_dir {self.root} ({e.strerror}) — choose a writable folder"
            ) from e

    def path(self, entry: Entry) -> Path:
        return self.root / entry.name

    def get(
        self,
        entry: Entry,
        download: Callable[[BinaryIO], tuple[int, str]],
        protect: Iterable[str] = (),
        wait: bool = True,
    ) -> Path | None:
        """The cached file, downloaded first if this node has none. ``download(out)`` writes the
        whole file and returns (bytes, sha256); a mismatch is fetched again once. Space is made by
        evicting files least recently used, never one in ``protect``; with ``wait=False`` (fetching
        ahead) None when there is no room now, rather than waiting for it with the file's lock
        held, which a reader that needs the file at once would have to wait for."""
        final = self.path(entry)
        if final.exists():
            return final
        with _flock(self.root / f"{entry.sha256}.lock", fcntl.LOCK_EX):
            if final.exists():  # another process of this node fetched it meanwhile
                return final
            got = None
            for _ in range(2):
                with self._reserve(entry, set(protect), wait) as reserved:
                    if reserved is None:
                        return None
                    part, out = reserved
                    got = download(out)
                    if got == (entry.size, entry.sha256):
                        os.fsync(out.fileno())
                        with _flock(self.root / ".space.lock", fcntl.LOCK_EX):  # counted as one file throughout
                            os.replace(part, final)
                        return final
            what = (
                f"{got[0]} bytes, the manifest says {entry.size}"
                if got[0] != entry.size
                else "its sha256 differs from the manifest's"
            )
            raise DataError(
                f"{entry.shown} was downloaded twice and is corrupted ({what}) — re-run make_shards to that location"
            )

    @contextmanager
    def _reserve(self, entry: Entry, protect: set[str], wait: bool):
        """A ``.part`` file of the entry's full size, made once the limit allows it (evicting
        unused files); removed again unless the caller renamed it. None if not ``wait`` and there
        is no room now."""
        part = self.root / f"{entry.name}.part-{os.getpid()}-{threading.get_ident()}"
        deadline = time.monotonic() + WAIT_FOR_SPACE_S
        while True:
            with _flock(self.root / ".space.lock", fcntl.LOCK_EX):
                if self._make_room(entry.size, protect | {entry.name}):
                    out = open(part, "w+b")
                    lock.not_inherited(out.fileno())
                    fcntl.flock(out, fcntl.LOCK_EX)  # a live download: not stale
                    _allocate(out, entry.size)
                    break
            if not wait:
                yield None
                return
            if time.monotonic() > deadline:
                raise DataError(
                    f"data.cache_limit {self.limit / 1e9:.2f} GB stayed full of shards in use for {WAIT_FOR_SPACE_S / 60:.0f} min — "
                    "raise data.cache_limit"
                )
            time.sleep(0.5)
        try:
            yield part, out
        finally:
            lock.let_go(out.fileno())
            out.close()
            part.unlink(missing_ok=True)

    def _make_room(self, size: int, protect: set[str]) -> bool:
        for path, _ in self._files():
            if ".part-" in path.name:
                _evict(path)  # a download whose process died (a live one holds its lock)
        if self.limit is None:
            return True
        files = self._files()
        used = sum(st.st_size for _, st in files)
        for path, st in sorted(files, key=lambda f: f[1].st_mtime_ns):
            if used + size <= self.limit:
                break
            if path.name.split(".part-")[0] in protect:
                continue
            if _evict(path):
                used -= st.st_size
        return used + size <= self.limit

    def _files(self) -> list[tuple[Path, os.stat_result]]:
        found = []
        for path in self.root.iterdir():
            if path.name.endswith(".lock"):
                continue
            try:
                found.append((path, path.stat()))
            except FileNotFoundError:  # renamed or evicted meanwhile
                pass
        return found

    def used(self) -> int:
        """Bytes the cache's files take (what the limit bounds), counted as reservations see them."""
        with _flock(self.root / ".space.lock", fcntl.LOCK_EX):
            return sum(st.st_size for _, st in self._files())

    def touch(self, entries: Iterable[Entry]) -> None:
        """Mark ``entries`` as used now: the last to be evicted."""
        for entry in entries:
            try:
                os.utime(self.path(entry))
            except FileNotFoundError:
                pass

    def read(self, entry: Entry, offset: int, length: int, fetch: Callable[[], Path]) -> bytes:
        """``length`` bytes at ``offset`` of the cached file; ``fetch()`` (re)downloads it when it
        is not (or no longer) here. No lock: a file evicted while it is read stays readable through
        the open descriptor, and its space is freed when that closes, microseconds later."""
        for _ in range(3):
            try:
                fd = os.open(self.path(entry), os.O_RDONLY)
            except FileNotFoundError:
                fetch()
                continue
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        raise DataError(f"{entry.shown} keeps being evicted from the cache before it is read — raise data.cache_limit")

    def hold(self, entry: Entry) -> int:
        """An open descriptor of the cached file with a shared lock: not evicted until closed
        (for an index, which is memory-mapped for the whole run)."""
        fd = os.open(self.path(entry), os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd


def _evict(path: Path) -> bool:
    """Remove ``path`` unless a process holds it (reading it, mapping it, or downloading it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        with lock.held(fd):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink(missing_ok=True)
            return True
    finally:
        os.close(fd)


def _allocate(f: BinaryIO, size: int) -> None:
    """Claim the disk space now, so a full disk fails here, not in the middle of a download."""
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = Path(f.name).parent
            raise DataError(
                f"no space left in the shard cache {folder} ({e.strerror}) — free space there, set "
                "data.cache_limit below the free space, or point data.cache_dir at a bigger disk"
            ) from e
        f.truncate(size)  # a file system without fallocate
    except AttributeError:  # not on this platform
        f.truncate(size)


@contextmanager
def _flock(path: Path, how: int):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with lock.held(fd):
            fcntl.flock(fd, how)
            yield
    finally:
        os.close(fd)
