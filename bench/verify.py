"""What `data.verify` costs at start-up: the size check against sha256 over every byte of the shards.

Writes --gb GB of shard-sized files (random bytes: sha256's cost does not depend on them), then
times, through the trainer's own check (`SplitFiles.check`), each way once with the files in the
page cache (a rerun on the same node) and once evicted from it (posix_fadvise DONTNEED; a first
start after the shards were written elsewhere). Every rank checks the shards of its node alike,
so the wall time of a start-up is one process's.

    python -m bench.verify                  # 10 GB in 256 MB shards
    python -m bench.verify --gb 2           # quicker; the cost is linear in the bytes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from shards.cache import Entry
from shards.source import SplitFiles, sha256_of
from shards.store import Store

SHARD_MB = 256


def write_shards(root: Path, gb: float) -> list[Path]:
    paths, chunk = [], os.urandom(SHARD_MB << 20)
    for i in range(max(1, round(gb * 1024 / SHARD_MB))):
        path = root / f"train-{i:06d}.tar"
        path.write_bytes(chunk[i % 7 :] + chunk[: i % 7])  # distinct files of one size
        paths.append(path)
    return paths


def split_files(root: Path, paths: list[Path]) -> SplitFiles:
    entries = [Entry(sha256_of(p), p.stat().st_size, ".tar", p.name) for p in paths]
    return SplitFiles(Store(str(root)), None, [p.name for p in paths], entries, [1] * len(paths), None, "")


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(files: SplitFiles, checksum: bool) -> float:
    start = time.perf_counter()
    files.check(checksum=checksum)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=10.0, help="bytes of shards to check (default 10 GB)")
    parser.add_argument("--dir", type=Path, help="where to write them (default: a temp folder; the disk matters)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        paths = write_shards(root, args.gb)
        files = split_files(root, paths)
        gb = sum(p.stat().st_size for p in paths) / 1e9
        results = {}
        for cache in ("cold", "warm"):
            for way in ("size", "sha256"):
                if cache == "cold":
                    evict(paths)
                results[f"{way}, {cache}"] = timed(files, way == "sha256")
    print(f"{gb:.1f} GB in {len(paths)} shards of {SHARD_MB} MB; {platform.processor() or platform.machine()}")
    print(f"{'check':<14}{'seconds':>9}{'s per 10 GB':>13}{'GB/s':>8}")
    for name, seconds in results.items():
        rate = f"{gb / seconds:8.2f}" if seconds > 0.01 else f"{'-':>8}"  # a stat per shard: no rate to speak of
        print(f"{name:<14}{seconds:>9.3f}{seconds * 10 / gb:>13.2f}{rate}")
    if args.json:
        args.json.write_text(json.dumps({"gb": gb, "seconds": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
