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

from shards.index import BLOCK, member_name, parse_sample, sample_member, scan_tar
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
        offset, _, _ = self._record(shard, i, position)
        header = self.files.read(shard, int(offset), BLOCK)
        if len(header) != BLOCK or header[257:262] != b"ustar":
            return str(self.read(i)["__key__"])  # another writer's tar: parsed whole
        return sample_member(member_name(header))[0]

    def labels(self) -> np.ndarray:
        """Every sample's class index (for the balanced sampler): from the sample index, or read."""
        index = self.files.index()
        if index is not None:
            return np.array(index["label"], dtype=np.int32)
        return np.array([int(self.read(i)["cls"]) for i in range(len(self))], dtype=np.int32)

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
