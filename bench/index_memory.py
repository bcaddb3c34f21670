"""The sample index's memory and start-up at N samples, against the legacy per-process tar-header scan.

Tiny samples (cls, a 4-byte jpg, json) written with ShardWriter into one template shard,
hard-linked as every shard of the split (reading is CPU-bound from the page cache either way),
plus the index and a manifest. A fresh process per measurement: "before" (legacy: SplitReader
over SplitFiles.from_paths, which scans each shard's tar headers when first touched) and "after"
(open_shards + split_reader, the memory-mapped index) read one sample of every shard, as a
loader worker does in its first batches under a global shuffle; "after" then touches every
record (as an epoch does), and runs again with --workers forked workers to show that the index
pages are shared. Memory is the increase of RSS, PSS and USS (/proc/<pid>/smaps_rollup), and the
PSS of the index.npy mapping alone (/proc/<pid>/smaps). Target: <= 64 bytes per sample per node;
start-up O(shards). The loader rate from object storage is the other data benchmark,
bench.loader_rate.

    .venv/bin/python -m bench.index_memory            # N = 100,000 and 1,280,000
    .venv/bin/python -m bench.index_memory --quick    # N = 20,000 and 100,000
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.data_run import CLASSES, parser, run

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(
        __doc__,
        "/tmp/bench_index_memory.json",
        quick="smaller sizes: the whole run in under a minute",
        workers="forked workers that read the index, as loader workers do (data.workers)",
    )
    p.add_argument("--samples", help="comma-separated N (default 100000,1280000; quick 20000,100000)")
    p.add_argument("--samples-per-shard", type=int, default=2500)
    p.add_argument(
        "--before-shards",
        type=int,
        help="legacy scans beyond this many shards are extrapolated linearly from this many (default 256, quick 16; 0: scan all)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    p.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--limit-shards", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
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


# -- the split and the measurements -------------------------------------------------------------


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
        source="synthetic (bench.index_memory)",
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
        "-m",
        "bench.index_memory",
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


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    run(args, "b", part_b, lambda results: print_b(results, args.workers))


if __name__ == "__main__":
    main()
