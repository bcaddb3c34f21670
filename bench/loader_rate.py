"""Loader rate from object storage against local disk.

Synthetic JPEG shards through the real make_shards, once to a local folder and once to s3:// on
moto's S3 server on loopback (toolbox.testing `s3_server`, run in a child process so its request
threads do not share the bench's GIL). One epoch of the train split at a time through the real
DataLoader path (build_loaders' train order + make_loader, --workers workers, batch --batch) with
a dataset that only reads each sample's bytes (`SplitReader.read`, no decode), so the numbers
are the data path's, not JPEG decoding's. Each loader runs two epochs (persistent workers):
local disk (read in place); s3 with a fresh cache folder and no limit (epoch 1 cold, epoch 2
warm); s3 with a cache limit below the split (shard-block order, prefetcher). "plain download"
is the same shard files fetched one after another with the same client (`Store.download`) into
a temp folder. Targets: cold >= 0.9x plain download (MB/s), warm >= 0.95x local (samples/s).
The sample index's memory and start-up are the other data benchmark, bench.index_memory.

    .venv/bin/python -m bench.loader_rate            # 8,000 images
    .venv/bin/python -m bench.loader_rate --quick    # 2,000 images
"""

from __future__ import annotations

import gc
import io
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.data_run import CLASSES, parser, run

REPO = Path(__file__).resolve().parents[1]

MB = 1e6
BUCKET = "bench"
S3_OUT = f"s3://{BUCKET}/data"


def parse_args(argv=None):
    p = parser(
        __doc__,
        "/tmp/bench_loader_rate.json",
        quick="smaller sizes: the whole run in about a minute",
        workers="loader workers (data.workers)",
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, help="images in the corpus (default 8000, quick 2000)")
    p.add_argument("--image-size", type=int, default=256, help="side of the JPEGs in px (noisy: ~10-50 KB each at 256)")
    p.add_argument("--min-shards", type=int, default=16, help="make_shards --min-shards")
    p.add_argument(
        "--limit-fraction",
        type=float,
        default=0.4,
        help="cache limit / train split bytes (at least 4x the largest shard)",
    )
    args = p.parse_args(argv)
    if args.images is None:
        args.images = 2000 if args.quick else 8000
    return args


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


def serve(conn) -> None:
    """The moto S3 server, in this child process: its environment goes back over ``conn``, and
    it serves until the bench closes its end of the pipe."""
    from toolbox.testing import s3_server

    with s3_server() as (_server, env):
        conn.send(env)
        try:
            conn.recv()
        except EOFError:
            pass


@contextmanager
def moto_process():
    """`serve` in a spawned process (a fresh interpreter: none of the bench's threads or
    imports); -> its environment. Stopped at the end: the pipe closes, then by pid if it hangs."""
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child_conn,), name="moto-s3", daemon=True)
    proc.start()
    child_conn.close()
    try:
        if not conn.poll(120):
            raise SystemExit("the moto S3 server did not start")
        try:
            env = conn.recv()
        except EOFError:
            raise SystemExit("the moto S3 server did not start") from None
        yield env
    finally:
        conn.close()
        proc.join(timeout=15)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()


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

    start = time.perf_counter()
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
    result["part_s"] = time.perf_counter() - start
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


def main() -> None:
    args = parse_args()
    warnings.filterwarnings(
        "ignore", message="This DataLoader will create"
    )  # --workers above the core count is the point
    run(args, "a", part_a, print_a)


if __name__ == "__main__":
    main()
