"""Random access to the samples of a split's WebDataset shards.

Training reads shards by sample index rather than as a stream: the epoch's order and every
augmentation can then be a pure function of (seed, epoch, position), a resumed run skips the
consumed samples without reading them, and validation can hand each rank exactly its samples.
Each shard is indexed lazily (one pass over its tar headers) in the process that reads it, so
loader workers never share file handles.
"""
from __future__ import annotations

import bisect
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path


class ShardError(RuntimeError):
    """A shard that is missing, corrupted or disagrees with the manifest (one-line message)."""


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


class ShardIndex:
    """Samples of several tar shards addressed by one global index 0..len-1, in shard order."""

    def __init__(self, paths: list[Path], counts: list[int]):
        if len(paths) != len(counts):
            raise ValueError("one sample count per shard is needed")
        self.paths = [Path(p) for p in paths]
        self.counts = list(counts)
        self.starts = [0]
        for n in counts:
            self.starts.append(self.starts[-1] + n)
        self._samples: dict[int, list[tuple[str, dict[str, Member]]]] = {}
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.starts[-1]

    def check_files(self) -> None:
        """Fail before training, not an epoch in, when a shard listed in the manifest is gone."""
        for path in self.paths:
            if not path.is_file():
                raise ShardError(f"shard {path} listed in the manifest is missing — re-run make_shards or restore the file")

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def read(self, index: int) -> dict[str, bytes | str]:
        """The sample's fields as bytes, plus `__key__` and `__shard__`."""
        shard, position = self.locate(index)
        key, members = self._shard_samples(shard)[position]
        fd = self._file(shard)
        sample: dict[str, bytes | str] = {"__key__": key, "__shard__": self.paths[shard].name}
        for ext, member in members.items():
            data = os.pread(fd, member.size, member.offset)
            if len(data) != member.size:
                raise ShardError(f"shard {self.paths[shard]} is truncated at sample {key} — re-run make_shards")
            sample[ext] = data
        return sample

    def labels(self) -> list[int]:
        """Every sample's class index (reads the tiny `cls` fields; used by the balanced sampler)."""
        return [int(self.read_field(i, "cls")) for i in range(len(self))]

    def read_field(self, index: int, ext: str) -> bytes:
        shard, position = self.locate(index)
        member = self._shard_samples(shard)[position][1][ext]
        return os.pread(self._file(shard), member.size, member.offset)

    def _shard_samples(self, shard: int) -> list[tuple[str, dict[str, Member]]]:
        if shard not in self._samples:
            self._samples[shard] = _index_tar(self.paths[shard], self.counts[shard])
        return self._samples[shard]

    def _file(self, shard: int) -> int:
        if os.getpid() != self._pid:  # forked into a loader worker: descriptors are not ours
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._files[shard]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state


def _index_tar(path: Path, expected: int) -> list[tuple[str, dict[str, Member]]]:
    samples: list[tuple[str, dict[str, Member]]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                prefix = info.name[: len(info.name) - len(name)]
                key = prefix + key
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = Member(info.offset_data, info.size)
    except FileNotFoundError:
        raise ShardError(f"shard {path} listed in the manifest is missing — re-run make_shards or restore the file") from None
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"shard {path} is corrupted ({e}) — re-run make_shards") from None
    if len(samples) != expected:
        raise ShardError(
            f"shard {path} holds {len(samples)} samples but the manifest says {expected} — "
            "it is truncated or was changed; re-run make_shards"
        )
    return samples
