"""The sample index, the store, the node-local cache and the shard-block order, without servers."""

from __future__ import annotations

import hashlib
import multiprocessing
import os

import numpy as np
import pytest

from shards.cache import Entry, ShardCache
from shards.index import RECORD, load_index, parse_sample, scan_tar
from shards.source import ShardSource
from shards.store import Store
from shards.writer import ShardWriter
from toolbox.errors import DataError
from toolbox.redact import redact
from toolbox.sizes import parse_size
from trainer.training.data import ShardBlocks, TrainOrder, open_shards, split_reader


def test_the_index_costs_16_bytes_a_sample_and_matches_a_header_scan(tmp_path):
    assert RECORD.itemsize == 16
    path = tmp_path / "s.tar"
    with ShardWriter(path) as writer:
        for i in range(5):
            writer.add(f"k{i}", {"cls": str(i % 3).encode(), "jpg": os.urandom(100 * i + 1), "json": b"{}"})
        writer.close()
    index = writer.index
    assert np.array_equal(index, scan_tar(path))
    data = path.read_bytes()
    key, fields = parse_sample(data[index[4]["offset"] : index[4]["offset"] + index[4]["length"]])
    assert key == "k4" and fields["cls"] == b"1" and len(fields["jpg"]) == 401 and set(fields) == {"cls", "jpg", "json"}
    assert index["label"].tolist() == [0, 1, 2, 0, 1]


def test_make_shards_writes_the_index_readers_map(digits_shards):
    dataset = open_shards(str(digits_shards))
    train = split_reader(dataset, "train")
    assert train.has_index and isinstance(dataset.split("train").index(), np.memmap)
    for i in (0, 777, len(train) - 1):
        shard, position = train.locate(i)
        scanned = scan_tar(digits_shards / "train" / train.files.rels[shard].rsplit("/", 1)[1])[position]
        assert tuple(train._record(shard, i, position)) == tuple(scanned)
    with pytest.raises(ValueError, match="records, the manifest says"):
        load_index(digits_shards / "train" / "index.npy", [5])


@pytest.mark.parametrize(
    "text, size",
    [("500MB", 500_000_000), ("40GB", 40 * 10**9), ("1.5 TB", 1_500_000_000_000), ("2GiB", 2 * 2**30), ("123", 123)],
)
def test_sizes_read_like_disks_are_sold(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "5 parsecs", "0"])
def test_a_bad_size_is_refused(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_redact_drops_what_may_be_a_secret():
    assert redact("https://user:pw@host:8080/data/x?X-Amz-Signature=abc&token=t") == "https://host:8080/data/x"
    assert redact("s3://bucket/prefix") == "s3://bucket/prefix"
    assert redact("/data/shards") == "/data/shards"
    assert redact("pipe:curl -H 'Authorization: Bearer T' https://x/{path}") == "pipe:curl ..."


def test_pipe_runs_only_when_allowed(tmp_path):
    (tmp_path / "a b.txt").write_bytes(b"hello")
    with pytest.raises(DataError, match="runs a shell command — set data.allow_pipe=true"):
        Store(f"pipe:cat {tmp_path}/{{path}}")
    store = Store(f"pipe:cat {tmp_path}/{{path}}", allow_pipe=True)
    assert store.read_bytes("a b.txt") == b"hello"
    with pytest.raises(DataError, match="needs {path}"):
        Store("pipe:cat x", allow_pipe=True)


def test_unsupported_scheme_is_one_line():
    with pytest.raises(DataError, match=r"ftp:// is not supported — use a local path, s3://"):
        ShardSource("ftp://host/x")


# -- the cache ---------------------------------------------------------------------------------


def entry(data: bytes, name: str = "x") -> Entry:
    return Entry(hashlib.sha256(data).hexdigest(), len(data), ".tar", name)


def writer_of(data: bytes, calls: list | None = None):
    def download(out):
        if calls is not None:
            calls.append(1)
        out.seek(0)
        out.write(data)
        out.truncate(len(data))
        return len(data), hashlib.sha256(data).hexdigest()

    return download


def test_cache_downloads_once_and_evicts_least_recently_used_first(tmp_path):
    cache = ShardCache(tmp_path, limit=3000)
    blobs = [bytes([i]) * 1000 for i in range(4)]
    calls = []
    for blob in blobs[:3]:
        cache.get(entry(blob), writer_of(blob, calls))
    assert cache.get(entry(blobs[0]), writer_of(blobs[0], calls)).read_bytes() == blobs[0] and len(calls) == 3
    cache.touch([entry(blobs[0])])  # used again: now blob 1 is the least recently used
    os.utime(cache.path(entry(blobs[1])), (1, 1))
    cache.get(entry(blobs[3]), writer_of(blobs[3]))
    assert not cache.path(entry(blobs[1])).exists() and cache.path(entry(blobs[0])).exists()
    assert cache.used() <= 3000


def test_cache_never_evicts_a_file_being_read_or_named_as_protected(tmp_path):
    cache = ShardCache(tmp_path, limit=2000)
    a, b, c = b"a" * 1000, b"b" * 1000, b"c" * 1000
    cache.get(entry(a), writer_of(a))
    cache.get(entry(b), writer_of(b))
    fd = cache.hold(entry(a))  # a reader holds a
    try:
        cache.get(entry(c), writer_of(c), protect=())
        assert cache.path(entry(a)).exists() and not cache.path(entry(b)).exists()
    finally:
        os.close(fd)
    cache.get(entry(b), writer_of(b), protect=[entry(c).name])
    assert cache.path(entry(c)).exists() and not cache.path(entry(a)).exists()


def test_a_corrupted_download_is_fetched_again_once_then_one_line(tmp_path):
    cache = ShardCache(tmp_path, limit=None)
    good = b"g" * 100
    calls = []

    def flaky(out):  # wrong bytes the first time only
        calls.append(1)
        return writer_of(good if len(calls) > 1 else b"x" * 100)(out)

    assert cache.get(entry(good), flaky).read_bytes() == good and len(calls) == 2
    with pytest.raises(DataError, match="was downloaded twice and is corrupted \\(its sha256 differs"):
        cache.get(entry(b"other", "s3://b/x.tar"), writer_of(b"wrong"))
    assert not list(tmp_path.glob("*.part-*"))


def _fill(args):
    root, seed = args
    cache = ShardCache(root, limit=5000)
    rng = np.random.default_rng(seed)
    peaks = []
    for i in rng.integers(0, 12, 40).tolist():
        blob = bytes([i]) * 1000
        cache.get(entry(blob), writer_of(blob))
        peaks.append(cache.used())
    return max(peaks)


def test_processes_sharing_a_cache_never_take_it_over_its_limit(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        peaks = pool.map(_fill, [(tmp_path, seed) for seed in range(8)])
    assert max(peaks) <= 5000 and ShardCache(tmp_path, 5000).used() <= 5000


def test_a_limit_below_four_shards_is_refused_at_start(digits_shards, tmp_path):
    with pytest.raises(DataError, match=r"data.cache_limit 1 MB is below 4x the largest shard"):
        from shards.source import CacheOptions

        ShardSource(str(digits_shards), CacheOptions(dir=str(tmp_path), limit=1_000_000))


# -- the shard-block order ---------------------------------------------------------------------


def block_order(world, rank, budget=300, seed=3, epoch=1, start=0):
    counts, sizes = [10, 7, 12, 9, 11, 8], [100, 70, 120, 90, 110, 80]
    order = TrainOrder(sum(counts), 4, rank, world, seed, blocks=ShardBlocks(counts, sizes, budget))
    order.set_epoch(epoch, start)
    return order


def test_block_order_is_the_same_for_any_world_size_and_resumes_mid_epoch():
    one = block_order(1, 0).epoch_plan()[0].tolist()
    assert sorted(one) == list(range(57))  # every sample once
    for world in (2, 3):
        assert block_order(world, 1).epoch_plan()[0].tolist() == one
    full = list(block_order(2, 1))
    assert list(block_order(2, 1, start=3)) == full[3:]
    assert block_order(1, 0, epoch=2).epoch_plan()[0].tolist() != one


def test_aug_repeats_in_the_block_order_keep_each_copy_in_its_block():
    order = block_order(1, 0)
    order.repeats = 2
    samples, blocks, ends = order.epoch_plan()
    starts = np.cumsum([0, 10, 7, 12, 9, 11, 8])
    shard_of = np.searchsorted(starts, samples.numpy(), side="right") - 1
    begin = 0
    for shards, end in zip(blocks, ends):  # the cache's blocks hold as they did without repeats
        assert set(shard_of[begin:end].tolist()) <= set(shards)
        begin = end
    order = samples.tolist()
    # the copies fill the epoch positions 2k, 2k + 1, except where a block's edge cuts a pair
    split = [k for k in range(0, len(order) - 1, 2) if order[k] != order[k + 1]]
    assert len(split) <= len(ends) - 1 and all(any(k < e <= k + 1 for e in ends) for k in split)
    two = [block_order(2, rank) for rank in (0, 1)]
    for order in two:
        order.repeats = 2
    unpaired = sum(len(set(s for s, _, _ in b0) ^ set(s for s, _, _ in b1)) for b0, b1 in zip(*map(list, two)))
    assert unpaired <= 2 * len(split)  # dealt: a pair's two copies on the two ranks, in the same step


def test_blocks_fit_the_budget_and_samples_stay_within_their_block():
    order = block_order(1, 0)
    samples, blocks, ends = order.epoch_plan()
    starts = np.cumsum([0, 10, 7, 12, 9, 11, 8])
    shard_of = np.searchsorted(starts, samples.numpy(), side="right") - 1
    begin = 0
    for shards, end in zip(blocks, ends):
        assert sum([100, 70, 120, 90, 110, 80][s] for s in shards) <= 300 or len(shards) == 1
        assert set(shard_of[begin:end].tolist()) == set(shards)
        begin = end
    assert sorted(s for b in blocks for s in b) == list(range(6))


def test_a_process_forked_while_another_thread_holds_a_cache_lock_does_not_keep_it(tmp_path):
    import fcntl
    import threading

    from shards.cache import _flock

    held, release = threading.Event(), threading.Event()

    def hold():
        with _flock(tmp_path / ".space.lock", fcntl.LOCK_EX):
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    read, write = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a loader worker, forked mid-lock: it stays alive until the parent has checked
        os.close(write)
        os.write(ready_write, b"r")  # fork has returned: the at-fork handlers have run
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    os.read(ready_read, 1)
    try:
        release.set()
        thread.join()
        fd = os.open(tmp_path / ".space.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the child kept it
        finally:
            os.close(fd)
    finally:
        os.write(write, b"x")
        os.close(write)
        os.waitpid(pid, 0)


def test_upload_puts_the_manifest_last_and_removes_the_old_dataset_only_after(tmp_path):
    from launch.publish import upload

    for rel in (
        "manifest.json",
        "_info.json",
        "summary.txt",
        "train/train-000000.tar",
        "train/index.npy",
        "val/val-000000.tar",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    calls = []

    class Recorder:
        def upload(self, local, rel):
            calls.append(("put", rel))

        def delete(self, rels):
            calls.append(("delete", sorted(rels)))

    old = ["manifest.json", "summary.txt", "train/train-000000.tar", "train/index.npy", "stray.txt"]
    upload(tmp_path, Recorder(), "build-1/", old)
    puts = [rel for kind, rel in calls if kind == "put"]
    assert puts[-2:] == ["_info.json", "manifest.json"]
    assert set(puts) == {
        "manifest.json",
        "_info.json",
        "summary.txt",
        "build-1/train/train-000000.tar",
        "build-1/train/index.npy",
        "build-1/val/val-000000.tar",
    }
    assert calls[-1] == ("delete", ["stray.txt", "train/index.npy", "train/train-000000.tar"])


def test_a_download_left_by_a_dead_process_is_swept(tmp_path):
    cache = ShardCache(tmp_path, limit=None)
    (tmp_path / f"{'0' * 64}.tar.part-99999").write_bytes(b"half")
    cache.get(entry(b"new"), writer_of(b"new"))
    assert not list(tmp_path.glob("*.part-*"))


def test_a_cache_disk_without_room_for_the_data_is_refused_at_start(digits_shards, tmp_path, monkeypatch):
    import collections

    from shards import source
    from shards.source import CacheOptions

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(source.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2_000_000, 2_000_000))
    with pytest.raises(DataError, match=r"has room for 2 MB but the dataset needs 6 MB — set data.cache_limit=2MB"):
        ShardSource(str(digits_shards), CacheOptions(dir=str(tmp_path)))


def test_a_local_folder_is_read_in_place_unless_a_cache_dir_is_given(digits_shards, tmp_path):
    from shards.reader import SplitReader
    from shards.source import CacheOptions

    in_place = SplitReader(ShardSource(str(digits_shards)).split("val"))
    staged_set = ShardSource(str(digits_shards), CacheOptions(dir=str(tmp_path)))
    staged = SplitReader(staged_set.split("val"))
    assert in_place.files.cache is None and staged.files.cache is not None
    assert staged.read(100) == in_place.read(100)
    cached = sorted(p.name for p in (tmp_path / "se-densenet-shards").iterdir() if not p.name.endswith(".lock"))
    info = staged_set.manifest.splits["val"]
    shard, _ = staged.locate(100)
    assert cached == sorted([f"{info.index.sha256}.npy", f"{info.shards[shard].sha256}.tar"])
    assert staged.files.fetched.value == info.index.bytes + info.shards[shard].bytes


def test_the_fast_header_parse_reads_what_tarfile_reads(tmp_path):
    import subprocess

    from shards.index import _parse_with_tarfile

    ours = tmp_path / "ours.tar"
    with ShardWriter(ours) as writer:
        writer.add("a_0123456789abcdef", {"cls": b"3", "jpg": os.urandom(3000), "json": b'{"a": 1}'})
        writer.add("sub/dir/b_1", {"cls": b"1", "png": b"x" * 513})
        writer.close()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "k1.cls").write_bytes(b"2")
    (tmp_path / "d" / "k1.jpg").write_bytes(b"J" * 700)
    subprocess.run(["tar", "-cf", str(tmp_path / "gnu.tar"), "-C", str(tmp_path), "d/k1.cls", "d/k1.jpg"], check=True)
    for shard in (ours, tmp_path / "gnu.tar"):
        data = shard.read_bytes()
        for record in scan_tar(shard):
            sample = data[record["offset"] : record["offset"] + record["length"]]
            assert parse_sample(sample) == _parse_with_tarfile(sample)
    bad = bytearray(ours.read_bytes()[:3072])
    bad[257:262] = b"xxxxx"  # not a ustar header any more
    with pytest.raises(Exception):
        parse_sample(bytes(bad))


def test_fetching_ahead_never_waits_for_room_with_the_file_locked(tmp_path):
    """The prefetcher asks without waiting; a reader that needs a file now makes room for it."""
    cache = ShardCache(tmp_path, limit=2000)
    a, b, c = b"a" * 1000, b"b" * 1000, b"c" * 1000
    cache.get(entry(a), writer_of(a))
    cache.get(entry(b), writer_of(b))
    protect = [entry(a).name, entry(b).name]  # what the loaders are reading
    assert cache.get(entry(c), writer_of(c), protect, wait=False) is None
    assert not cache.path(entry(c)).exists() and cache.path(entry(a)).exists()
    assert cache.get(entry(c), writer_of(c)).read_bytes() == c  # needed now: the least recently used goes
    assert cache.used() <= 2000


def test_training_sizes_the_cache_for_train_and_val_never_for_test(tmp_path):
    """A cache that holds train and val holds all that training reads, whatever the test split weighs."""
    from launch import make_shards
    from shards.manifest import Manifest
    from shards.source import CacheOptions
    from tests.launch.test_make_shards import image_tree

    src = image_tree(tmp_path / "src", {"train": {"a": 8, "b": 8}, "test": {"a": 8, "b": 8}}, size=(48, 40))
    out = tmp_path / "out"
    assert make_shards.main([str(src), str(out), "--workers", "1", "--min-shards", "4"]) == 0
    splits = Manifest.load(out).splits
    weight = {name: sum(s.bytes for s in info.shards) + info.index.bytes for name, info in splits.items()}
    limit = weight["train"] + weight["val"] + weight["test"] // 2
    options = CacheOptions(dir=str(tmp_path / "cache"), limit=limit)
    assert ShardSource(str(out), options, reads=("train", "val")).block_budget is None  # holds every shard it reads
    assert ShardSource(str(out), options).block_budget is not None  # all three splits do not fit
    assert open_shards(str(out)).reads == [splits["train"], splits["val"]]  # the trainer's default
