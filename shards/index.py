"""The sample index written with the shards: where each sample's bytes sit in its shard.

One file per split, ``OUT/<split>/index.npy`` (`shards.format.INDEX_NAME`): a NumPy structured
array with one 16-byte record per sample in shard order (sample i of the split is record i): the
byte offset of the sample's first tar header in its shard, the length of its members (headers and
data), and its class.
Readers memory-map it, so every process of a node shares one copy in the page cache, start-up
reads no tar headers, and the class-balanced sampler needs no pass over the shards.

Shards written before the index existed are indexed by scanning their tar headers
(`scan_tar`), which gives the same records.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np

RECORD = np.dtype([("offset", "<u8"), ("length", "<u4"), ("label", "<i4")])
BLOCK = tarfile.BLOCKSIZE


def records(entries: list[tuple[int, int, int]]) -> np.ndarray:
    """(offset, length, label) per sample -> the index's record array."""
    return np.array(entries, dtype=RECORD) if entries else np.zeros(0, RECORD)


def write_index(path: Path, parts: list[np.ndarray]) -> tuple[int, str]:
    """The split's records (one array per shard, in shard order) -> ``path``; -> (bytes, sha256)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.concatenate(parts) if parts else records([]), allow_pickle=False)
    os.replace(tmp, path)
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def load_index(path: Path, counts: list[int]) -> np.ndarray:
    """Memory-mapped records, shared by every process that maps the file. ValueError if it does
    not hold one record per sample of the shards (``counts``), or if within a shard a record does
    not begin after the one before it ends (a repeated record reads one sample twice, another never)."""
    index = np.load(path, mmap_mode="r", allow_pickle=False)
    expected = sum(counts)
    if index.dtype != RECORD or index.shape != (expected,):
        raise ValueError(f"it holds {index.shape[0] if index.ndim else 0} records, the manifest says {expected}")
    offsets, lengths = index["offset"].astype(np.int64), index["length"].astype(np.int64)
    follows = offsets[1:] >= offsets[:-1] + lengths[:-1]
    firsts = np.cumsum(counts)[:-1] - 1  # the step from a shard's last record to the next shard's first
    follows[firsts[(firsts >= 0) & (firsts < len(follows))]] = True  # which starts a file of its own
    if not follows.all():
        bad = int(np.flatnonzero(~follows)[0]) + 1
        raise ValueError(f"record {bad} overlaps the one before it (repeated or out of order)")
    return index


def sample_member(path: str) -> tuple[str, str]:
    """A member's path in the tar -> (sample key, field): 'a/b/k_1.cls' -> ('a/b/k_1', 'cls'),
    split at the first '.' of the file name, as webdataset does."""
    base = path.rsplit("/", 1)[-1]
    stem, _, ext = base.partition(".")
    return path[: len(path) - len(base)] + stem, ext


def member_name(header: bytes) -> str:
    """A ustar header's member path (its name prefix field joined in front)."""
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    folder = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return f"{folder}/{name}" if folder else name


def parse_sample(data: bytes) -> tuple[str, dict[str, bytes]]:
    """A sample's tar members (headers and data, as the index delimits them) -> (key, {ext: bytes}).

    Reads the few ustar header fields it needs itself: tarfile's full parse (two checksums and
    every field) costs ~25 us a member, most of a warm-cache read. A damaged header still fails
    here (no ustar magic, an unreadable size, or members of another sample); damaged image bytes
    fail in the decoder, and shards fetched from a store were checked whole against their sha256.
    """
    key, fields, pos, end = None, {}, 0, len(data)
    while pos < end:
        header = data[pos : pos + BLOCK]
        if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0"):
            return _parse_with_tarfile(data)  # not a plain ustar file member: other writers' shards
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise tarfile.HeaderError("unreadable member size") from None
        stem, ext = sample_member(member_name(header))
        if key is not None and stem != key:
            raise tarfile.HeaderError(f"members of two samples ({key}, {stem}) in one index record")
        key = stem
        start = pos + BLOCK
        fields[ext] = data[start : start + size]
        if len(fields[ext]) != size:
            raise tarfile.HeaderError("member data cut short")
        pos = start + size + (-size % BLOCK)
    if key is None:
        raise tarfile.HeaderError("empty index record")
    return key, fields


def _parse_with_tarfile(data: bytes) -> tuple[str, dict[str, bytes]]:
    key, fields = None, {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            stem, ext = sample_member(info.name)
            if key is not None and stem != key:
                raise tarfile.HeaderError(f"members of two samples ({key}, {stem}) in one index record")
            key = stem
            fields[ext] = tar.extractfile(info).read()
    if key is None:
        raise tarfile.HeaderError("empty index record")
    return key, fields


def scan_tar(path: Path) -> np.ndarray:
    """The records of a shard written without an index: one pass over its tar headers."""
    entries: list[list[int]] = []
    keys: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = sample_member(info.name)
            end = info.offset_data + info.size + (-info.size % BLOCK)
            if not keys or keys[-1] != key:
                keys.append(key)
                entries.append([info.offset, 0, -1])
            entries[-1][1] = end - entries[-1][0]
            if ext == "cls":
                entries[-1][2] = int(tar.extractfile(info).read())
    return records([tuple(e) for e in entries])
