"""Random access to the samples of a split's WebDataset shards (`SplitReader`).

Training reads shards by sample position rather than as a stream: the epoch's order and every
augmentation can then be a pure function of (seed, epoch, position), a resumed run skips the
consumed samples without reading them, and validation can hand each rank exactly its samples.
Where a sample's bytes sit comes from the split's sample index (shards/index.py), memory-mapped
and shared by every process of a node; one read fetches all of a sample's members. Shards made
before the sample index existed are scanned for their tar headers instead, lazily, per process.
"""

from __future__ import annotations

import bisect
import tarfile

import numpy as np

from shards.index import BLOCK, member_path, parse_sample, sample_member, scan_tar
from shards.source import SplitFiles
from toolbox.errors import DataError


class SplitReader:
    """Samples of a split's shards addressed by one number 0..len-1, in shard order."""

    def __init__(self, files: SplitFiles):
        self.files = files
        self.counts = list(files.counts)
        self.starts = [0]
        for n in self.counts:
            self.starts.append(self.starts[-1] + n)
        self._scanned: dict[int, np.ndarray] = {}  # shards without a sample index
        if files.cache is None:  # a local index is mapped, not read: its length is checked now, before any work
            files.index()

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def has_index(self) -> bool:
        """Whether the split has its sample index file (shards before it are scanned instead)."""
        return self.files.index_entry is not None

    def locate(self, i: int) -> tuple[int, int]:
        """Sample ``i`` of the split -> (its shard, its position in that shard)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = bisect.bisect_right(self.starts, i) - 1
        return shard, i - self.starts[shard]

    def read(self, i: int) -> dict[str, bytes | str]:
        """Sample ``i``'s fields as bytes, plus `__key__` and `__shard__`."""
        shard, position = self.locate(i)
        offset, length, _ = self._record(shard, i, position)
        data = self.files.read(shard, int(offset), int(length))
        if len(data) != length:
            raise DataError(f"shard {self.files.shown(shard)} is truncated at sample {position} — re-run make_shards")
        try:
            key, fields = parse_sample(data)
        except (tarfile.TarError, ValueError, UnicodeDecodeError) as e:
            raise DataError(
                f"shard {self.files.shown(shard)} is corrupted at sample {position} ({e}) — re-run make_shards"
            ) from e
        return {"__key__": key, "__shard__": self.files.name(shard), **fields}

    def key(self, i: int) -> str:
        """Sample ``i``'s key from its first tar header alone (512 bytes, not the image): finding a
        few samples by key in a large split reads a sliver of it."""
        shard, position = self.locate(i)
        offset, length, _ = self._record(shard, i, position)
        return self._key_at(shard, i, offset, length)

    def labels(self) -> np.ndarray:
        """Every sample's class index (for the balanced sampler): from the sample index, or read."""
        index = self.files.index()
        if index is not None:
            return np.array(index["label"], dtype=np.int32)
        return np.array([int(self.read(i)["cls"]) for i in range(len(self))], dtype=np.int32)

    def prefetcher(self):
        """What fetches the shards the coming samples need into the cache (None for local shards)."""
        return self.files.prefetcher()

    def keys(self) -> list[str]:
        """Every sample's key, in split order, from the first tar header of each (512 bytes a
        sample, not the image): what k-fold needs to find the manifest's duplicate groups."""
        keys = []
        for shard, (start, end) in enumerate(zip(self.starts, self.starts[1:])):
            index = self.files.index()
            if index is not None:  # whole columns at once: a record at a time costs microseconds in numpy
                records = zip(index["offset"][start:end].tolist(), index["length"][start:end].tolist())
            else:
                records = [self._record(shard, i, i - start)[:2] for i in range(start, end)]
            keys += [self._key_at(shard, i, offset, length) for i, (offset, length) in enumerate(records, start)]
        return keys

    def _key_at(self, shard: int, i: int, offset: int, length: int) -> str:
        path = member_path(self.files.read(shard, int(offset), min(BLOCK, int(length))))
        # a header of another writer (pax, GNU long names) is parsed in full, with its sample
        return sample_member(path)[0] if path is not None else str(self.read(i)["__key__"])

    def _record(self, shard: int, i: int, position: int):
        index = self.files.index()
        if index is not None:
            return index[i]
        if shard not in self._scanned:
            self._scanned[shard] = self._scan(shard)
        return self._scanned[shard][position]

    def _scan(self, shard: int) -> np.ndarray:
        shown = self.files.shown(shard)
        try:
            found = scan_tar(self.files.local_path(shard))
        except FileNotFoundError as e:
            raise DataError(
                f"shard {shown} listed in the manifest is missing — re-run make_shards or restore the file"
            ) from e
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DataError(f"shard {shown} is corrupted ({e}) — re-run make_shards") from e
        if len(found) != self.counts[shard]:
            raise DataError(
                f"shard {shown} holds {len(found)} samples but the manifest says {self.counts[shard]} — "
                "it is truncated or was changed; re-run make_shards"
            )
        return found
