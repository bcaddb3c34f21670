"""Random access to the samples of a split's WebDataset shards.

Training reads shards by sample index rather than as a stream: the epoch's order and every
augmentation can then be a pure function of (seed, epoch, position), a resumed run skips the
consumed samples without reading them, and validation can hand each rank exactly its samples.
Where a sample's bytes sit comes from the split's sample index (shards/index.py), memory-mapped
and shared by every process of a node; one read fetches all of a sample's members. Shards made
before the index existed are indexed by a scan of their tar headers, lazily, per process.
"""

from __future__ import annotations

import bisect
import tarfile

import numpy as np

from shards.index import parse_sample, scan_tar
from shards.source import SourceError, SplitFiles


class ShardError(RuntimeError):
    """A shard that is missing, corrupted or disagrees with the manifest (one-line message)."""


class ShardIndex:
    """Samples of a split's shards addressed by one global index 0..len-1, in shard order."""

    def __init__(self, files: SplitFiles):
        self.files = files
        self.counts = list(files.counts)
        self.starts = [0]
        for n in self.counts:
            self.starts.append(self.starts[-1] + n)
        self._scanned: dict[int, np.ndarray] = {}  # shards without an index file

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def has_index(self) -> bool:
        return self.files.index_entry is not None

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def read(self, index: int) -> dict[str, bytes | str]:
        """The sample's fields as bytes, plus `__key__` and `__shard__`."""
        shard, position = self.locate(index)
        offset, length, _ = self._record(shard, index, position)
        try:
            data = self.files.read(shard, int(offset), int(length))
        except SourceError as e:
            raise ShardError(str(e)) from None
        if len(data) != length:
            raise ShardError(f"shard {self.files.shown(shard)} is truncated at sample {position} — re-run make_shards")
        try:
            key, fields = parse_sample(data)
        except (tarfile.TarError, ValueError, UnicodeDecodeError) as e:
            raise ShardError(
                f"shard {self.files.shown(shard)} is corrupted at sample {position} ({e}) — re-run make_shards"
            ) from None
        return {"__key__": key, "__shard__": self.files.name(shard), **fields}

    def labels(self) -> np.ndarray:
        """Every sample's class index (for the balanced sampler): from the index, or read."""
        index = self._split_index()
        if index is not None:
            return np.array(index["label"], dtype=np.int32)
        return np.array([int(self.read(i)["cls"]) for i in range(len(self))], dtype=np.int32)

    def _split_index(self) -> np.ndarray | None:
        try:
            return self.files.index()
        except SourceError as e:
            raise ShardError(str(e)) from None

    def _record(self, shard: int, index: int, position: int):
        split_index = self._split_index()
        if split_index is not None:
            return split_index[index]
        if shard not in self._scanned:
            self._scanned[shard] = self._scan(shard)
        return self._scanned[shard][position]

    def _scan(self, shard: int) -> np.ndarray:
        shown = self.files.shown(shard)
        try:
            found = scan_tar(self.files.local_path(shard))
        except SourceError as e:
            raise ShardError(str(e)) from None
        except FileNotFoundError:
            raise ShardError(
                f"shard {shown} listed in the manifest is missing — re-run make_shards or restore the file"
            ) from None
        except (tarfile.TarError, OSError, ValueError) as e:
            raise ShardError(f"shard {shown} is corrupted ({e}) — re-run make_shards") from None
        if len(found) != self.counts[shard]:
            raise ShardError(
                f"shard {shown} holds {len(found)} samples but the manifest says {self.counts[shard]} — "
                "it is truncated or was changed; re-run make_shards"
            )
        return found
