"""Deterministic tar shards, built in a staging folder that becomes OUT only once complete.

Tar headers are written by hand from fixed fields (no clock, no user, no host) so the same
samples give the same bytes on any machine; the sha256 and size are taken as the bytes go
out, so no shard is read back to be checksummed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from shards.index import records
from shards.manifest import ShardInfo

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: GNU tar and Python's tarfile pad archives to this
MTIME = 946684800  # 2000-01-01: fixed, and not 1970, which some tar tools flag as implausible


class ShardWriter:
    """One tar shard: ``add(key, {ext: bytes})`` per sample, then ``close()`` -> ShardInfo."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "xb")
        self._sha = hashlib.sha256()
        self._bytes = 0
        self.samples = 0
        self._entries: list[tuple[int, int, int]] = []  # the sample index: (offset, length, label)

    def add(self, key: str, fields: Mapping[str, bytes]) -> None:
        start = self._bytes
        for ext in sorted(fields):  # one member order, whatever order the caller built the dict in
            self._member(f"{key}.{ext}", fields[ext])
        self._entries.append((start, self._bytes - start, int(fields["cls"]) if "cls" in fields else -1))
        self.samples += 1

    @property
    def index(self):
        """This shard's records for the split's sample index (shards/index.py)."""
        return records(self._entries)

    def close(self) -> ShardInfo:
        self._write(bytes(2 * BLOCK))  # end-of-archive marker
        self._write(bytes(-self._bytes % RECORD))
        self._file.close()
        return ShardInfo(name=self.path.name, samples=self.samples, bytes=self._bytes, sha256=self._sha.hexdigest())

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._file.closed:
            self.abort()

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = MTIME
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._write(info.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict"))
        self._write(data)
        self._write(bytes(-len(data) % BLOCK))

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self._bytes += len(data)


@contextmanager
def staging(out: Path):
    """A fresh folder beside OUT to build the output in; removed again if anything fails.

    It sits in OUT's parent so that publishing is a rename on the same file system, and its
    name starts with '.' and ends in '.partial-<pid>' so that nobody mistakes it for output.
    """
    out = Path(out)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def publish(stage: Path, out: Path) -> None:
    """Make the complete ``stage`` folder OUT, replacing what OUT held only now.

    The old OUT is renamed aside first and deleted last, so at every moment either the old or
    the new output is complete under OUT's name (or, for a blink, nothing is there).
    """
    stage, out = Path(stage), Path(out)
    old = None
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
