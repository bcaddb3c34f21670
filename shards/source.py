"""A make_shards output at a path or URL (`ShardSource`: its location, manifest and node cache),
and each split's shards as bytes at offsets (`SplitFiles`).

Shards in a local folder are read in place. Remote ones (and local ones when a cache folder is
given, for slow NFS homes) are fetched whole into the node-local `ShardCache`; a background
thread fetches the shards the reader will need next. Readers above this layer see only
`SplitFiles.read(shard, offset, length)` and never learn where the bytes came from.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import multiprocessing
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.cache import SUBDIR, Entry, ShardCache, default_dir
from shards.format import INDEX_NAME, MANIFEST
from shards.index import load_index
from shards.manifest import MAX_BYTES, Manifest
from shards.store import Store
from toolbox.errors import DataError
from toolbox.sizes import human

MIN_LIMIT_SHARDS = 4  # a cache_limit below this many of the largest shard cannot overlap fetching and reading


@dataclass(frozen=True)
class CacheOptions:
    """What the user said about caching: a folder (None: the default, for remote data only), a
    size limit in bytes (None: no limit), retries for transient errors, and whether pipe: may run."""

    dir: str | None = None
    limit: int | None = None
    retries: int = 5
    allow_pipe: bool = False


class ShardSource:
    """make_shards output at a local path or URL: its manifest, checked before any work, and the
    node cache its shards go through (None: read in place). Not a torch Dataset: a split's samples
    are read through `split(name)` and `shards.reader.SplitReader`.

    ``reads``: the splits this process will read (None: all), so that the cache is sized for
    them: training never fetches or makes room for a test split."""

    def __init__(
        self, location: str | os.PathLike, options: CacheOptions = CacheOptions(), reads: Sequence[str] | None = None
    ):
        self.store = Store(str(location), options.retries, options.allow_pipe)
        if self.store.local is not None:
            self.manifest = Manifest.load(self.store.local)
        else:
            raw = self.store.check(MANIFEST, limit=MAX_BYTES)  # parse refuses one that is longer
            self.manifest = Manifest.parse(raw, self.store.show(MANIFEST))
        self.reads = [info for name, info in self.manifest.splits.items() if reads is None or name in reads]
        self.cache = None
        if self.store.local is None or options.dir is not None:
            root = Path(options.dir) / SUBDIR if options.dir else default_dir()
            self.cache = ShardCache(root, options.limit)
            self._check_limit(options.limit)

    @property
    def shown(self) -> str:
        return self.store.shown

    def read_extra(self, rel: str) -> bytes | None:
        """A file make_shards writes beside the manifest (its plots, summary.txt), or None when it
        cannot be read: they are extras, so no retries, and older or hand-made datasets lack them."""
        try:
            return self.store.read_bytes(rel, retries=0)
        except DataError:
            return None

    @functools.cached_property
    def _files_bytes(self) -> int:
        """Bytes of every shard and index of the splits read: what a cache holding all of them needs."""
        return sum(s.bytes for info in self.reads for s in info.shards + ([info.index] if info.index else []))

    def _check_limit(self, limit: int | None) -> None:
        """Fail now, not hours in, when the cache cannot work: a limit too small to overlap
        fetching with reading, or a disk without room for what the cache will hold."""
        largest = max((s.bytes for info in self.reads for s in info.shards), default=0)
        if limit is not None and limit < MIN_LIMIT_SHARDS * largest:
            raise DataError(
                f"data.cache_limit {limit / 1e6:.0f} MB is below {MIN_LIMIT_SHARDS}x the largest shard ({largest / 1e6:.1f} MB) — "
                f"raise it to at least {MIN_LIMIT_SHARDS * largest / 1e6:.0f} MB"
            )
        need = self._files_bytes if limit is None else min(limit, self._files_bytes)
        room = shutil.disk_usage(self.cache.root).free + self.cache.used()
        if room < need:
            what = "the dataset needs" if limit is None or limit >= self._files_bytes else "data.cache_limit asks for"
            raise DataError(
                f"the shard cache {self.cache.root} has room for {human(room)} but {what} {human(need)} — "
                f"set data.cache_limit={human(room * 0.9).replace(' ', '')}, or point data.cache_dir at a bigger disk"
            )

    @property
    def block_budget(self) -> int | None:
        """Bytes of shards a reader may use at once, or None when every file fits in the cache
        (then samples can be read in any order without a file being fetched twice)."""
        if self.cache is None or self.cache.limit is None or self.cache.limit >= self._files_bytes:
            return None
        indexes = sum(info.index.bytes for info in self.reads if info.index)
        return (self.cache.limit - indexes) // 2  # the block being read and the next one, fetched meanwhile

    def describe_cache(self) -> str:
        """The cache folder and how it is used, for the start of a run's log."""
        if self.cache.limit is None:
            return f"{self.cache.root} (no limit)"
        budget = self.block_budget
        if budget is None:
            return f"{self.cache.root} (limit {human(self.cache.limit)}: holds every shard)"
        return f"{self.cache.root} (limit {human(self.cache.limit)}: each epoch reads shard blocks of up to {human(budget)})"

    def split(self, name: str) -> SplitFiles:
        if name not in self.manifest.splits or self.manifest.splits[name].num_samples == 0:
            raise DataError(
                f"the shards at {self.shown} have no '{name}' samples — re-run make_shards with a non-zero split"
            )
        info = self.manifest.splits[name]
        prefix = self.manifest.prefix
        entries = [Entry(s.sha256, s.bytes, ".tar", self.store.show(f"{prefix}{name}/{s.name}")) for s in info.shards]
        index = None
        if info.index is not None:
            index = Entry(info.index.sha256, info.index.bytes, ".npy", self.store.show(f"{prefix}{name}/{INDEX_NAME}"))
        rels = [f"{prefix}{name}/{s.name}" for s in info.shards]
        return SplitFiles(
            self.store,
            self.cache,
            rels,
            entries,
            [s.samples for s in info.shards],
            index,
            f"{prefix}{name}/{INDEX_NAME}",
        )


class SplitFiles:
    """One split's shards: ``read(shard, offset, length)``, from the folder or the cache."""

    def __init__(
        self,
        store: Store,
        cache: ShardCache | None,
        rels: list[str],
        entries: list[Entry],
        counts: list[int],
        index: Entry | None,
        index_rel: str,
    ):
        self.store, self.cache, self.rels, self.entries, self.counts = store, cache, rels, entries, counts
        self.index_entry, self.index_rel = index, index_rel
        self.fetched = multiprocessing.Value("q", 0)  # bytes this rank's processes downloaded (forked workers share it)
        self._fds: dict[int, int] = {}
        self._index: np.ndarray | None = None
        self._hold: int | None = None  # a shared lock on the cached index file while it is mapped
        self._pid = os.getpid()

    @classmethod
    def from_paths(cls, paths: list[Path], counts: list[int]) -> SplitFiles:
        """Local tar files read in place, with no manifest or sample index (tests, benches)."""
        if len(paths) != len(counts):
            raise ValueError("one sample count per shard is needed")
        root = Path(
            os.path.commonpath([Path(p).absolute() for p in paths])
            if len(paths) > 1
            else Path(paths[0]).absolute().parent
        )
        rels = [str(Path(p).absolute().relative_to(root)) for p in paths]
        entries = [Entry("", 0, ".tar", str(p)) for p in paths]
        return cls(Store(str(root)), None, rels, entries, counts, None, "")

    def __len__(self) -> int:
        return len(self.rels)

    @property
    def sizes(self) -> list[int]:
        return [e.size for e in self.entries]

    def name(self, shard: int) -> str:
        return self.rels[shard].rsplit("/", 1)[-1]

    def shown(self, shard: int) -> str:
        return self.entries[shard].shown

    def check(self, checksum: bool = False) -> None:
        """Fail before training, not an epoch in, when a local shard listed in the manifest is gone or
        is not the size the manifest says (truncated, or replaced by another file); with ``checksum``
        also when its bytes do not hash to the manifest's sha256 (another shard of the same size).
        Shards from a store are checked whole against their sha256 as they are fetched."""
        if self.cache is None:
            for shard, rel in enumerate(self.rels):
                path, expected = self.store.local / rel, self.entries[shard].size
                if not path.is_file():
                    raise DataError(
                        f"shard {self.shown(shard)} listed in the manifest is missing — re-run make_shards or restore the file"
                    )
                size = path.stat().st_size
                if expected and size != expected:
                    raise DataError(
                        f"shard {self.shown(shard)} is {size:,} bytes but the manifest says {expected:,} "
                        "(truncated or replaced) — re-run make_shards or restore the file"
                    )
                if checksum and sha256_of(path) != self.entries[shard].sha256:
                    raise DataError(
                        f"shard {self.shown(shard)} does not match the manifest's sha256 (replaced by another file "
                        "of the same size, or damaged) — re-run make_shards or restore the file"
                    )

    # -- bytes -------------------------------------------------------------------------------

    def read(self, shard: int, offset: int, length: int) -> bytes:
        size = self.entries[shard].size  # 0: not known (shards opened without a manifest)
        if offset < 0 or length < 0 or (size and offset + length > size):
            raise DataError(
                f"the sample index of shard {self.shown(shard)} places a sample at bytes {offset:,}+{length:,}, "
                f"outside the shard's {size:,} — re-run make_shards"
            )
        if self.cache is None:
            return os.pread(self._fd(shard), length, offset)
        return self.cache.read(self.entries[shard], offset, length, lambda: self.fetch(shard))

    def local_path(self, shard: int) -> Path:
        """A path to the whole shard on this machine (fetched if need be)."""
        return self.store.local / self.rels[shard] if self.cache is None else self.fetch(shard)

    def fetch(self, shard: int, protect: tuple[str, ...] = (), wait: bool = True) -> Path | None:
        """The shard in the cache (see ShardCache.get for ``protect`` and ``wait``)."""
        return self._get(self.entries[shard], self.rels[shard], protect, wait)

    def _get(self, entry: Entry, rel: str, protect: tuple[str, ...] = (), wait: bool = True) -> Path | None:
        def download(out):
            got = self.store.download(rel, out)
            with self.fetched.get_lock():
                self.fetched.value += got[0]
            return got

        return self.cache.get(entry, download, protect, wait)

    def _fd(self, shard: int) -> int:
        if os.getpid() != self._pid:  # forked into a loader worker: descriptors are not ours
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            try:
                self._fds[shard] = os.open(self.store.local / self.rels[shard], os.O_RDONLY)
            except FileNotFoundError as e:
                raise DataError(
                    f"shard {self.shown(shard)} listed in the manifest is missing — re-run make_shards or restore the file"
                ) from e
        return self._fds[shard]

    # -- sample index ------------------------------------------------------------------------

    def index(self) -> np.ndarray | None:
        """The split's memory-mapped sample index, or None for shards made before there was one."""
        if self.index_entry is None:
            return None
        if self._index is None:
            path = (
                self.store.local / self.index_rel if self.cache is None else self._get(self.index_entry, self.index_rel)
            )
            if self.cache is not None:
                self._hold = self.cache.hold(self.index_entry)  # mapped for the whole run: never evicted under us
            try:
                self._index = load_index(path, self.counts)
            except (OSError, ValueError) as e:
                raise DataError(
                    f"sample index {self.index_entry.shown} cannot be used ({e}) — re-run make_shards"
                ) from e
        return self._index

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_fds={}, _index=None, _hold=None, fetched=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.fetched = multiprocessing.Value("q", 0)

    # -- fetching ahead ----------------------------------------------------------------------

    def prefetcher(self) -> Prefetcher | None:
        return Prefetcher(self) if self.cache is not None else None


class Prefetcher:
    """Threads that fetch the shards a reader will need next, in the order it needs them.

    ``want(shards, protect)`` replaces what is queued: the shards are fetched in that order, a few
    at a time (one stream rarely fills a node's link to object storage), and space for them is
    never made by evicting a shard in ``protect``.
    """

    THREADS = 4
    RETRY_S = 0.2

    def __init__(self, files: SplitFiles, threads: int = THREADS):
        self.files = files
        self.error: DataError | None = None
        self._wish = 0
        self._todo: collections.deque[int] = collections.deque()
        self._protect: tuple[str, ...] = ()
        self._wake = threading.Condition()
        for _ in range(threads):
            threading.Thread(target=self._run, name="shard-prefetch", daemon=True).start()

    def want(self, shards: list[int], protect: list[int]) -> None:
        if self.error is not None:
            raise self.error
        self.files.cache.touch(self.files.entries[s] for s in protect)
        with self._wake:  # the newest wish replaces older ones
            self._todo = collections.deque(shards)
            self._protect = tuple(self.files.entries[s].name for s in protect)
            self._wish += 1
            self._wake.notify_all()

    def want_samples(self, samples: list[int]) -> None:
        """Every shard, in the order in which ``samples`` (the coming samples of the split) first need them."""
        starts = np.cumsum([0] + self.files.counts)
        shards = np.searchsorted(starts, np.asarray(samples, dtype=np.int64), side="right") - 1
        _, first = np.unique(shards, return_index=True)
        self.want(shards[np.sort(first)].tolist(), [])

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._todo:
                    self._wake.wait()
                shard, protect, wish = self._todo.popleft(), self._protect, self._wish
            try:
                fetched = self.files.fetch(shard, protect, wait=False)
            except DataError as e:  # the reader meets it too, when it needs that shard
                self.error = e
                return
            if fetched is None:  # no room until the readers move on: try again then
                with self._wake:
                    if wish == self._wish:
                        self._todo.appendleft(shard)
                    self._wake.wait(self.RETRY_S)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
