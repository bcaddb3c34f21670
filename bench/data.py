"""The data path: loader rate from object storage against local disk, and the sample index's
memory and start-up against the legacy per-process tar-header scan, in one run.

A. Loader rate. Synthetic JPEG shards through the real make_shards, once to a local folder and
   once to s3:// on moto's S3 server on loopback (tests/harness.py `s3_server`, run in a child
   process so its request threads do not share the bench's GIL). One epoch of the train split
   at a time through the real DataLoader path (build_loaders' train order + make_loader,
   --workers workers, batch --batch) with a dataset that only reads each sample's bytes (`SplitReader.read`, no
   decode), so the numbers are the data path's, not JPEG decoding's. Each loader runs two
   epochs (persistent workers): local disk (read in place); s3 with a fresh cache folder and no
   limit (epoch 1 cold, epoch 2 warm); s3 with a cache limit below the split (shard-block
   order, prefetcher). "plain download" is the same shard files fetched one after another with
   the same client (`Store.download`) into a temp folder. Targets: cold >= 0.9x plain download
   (MB/s), warm >= 0.95x local (samples/s).
B. Index memory and start-up at N samples. Tiny samples (cls, a 4-byte jpg, json) written with
   ShardWriter into one template shard, hard-linked as every shard of the split (reading is
   CPU-bound from the page cache either way), plus the index and a manifest. A fresh process
   per measurement: "before" (legacy: SplitReader over SplitFiles.from_paths, which scans each
   shard's tar headers when first touched) and "after" (open_shards + split_reader, the
   memory-mapped index) read one sample of every shard, as a loader worker does in its first
   batches under a global shuffle; "after" then touches every record (as an epoch does), and
   runs again with 4 forked workers to show that the index pages are shared. Memory is the
   increase of RSS, PSS and USS (/proc/<pid>/smaps_rollup), and the PSS of the index.npy
   mapping alone (/proc/<pid>/smaps). Target: <= 64 bytes per sample per node; start-up O(shards).

    .venv/bin/python bench/data.py            # 8,000 images; N = 100,000 and 1,280,000
    .venv/bin/python bench/data.py --quick    # 2,000 images; N = 20,000 and 100,000
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 1e6
BUCKET = "bench"
S3_OUT = f"s3://{BUCKET}/data"
CLASSES = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes: the whole run in about 2 minutes")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_data.json"), help="write the results here")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a new temp folder, removed at the end)")
    p.add_argument("--workers", type=int, default=4, help="loader workers (data.workers)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, help="images in part A's corpus (default 8000, quick 2000)")
    p.add_argument(
        "--image-size", type=int, default=256, help="side of part A's JPEGs in px (noisy: ~10-50 KB each at 256)"
    )
    p.add_argument("--min-shards", type=int, default=16, help="make_shards --min-shards for part A")
    p.add_argument(
        "--limit-fraction",
        type=float,
        default=0.4,
        help="cache limit / train split bytes (at least 4x the largest shard)",
    )
    p.add_argument("--samples", help="comma-separated N for part B (default 100000,1280000; quick 20000,100000)")
    p.add_argument("--samples-per-shard", type=int, default=2500)
    p.add_argument(
        "--before-shards",
        type=int,
        help="legacy scans beyond this many shards are extrapolated linearly from this many (default 256, quick 16; 0: scan all)",
    )
    p.add_argument("--skip", choices=("a", "b"), action="append", default=[], help="skip a part")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one part-B measurement in a fresh process
    p.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--limit-shards", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.images is None:
        args.images = 2000 if args.quick else 8000
    args.samples = [int(x) for x in (args.samples or ("20000,100000" if args.quick else "100000,1280000")).split(",")]
    if args.before_shards is None:
        args.before_shards = 16 if args.quick else 256
    return args


# -- memory ------------------------------------------------------------------------------------

FIELDS = {"Rss": "rss", "Pss": "pss", "Pss_Anon": "anon"}


def memory(pid: int | str = "self") -> dict[str, int]:
    """Rss, Pss and Pss_Anon in bytes, from /proc/<pid>/smaps_rollup. Pss_Anon is the process's
    heap, split with the processes forked from the same parent; unlike Pss and Uss it does not
    move when unrelated processes start or stop sharing the same library pages."""
    got = dict.fromkeys(FIELDS.values(), 0)
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                got[FIELDS[key]] += int(rest.split()[0]) * 1024
    return got


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def index_mapping(pid: int | str = "self", name: str = "index.npy") -> dict[str, int]:
    """Rss and Pss in bytes of the process's mappings of files called ``name`` (/proc/<pid>/smaps)."""
    got, inside = {"rss": 0, "pss": 0}, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if _MAPPING.match(line):
                inside = line.rstrip().endswith("/" + name)
            elif inside and line.startswith(("Rss:", "Pss:")):
                got["rss" if line.startswith("Rss") else "pss"] += int(line.split()[1]) * 1024
    return got


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


# -- part A: loader rate -----------------------------------------------------------------------


def _one_image(job: tuple[int, str, int]) -> int:
    from PIL import Image

    i, path, size = job
    rng = np.random.default_rng(i)
    coarse = rng.integers(0, 256, (int(rng.integers(2, 12)), int(rng.integers(2, 12)), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.int16)
    amp = int(rng.choice([4, 12, 24, 40]))
    img = np.clip(img + rng.integers(-amp, amp + 1, img.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    Path(path).write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_images(root: Path, n: int, size: int) -> Path:
    src = root / f"images-{n}-{size}"
    if (src / ".complete").exists():
        return src
    shutil.rmtree(src, ignore_errors=True)
    for c in range(CLASSES):
        (src / f"class_{c}").mkdir(parents=True)
    jobs = [(i, str(src / f"class_{i % CLASSES}" / f"img_{i:06d}.jpg"), size) for i in range(n)]
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:
        sizes = pool.map(_one_image, jobs, chunksize=64)
    (src / ".complete").touch()
    print(
        f"  {n} JPEGs {size}x{size}: {sum(sizes) / MB:.0f} MB, median {int(np.median(sizes)) / 1e3:.1f} KB", flush=True
    )
    return src


SERVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from toolbox.testing import s3_server
with s3_server() as (server, env):
    print(json.dumps(env), flush=True)
    sys.stdin.read()  # until the bench closes our stdin
"""


@contextmanager
def moto_process():
    """tests/harness.py's moto S3 server, in a child process; -> its environment."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(REPO)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("the moto S3 server did not start")
        yield json.loads(line)
    finally:
        try:
            proc.stdin.close()
            proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def make_shards(src: Path, out: str, min_shards: int, env: dict | None = None) -> float:
    t = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "launch.make_shards", str(src), out, "--min-shards", str(min_shards)],
        cwd=REPO,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise SystemExit(f"make_shards {src} {out} failed:\n{done.stderr}")
    return time.perf_counter() - t


class BytesOnly:
    """A map-style dataset of (payload bytes, label, index): the sample's bytes are read and
    split into fields (`SplitReader.read`), nothing is decoded."""

    def __init__(self, index):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item):
        import torch

        i = item[0]  # (sample, augmentation seed, crop side)
        sample = self.index.read(i)
        return torch.tensor(sum(len(v) for k, v in sample.items() if not k.startswith("__"))), int(sample["cls"]), i


def bytes_loader(location: str, cache_dir: Path | None, limit: int | None, args):
    """The trainer's own train order (build_loaders, from a real Config) over the split at
    ``location``, read by a loader of BytesOnly instead of the trainer's decoding dataset.
    -> (loader, order, the split's files)."""
    from trainer.training.config import Config, DataConfig, TrainConfig
    from trainer.training.data import build_loaders, make_loader, open_shards

    data = DataConfig(
        shards=location,
        cache_dir=str(cache_dir) if cache_dir else None,
        cache_limit=str(limit) if limit else None,
        fetch_retries=2,
        workers=args.workers,
    )
    config = Config(data=data, train=TrainConfig(batch_size=args.batch, seed=0))
    source = open_shards(location, config.data)
    manifest = source.manifest
    trainers = build_loaders(config, source, manifest.mean, manifest.std, 0, 1, False)
    reader = trainers.train.dataset.reader  # their loaders start no workers: neither is iterated
    return make_loader(BytesOnly(reader), trainers.order, args.workers, pin_memory=False), trainers.order, reader.files


def one_epoch(loader, order, files, epoch: int) -> dict:
    """Epoch ``epoch`` through ``loader``: time, first batch, samples, payload, bytes downloaded."""
    import torch

    order.set_epoch(epoch)
    fetched = files.fetched.value
    seen, payload, indices, first = 0, 0, [], None
    t = time.perf_counter()
    for sizes, labels, idx, _bad in loader:
        first = first or time.perf_counter() - t
        seen += len(labels)
        payload += int(sizes.sum())
        indices.append(idx)
    seconds = time.perf_counter() - t
    return {
        "epoch": epoch + 1,
        "seconds": seconds,
        "first_batch_s": first,
        "samples": seen,
        "payload_bytes": payload,
        "fetched_bytes": files.fetched.value - fetched,
        "_indices": torch.cat(indices).numpy(),
    }


def add_rates(rows: list[dict], files) -> None:
    """Each epoch's record bytes (from the sample index), samples/s and MB/s."""
    lengths = np.asarray(files.index()["length"])  # after the epochs: the index read here is no download of theirs
    for row in rows:
        row["record_bytes"] = int(lengths[row.pop("_indices")].sum())
        row["samples_per_s"] = row["samples"] / row["seconds"]
        row["mb_per_s"] = row["record_bytes"] / MB / row["seconds"]


def loader_epochs(
    location: str, cache_dir: Path | None, limit: int | None, epochs: int, args
) -> tuple[list[dict], dict]:
    """``epochs`` epochs of one loader (persistent workers) over the train split at ``location``."""
    import torch

    loader, order, files = bytes_loader(location, cache_dir, limit, args)
    try:
        rows = [one_epoch(loader, order, files, epoch) for epoch in range(epochs)]
        add_rates(rows, files)
    finally:
        del loader  # shuts the persistent workers down
        gc.collect()
    blocks = order.blocks
    info = {
        "block_budget": None if blocks is None else blocks.budget,
        "lookahead_batches": order.lookahead,
        "blocks": None if blocks is None else len(blocks.epoch(torch.Generator().manual_seed(0))[0]),
        "train_shards": len(files),
        "train_bytes": sum(files.sizes),
        "largest_shard": max(files.sizes),
        "rels": list(files.rels),
    }
    return rows, info


def _download_all(job: tuple[str, list[str], str]) -> int:
    from shards.store import Store

    location, rels, folder = job
    store, total = Store(location), 0
    for rel in rels:
        with open(Path(folder) / rel.replace("/", "_"), "wb") as f:
            total += store.download(rel, f)[0]
    return total


def plain_download(location: str, rels: list[str], work: Path, processes: int = 1) -> dict:
    """The same files with the same client (`Store.download`): one after another, or split
    over ``processes`` forked processes (as many downloaders as a cold loader can have)."""
    folder = Path(tempfile.mkdtemp(prefix="plain-", dir=work))
    try:
        t = time.perf_counter()
        if processes == 1:
            total = _download_all((location, rels, str(folder)))
        else:
            with mp.get_context("fork").Pool(processes) as pool:
                total = sum(
                    pool.map(_download_all, [(location, rels[i::processes], str(folder)) for i in range(processes)])
                )
        seconds = time.perf_counter() - t
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"seconds": seconds, "bytes": total, "mb_per_s": total / MB / seconds, "processes": processes}


def part_a(args, work: Path) -> dict:
    from toolbox.testing import s3_fs

    print(f"A. loader rate: {args.images} images, {args.workers} workers, batch {args.batch}", flush=True)
    src = make_images(work, args.images, args.image_size)
    local = work / "shards"
    shutil.rmtree(local, ignore_errors=True)
    result: dict = {"images": args.images, "image_size": args.image_size, "workers": args.workers, "batch": args.batch}
    result["make_shards_local_s"] = make_shards(src, str(local), args.min_shards)
    with moto_process() as env:
        os.environ.update(env)  # the bench and its forked loader workers reach the server through these
        s3_fs(env).mkdir(BUCKET)
        result["make_shards_s3_s"] = make_shards(src, S3_OUT, args.min_shards, env)
        print(
            f"  make_shards: local {result['make_shards_local_s']:.1f} s, to {S3_OUT} {result['make_shards_s3_s']:.1f} s",
            flush=True,
        )
        from shards.source import CacheOptions, ShardSource

        rels = ShardSource(S3_OUT, CacheOptions(str(work / "cache-unused"))).split("train").rels
        plain = [plain_download(S3_OUT, rels, work)]  # before the loaders and after: the machine's load drifts
        cases, split = loader_cases(args, work, local)
        result.update(split)
        plain.append(plain_download(S3_OUT, rels, work))
        result.update(plain_downloads(plain, plain_download(S3_OUT, rels, work, args.workers + 1)))
    result["cases"] = cases
    result.update(ratios_a(cases, result["plain_download"], result["plain_download_parallel"]))
    return result


def loader_cases(args, work: Path, local: Path) -> tuple[dict[str, list[dict]], dict]:
    """Each case's epochs: local disk, s3 with a cache and no limit, s3 with a cache limit below
    the split; and what the loaders saw of the split and the limited cache."""
    per_s = lambda rows: [round(r["samples_per_s"]) for r in rows]  # noqa: E731
    cases: dict[str, list[dict]] = {}
    cases["local disk"], info = loader_epochs(str(local), None, None, 3, args)
    print(f"  local: {per_s(cases['local disk'])} samples/s", flush=True)
    cases["s3, cache, no limit"], _ = loader_epochs(S3_OUT, work / "cache-nolimit", None, 3, args)
    print(f"  s3 no limit: {per_s(cases['s3, cache, no limit'])} samples/s", flush=True)
    limit = max(int(args.limit_fraction * info["train_bytes"]), 4 * info["largest_shard"])
    cases["s3, cache limit"], limited = loader_epochs(S3_OUT, work / "cache-limit", limit, 2, args)
    print(f"  s3 limit {limit / MB:.1f} MB: {per_s(cases['s3, cache limit'])} samples/s", flush=True)
    split = {
        "train_shards": info["train_shards"],
        "train_bytes": info["train_bytes"],
        "largest_shard": info["largest_shard"],
        "cache_limit": limit,
        "block_budget": limited["block_budget"],
        "blocks_per_epoch": limited["blocks"],
        "lookahead_batches": limited["lookahead_batches"],
        "train_samples": cases["local disk"][0]["samples"],
    }
    return cases, split


def plain_downloads(plain: list[dict], parallel: dict) -> dict:
    """The one-after-another runs, their mean, and the parallel run."""
    print(
        f"  plain download: {[round(p['mb_per_s'], 1) for p in plain]} MB/s one after another, "
        f"{parallel['mb_per_s']:.1f} MB/s in {parallel['processes']} processes",
        flush=True,
    )
    seconds = sum(p["seconds"] for p in plain)
    return {
        "plain_download_runs": plain,
        "plain_download": {
            "seconds": seconds / len(plain),
            "bytes": plain[0]["bytes"],
            "mb_per_s": plain[0]["bytes"] * len(plain) / MB / seconds,
        },
        "plain_download_parallel": parallel,
    }


def ratios_a(cases: dict[str, list[dict]], plain: dict, parallel: dict) -> dict:
    """Part A's targets: cold against plain download (MB/s), warm and cold against local (samples/s)."""
    local1, *local_later = cases["local disk"]
    cold, *warm = cases["s3, cache, no limit"]
    rate = lambda rows: sum(r["samples"] for r in rows) / sum(r["seconds"] for r in rows)  # noqa: E731
    return {
        "cold_vs_plain_download_mb_s": cold["mb_per_s"] / plain["mb_per_s"],
        "cold_vs_parallel_download_mb_s": cold["mb_per_s"] / parallel["mb_per_s"],
        "warm_vs_local_samples_s": rate(warm) / rate(local_later),  # epochs 2.. of each: persistent workers up
        "cold_vs_local_samples_s": cold["samples_per_s"] / local1["samples_per_s"],
    }


def print_a(r: dict) -> None:
    cases, plain = r["cases"], r["plain_download"]
    local = {row["epoch"]: row for row in cases["local disk"]}
    print(
        f"\nA. One epoch of the train split, bytes only ({r['images']} JPEGs {r['image_size']} px -> {r['train_shards']} train shards, "
        f"{r['train_bytes'] / MB:.1f} MB, largest {r['largest_shard'] / MB:.2f} MB), {r['workers']} workers, batch {r['batch']}; "
        f"cache limit {r['cache_limit'] / MB:.1f} MB = {r['cache_limit'] / r['train_bytes']:.0%} of the split "
        f"(block budget {r['block_budget'] / MB:.1f} MB, {r['blocks_per_epoch']} blocks/epoch, "
        f"{r['train_samples'] / r['batch'] / r['blocks_per_epoch']:.1f} batches/block; loader lookahead {r['lookahead_batches']} batches)\n"
    )
    print(
        "| case | epoch | samples/s | MB/s | s | 1st batch s | downloaded MB (x split) | samples/s vs local, same epoch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    names = {
        ("s3, cache, no limit", 1): "s3, cold cache",
        ("s3, cache, no limit", 2): "s3, warm cache",
        ("s3, cache, no limit", 3): "s3, warm cache",
    }
    for case, rows in cases.items():
        for row in rows:
            name = names.get((case, row["epoch"]), case)
            down = (
                f"{row['fetched_bytes'] / MB:.1f} ({row['fetched_bytes'] / r['train_bytes']:.2f}x)"
                if case != "local disk"
                else "-"
            )
            print(
                f"| {name} | {row['epoch']} | {row['samples_per_s']:,.0f} | {row['mb_per_s']:.1f} | {row['seconds']:.2f} | {row['first_batch_s']:.2f} | {down} | "
                f"{row['samples_per_s'] / local[row['epoch']]['samples_per_s']:.2f}x |"
            )
    par = r["plain_download_parallel"]
    print(
        f"| plain download (Store.download, one file after another; mean of {len(r['plain_download_runs'])} runs, "
        f"before and after the loaders) | - | - | {plain['mb_per_s']:.1f} | {plain['seconds']:.2f} | - | {plain['bytes'] / MB:.1f} (1.00x) | - |"
    )
    print(
        f"| plain download, files split over {par['processes']} processes (as many downloaders as the cold loader: "
        f"workers + prefetcher) | - | - | {par['mb_per_s']:.1f} | {par['seconds']:.2f} | - | {par['bytes'] / MB:.1f} (1.00x) | - |"
    )
    ok = lambda good: "ok" if good else "MISSED"  # noqa: E731
    print(
        f"\ncold / plain download (MB/s): {r['cold_vs_plain_download_mb_s']:.2f}x (target >= 0.9x, {ok(r['cold_vs_plain_download_mb_s'] >= 0.9)}); "
        f"warm / local (samples/s, epochs 2-3 each): {r['warm_vs_local_samples_s']:.2f}x (target >= 0.95x, {ok(r['warm_vs_local_samples_s'] >= 0.95)}); "
        f"cold / local (epoch 1 each): {r['cold_vs_local_samples_s']:.2f}x; "
        f"cold / parallel plain download: {r['cold_vs_parallel_download_mb_s']:.2f}x"
    )


# -- part B: index memory and start-up ---------------------------------------------------------


def tiny_sample(i: int) -> dict[str, bytes]:
    return {"cls": str(i % CLASSES).encode(), "jpg": b"\xff\xd8\xff\xd9", "json": b'{"i":%d}' % (i % 10)}


def write_shard(path: Path, n: int):
    from shards.writer import ShardWriter

    with ShardWriter(path) as writer:
        for i in range(n):
            writer.add(f"{i:08d}", tiny_sample(i))
        return writer.close(), writer.index


def synthetic_split(work: Path, n: int, per_shard: int) -> Path:
    """OUT/train/*.tar (one template shard, hard-linked), OUT/train/index.npy, OUT/manifest.json."""
    from shards.format import INDEX_NAME, shard_name
    from shards.index import write_index
    from shards.manifest import Manifest, ShardInfo, SplitInfo

    out = work / f"index-{n}"
    if (out / "manifest.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "train").mkdir(parents=True)
    templates = {}
    counts = [per_shard] * (n // per_shard) + ([n % per_shard] if n % per_shard else [])
    shards, parts = [], []
    for k, count in enumerate(counts):
        if count not in templates:
            templates[count] = (work / f"template-{count}.tar", *write_shard(work / f"template-{count}.tar", count))
        path, info, index = templates[count]
        name = shard_name("train", k)
        os.link(path, out / "train" / name)
        shards.append(ShardInfo(name, count, info.bytes, info.sha256))
        parts.append(index)
    for path, _, _ in templates.values():
        path.unlink()
    size, sha = write_index(out / "train" / INDEX_NAME, parts)
    labels = np.concatenate(parts)["label"]
    class_counts = {f"class_{c}": int(v) for c, v in enumerate(np.bincount(labels, minlength=CLASSES))}
    Manifest(
        classes=list(class_counts),
        splits={"train": SplitInfo(n, class_counts, shards, ShardInfo(INDEX_NAME, n, size, sha))},
        mean=[0.5] * 3,
        std=[0.25] * 3,
        source="synthetic (bench/data.py)",
    ).write(out)
    return out


def _first_of_every_shard(index, shards: int) -> None:
    for s in range(shards):
        index.read(index.starts[s])


def _touch_all(index) -> int:
    return int(np.asarray(index.files.index()["length"]).sum(dtype=np.uint64))


def child(args) -> dict:
    """One measurement in this fresh process (``--child before|after|after4``)."""
    return {"before": child_before, "after": child_after, "after4": child_after_workers}[args.child](args)


def child_before(args) -> dict:
    """The legacy path: the first sample of every shard through a per-process tar-header scan."""
    from shards.manifest import Manifest
    from shards.reader import SplitReader
    from shards.source import SplitFiles

    gc.collect()
    base = memory()
    t = time.perf_counter()
    manifest = Manifest.load(args.shards)
    k = args.limit_shards or len(manifest.splits["train"].shards)
    paths = manifest.shard_paths("train")[:k]
    counts = [s.samples for s in manifest.splits["train"].shards[:k]]
    index = SplitReader(SplitFiles.from_paths(paths, counts))
    _first_of_every_shard(index, k)
    seconds = time.perf_counter() - t
    gc.collect()
    return {"shards": k, "samples": sum(counts), "seconds": seconds, "mem": delta(memory(), base)}


def child_after(args) -> dict:
    """The sample index, one process: the first sample of every shard, then every record."""
    from trainer.training.data import open_shards, split_reader

    gc.collect()
    base = memory()
    t = time.perf_counter()
    index = split_reader(open_shards(str(args.shards)), "train")
    _first_of_every_shard(index, len(index.counts))
    seconds = time.perf_counter() - t
    gc.collect()
    first = {"mem": delta(memory(), base), "map": index_mapping()}
    t = time.perf_counter()
    _touch_all(index)
    touch = time.perf_counter() - t
    gc.collect()
    return {
        "shards": len(index.counts),
        "samples": len(index),
        "seconds": seconds,
        "first": first,
        "touch_s": touch,
        "all": {"mem": delta(memory(), base), "map": index_mapping()},
    }


def child_after_workers(args) -> dict:
    """after4: the rank opens the data and forks the workers, which read it (`forked_readers`)."""
    from trainer.training.data import open_shards, split_reader

    t = time.perf_counter()
    index = split_reader(open_shards(str(args.shards)), "train")
    opened = time.perf_counter() - t
    got = forked_readers(index, args.workers)
    total = lambda ms: {k: sum(m[k] for m in ms) for k in ms[0]}  # noqa: E731
    return {
        "shards": len(index.counts),
        "samples": len(index),
        "processes": len(got["forked"]),
        "seconds": opened + max(t for t, _ in got["times"]),
        "all_s": opened + max(t for _, t in got["times"]),
        "control": delta(total(got["control"]), total(got["forked"])),
        "mem": delta(total(got["after"]), total(got["control"])),
        "map": total(got["maps"]),
    }


def forked_readers(index, workers: int) -> dict:
    """Fork ``workers`` processes over ``index``. Control phase: each worker does the harness's
    own round trip and nothing else (forking and the queue cost that much by themselves). Then each
    reads one sample of every shard, and every record. -> the memory of the rank and each worker
    after the fork, after the control and after the reads; the index mappings; each worker's
    (first sample of every shard, every record) seconds."""
    ctx = mp.get_context("fork")
    ready, idle, go, results, finish = ctx.Semaphore(0), ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Event()

    def worker():
        ready.release()
        idle.wait()
        results.put((0.0, 0.0))
        go.wait()
        t = time.perf_counter()
        _first_of_every_shard(index, len(index.counts))
        first = time.perf_counter() - t
        _touch_all(index)
        results.put((first, time.perf_counter() - t))
        finish.wait()

    procs = [ctx.Process(target=worker, daemon=True) for _ in range(workers)]
    gc.collect()
    gc.freeze()  # the workers' own collections would copy the parent's heap, whatever the data path does
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        pids = [os.getpid()] + [p.pid for p in procs]
        got = {"forked": [memory(p) for p in pids]}
        idle.set()
        for _ in procs:
            results.get(timeout=600)
        got["control"] = [memory(p) for p in pids]
        go.set()
        got["times"] = [results.get(timeout=600) for _ in procs]
        got["after"], got["maps"] = [memory(p) for p in pids], [index_mapping(p) for p in pids]
    finally:
        finish.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
    return got


def run_child(mode: str, shards: Path, args, limit_shards: int = 0) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--shards",
        str(shards),
        "--workers",
        str(args.workers),
        "--limit-shards",
        str(limit_shards),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def part_b(args, work: Path) -> dict:
    print(
        f"B. index memory and start-up at N = {', '.join(f'{n:,}' for n in args.samples)} "
        f"({args.samples_per_shard} samples per shard)",
        flush=True,
    )
    out = {}
    for n in args.samples:
        t = time.perf_counter()
        shards = synthetic_split(work, n, args.samples_per_shard)
        made = time.perf_counter() - t
        total_shards = -(-n // args.samples_per_shard)
        limit = args.before_shards if 0 < args.before_shards < total_shards else 0
        before = run_child("before", shards, args, limit)
        scale = n / before["samples"]  # 1.0 unless extrapolated
        r = {
            "samples": n,
            "shards": total_shards,
            "write_s": made,
            "before": before,
            "before_scale": scale,
            "after": run_child("after", shards, args),
            "after_workers": run_child("after4", shards, args),
        }
        out[str(n)] = r
        scanned = f" for {before['shards']} of {total_shards} shards" if limit else ""
        print(
            f"  N={n:,}: written in {made:.1f} s; before {before['seconds']:.1f} s{scanned}, "
            f"after {r['after']['seconds']:.2f} s",
            flush=True,
        )
        shutil.rmtree(shards, ignore_errors=True)
    return out


def print_b(results: dict, workers: int) -> None:
    print(
        "\nB. Index memory and start-up, each in a fresh process: start-up = open the split + read the first sample of "
        "every shard; memory = increase after imports: dRSS (counts shared pages in every process), dAnon (Pss_Anon: "
        "the heap), index.npy (PSS of its mappings); B/sample = (dAnon + index.npy) / N\n"
    )
    print("| N | shards | path | start-up s | ms/shard | dRSS MB | dAnon MB | index.npy MB | B/sample |")
    print("|---|---|---|---|---|---|---|---|---|")
    mb = lambda x: f"{x / 2**20:.1f}"  # noqa: E731
    for r in results.values():
        n, shards = r["samples"], r["shards"]
        for name, seconds, rss, anon, mapped in rows_b(r, workers):
            print(
                f"| {n:,} | {shards} | {name} | {seconds:.2f} | {seconds / shards * 1e3:.1f} | {mb(rss)} | {mb(anon)} | "
                f"{mb(mapped) if mapped else '-'} | {(anon + mapped) / n:.1f} |"
            )
    runs = list(results.values())
    if runs:
        print_b_node(runs[-1], workers)
    if len(runs) >= 2:
        print_b_scaling(runs[0], runs[-1], workers)


def rows_b(r: dict, workers: int) -> list[tuple]:
    """One N's table rows: (path, start-up s, dRSS, dAnon, index.npy PSS)."""
    b, a, a4, scale = r["before"], r["after"], r["after_workers"], r["before_scale"]
    est = f", extrapolated from {b['shards']} shards" if scale != 1 else ""
    return [
        (
            f"before: legacy header scan, 1 process{est}",
            b["seconds"] * scale,
            b["mem"]["rss"] * scale,
            b["mem"]["anon"] * scale,
            0,
        ),
        (
            f"before, per node: rank + {workers} workers each scanning (x{workers}, computed)",
            b["seconds"] * scale,
            b["mem"]["rss"] * scale * workers,
            b["mem"]["anon"] * scale * workers,
            0,
        ),
        (
            "after: index, 1 process, first sample/shard",
            a["seconds"],
            a["first"]["mem"]["rss"],
            a["first"]["mem"]["anon"],
            a["first"]["map"]["pss"],
        ),
        (
            "after: index, 1 process, every record touched",
            a["seconds"],
            a["all"]["mem"]["rss"],
            a["all"]["mem"]["anon"],
            a["all"]["map"]["pss"],
        ),
        (
            f"after, per node: rank + {workers} forked workers, every record touched (sum; net of the fork+queue control)",
            a4["seconds"],
            a4["mem"]["rss"],
            a4["mem"]["anon"],
            a4["map"]["pss"],
        ),
    ]


def print_b_node(r: dict, workers: int) -> None:
    """The largest N: bytes per sample per node against the target, start-up against the legacy scan."""
    a4 = r["after_workers"]
    node = (a4["mem"]["anon"] + a4["map"]["pss"]) / r["samples"]
    gross = (a4["mem"]["anon"] + a4["control"]["anon"] + a4["map"]["pss"]) / r["samples"]
    ratio = r["before"]["seconds"] * r["before_scale"] / r["after"]["seconds"]
    print(
        f"\nN={r['samples']:,}: after, rank + {workers} workers: {node:.1f} B/sample/node "
        f"({'<=' if node <= 64 else 'above'} the target 64; {gross:.1f} with the control's {a4['control']['anon'] / 2**20:.1f} MB; index.npy alone {a4['map']['pss'] / r['samples']:.1f}); "
        f"start-up {ratio:,.0f}x faster than one process's legacy scan"
    )


def print_b_scaling(x: dict, y: dict, workers: int) -> None:
    """Smallest N to largest: marginal memory per sample (fixed costs cancel) and start-up per shard."""
    node = lambda r: r["after_workers"]["mem"]["anon"] + r["after_workers"]["map"]["pss"]  # noqa: E731
    scan = lambda r: r["before"]["mem"]["anon"] * r["before_scale"]  # noqa: E731
    dn = y["samples"] - x["samples"]
    slope = (node(y) - node(x)) / dn
    print(
        f"marginal memory {x['samples']:,} -> {y['samples']:,} samples (fixed costs cancel): after, rank + {workers} workers "
        f"{slope:.1f} B/sample/node (target <= 64: {'ok' if slope <= 64 else 'MISSED'}); before {(scan(y) - scan(x)) / dn:.1f} B/sample per process, "
        f"x{workers} workers = {(scan(y) - scan(x)) / dn * workers:.1f} B/sample/node"
    )
    per = lambda r, k: r[k]["seconds"] / r[k]["shards"]  # noqa: E731
    print(
        f"{x['samples']:,} -> {y['samples']:,} samples ({y['shards'] / x['shards']:.0f}x shards): start-up per shard "
        f"after {per(x, 'after') * 1e3:.2f} -> {per(y, 'after') * 1e3:.2f} ms, before {per(x, 'before') * 1e3:.0f} -> "
        f"{per(y, 'before') * 1e3:.0f} ms (before scans {args_per_shard(x)} samples per shard either way)"
    )


def args_per_shard(r: dict) -> int:
    return r["before"]["samples"] // r["before"]["shards"]


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    warnings.filterwarnings(
        "ignore", message="This DataLoader will create"
    )  # --workers above the core count is the point
    if args.child:
        print(json.dumps(child(args)))
        return
    start = time.perf_counter()
    scratch = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench-data-")) if scratch else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; work {work}",
        flush=True,
    )
    results: dict = {"quick": args.quick, "cores": os.cpu_count(), "load_before": os.getloadavg()[0]}
    try:
        if "a" not in args.skip:
            results["a"] = part_a(args, work)
            results["a"]["part_s"] = time.perf_counter() - start
            print(f"  part A: {results['a']['part_s']:.0f} s", flush=True)
        if "b" not in args.skip:
            t = time.perf_counter()
            results["b"] = part_b(args, work)
            print(f"  part B: {time.perf_counter() - t:.0f} s", flush=True)
    finally:
        if scratch:
            shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - start
    if "a" in results:
        print_a(results["a"])
    if "b" in results:
        print_b(results["b"], args.workers)
    results["load_after"] = os.getloadavg()[0]
    print(
        f"\nwall time {results['wall_s']:.0f} s; load average {results['load_before']:.1f} before, {results['load_after']:.1f} after"
    )
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
