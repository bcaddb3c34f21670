"""Sharding throughput and peak memory: make_shards (1 worker, all workers) against the plain
loop a user writes by hand (torchvision ImageFolder + webdataset.ShardWriter, decoding every
image to validate it), side by side on one synthetic corpus, in one run.

    python -m bench.make_shards                         # 5,000 files; RSS also at 50,000
    python -m bench.make_shards --files 2000 --rss-files 0 --workdir /tmp/b
    python -m bench.make_shards --near-duplicates --files 5000   # the scan with and without phash

The corpus: ImageNet-like JPEGs, about 500x375 (400..640 x 300..500), textures from smooth
to grainy and quality 75..95, so files run from tens of KB to a few hundred KB; 100 classes.
It is generated once per size under --workdir and reused; the larger RSS corpus reuses the
generated images with a distinct trailer after the JPEG end marker (unique bytes, a real
decode each), since generating 50,000 takes longer than sharding them. Each contender runs as a fresh
subprocess; files/s is files / wall time from start to exit (imports included); peak RSS is
the largest sum over the process and all its descendants, sampled every 50 ms, of RSS (counts
pages shared by forked workers once per process) and of PSS (splits them).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = 100

PLAIN_LOOP = r"""
import io, sys
import torchvision, webdataset as wds
from PIL import Image
src, out = sys.argv[1], sys.argv[2]
ds = torchvision.datasets.ImageFolder(src)
skipped = 0
with wds.ShardWriter(f"{out}/train-%06d.tar", maxsize=256e6, verbose=0) as sink:
    for i, (path, target) in enumerate(ds.samples):
        with open(path, "rb") as f:
            data = f.read()
        try:  # the same validation: a full decode to RGB
            img = Image.open(io.BytesIO(data))
            img.load()
            img.convert("RGB")
        except Exception:
            skipped += 1
            continue
        sink.write({"__key__": f"{i:08d}", "jpg": data, "cls": target})
print(len(ds.samples) - skipped, "written", skipped, "skipped")
"""


def _one_image(args: tuple[int, str]) -> int:
    i, path = args
    rng = np.random.default_rng(i)
    w, h = int(rng.integers(400, 641)), int(rng.integers(300, 501))
    coarse = rng.integers(0, 256, (int(rng.integers(3, 24)), int(rng.integers(3, 24)), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.int16)
    amp = int(rng.choice([2, 8, 16, 30, 60]))  # from smooth to grainy: tens of KB to a few hundred
    if amp:
        img = img + rng.integers(-amp, amp + 1, (h, w, 3), dtype=np.int16)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    Path(path).write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_corpus(root: Path, n: int, unique: int) -> Path:
    """n JPEGs in 100 class folders; the first ``unique`` are generated, the rest copy one of
    them with a distinct trailer after the JPEG end marker (decoders ignore it), so every file
    has its own bytes and costs a real decode, without minutes of generating."""
    src = root / f"corpus-{n}-{unique}"
    done = src / ".complete"
    if done.exists():
        return src
    shutil.rmtree(src, ignore_errors=True)
    for c in range(CLASSES):
        (src / f"class_{c:03d}").mkdir(parents=True)
    path = lambda i: src / f"class_{i % CLASSES:03d}" / f"img_{i:06d}.jpg"  # noqa: E731
    t = time.perf_counter()
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:
        sizes = pool.map(_one_image, [(i, str(path(i))) for i in range(min(n, unique))], chunksize=64)
    for i in range(unique, n):
        path(i).write_bytes(path(i % unique).read_bytes() + f"copy {i}".encode())
    print(
        f"  corpus of {n} JPEGs ({min(n, unique)} generated): {sum(sizes) * n / len(sizes) / 1e6:.0f} MB, "
        f"{min(sizes) // 1000}-{max(sizes) // 1000} KB, median {int(np.median(sizes)) // 1000} KB "
        f"({time.perf_counter() - t:.0f} s to make)",
        flush=True,
    )
    done.touch()
    return src


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of ``pid`` and all its descendants. RSS counts pages shared by
    forked workers once per process; PSS splits them, so it is what the tree really holds."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    rss = pss = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Rss:", "Pss:")):
                        kb = int(line.split()[1]) * 1024
                        rss, pss = (rss + kb, pss) if line.startswith("Rss:") else (rss, pss + kb)
        except OSError:
            continue
    return rss, pss


def measure(cmd: list[str]) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = _tree_memory(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.05)
    wall = time.perf_counter() - t
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return {"seconds": wall, "peak_rss_mb": peak_rss / 2**20, "peak_pss_mb": peak_pss / 2**20}


def run_all(root: Path, n: int, workers: int, repeat: int) -> dict[str, dict]:
    """Each contender ``repeat`` times, interleaved (so a noisy neighbour hits all alike);
    the median time and the largest peak memory of the runs."""
    src = make_corpus(root, n, n)
    py = sys.executable
    contenders = {
        "plain loop (ImageFolder + ShardWriter, 1 process)": lambda out: [py, "-c", PLAIN_LOOP, str(src), str(out)],
        "make_shards --workers 1": lambda out: [py, "-m", "launch.make_shards", str(src), str(out), "--workers", "1"],
        f"make_shards --workers {workers}": lambda out: [
            py,
            "-m",
            "launch.make_shards",
            str(src),
            str(out),
            "--workers",
            str(workers),
        ],
    }
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, cmd in contenders.items():
            out = root / "out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            runs[name].append(measure(cmd(out)))
    shutil.rmtree(root / "out", ignore_errors=True)
    results = {}
    for name, rs in runs.items():
        seconds = float(np.median([r["seconds"] for r in rs]))
        r = {
            "seconds": seconds,
            "files_per_s": n / seconds,
            "all_seconds": [r["seconds"] for r in rs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "peak_pss_mb": max(r["peak_pss_mb"] for r in rs),
        }
        results[name] = r
        print(
            f"  {n} files  {name:52s} {r['files_per_s']:7.0f} files/s  {seconds:6.1f} s (median of {repeat})  "
            f"peak RSS {r['peak_rss_mb']:6.0f} MB (PSS {r['peak_pss_mb']:4.0f} MB)",
            flush=True,
        )
    return results


def near_duplicates_cost(root: Path, n: int, workers: int, repeat: int) -> dict[str, float]:
    """make_shards with near-duplicates grouped (the default) and off, interleaved, on the same
    corpus: median seconds per 10,000 images each (the difference is the phash in the scan
    plus the pair search)."""
    src = make_corpus(root, n, n)
    seconds: dict[str, list[float]] = {"group": [], "off": []}
    for _ in range(repeat):
        for mode in seconds:
            out = root / "out"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "launch.make_shards", str(src), str(out), "--workers", str(workers)]
            seconds[mode].append(measure([*cmd, "--near-duplicates", mode])["seconds"])
    shutil.rmtree(root / "out", ignore_errors=True)
    per_10k = {mode: float(np.median(s)) * 10_000 / n for mode, s in seconds.items()}
    for mode, s in seconds.items():
        print(
            f"  --near-duplicates {mode:5s}: {per_10k[mode]:6.1f} s per 10,000 images (runs: {', '.join(f'{x:.1f}' for x in s)} s)"
        )
    print(f"  cost of the near-duplicate search: {per_10k['group'] / per_10k['off'] - 1:+.0%}")
    return per_10k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=5000)
    p.add_argument(
        "--rss-files",
        type=int,
        default=50000,
        help="second, larger corpus for the RSS check (0: skip); files past --files reuse their bytes plus a trailer",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs of each contender at --files (median time)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_make_shards"))
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--near-duplicates", action="store_true", help="only time make_shards with --near-duplicates group and off"
    )
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"load average before: {os.getloadavg()[0]:.1f}; python {platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; workers={args.workers}",
        flush=True,
    )
    if args.near_duplicates:
        results = {
            "files": args.files,
            "seconds_per_10k": near_duplicates_cost(args.workdir, args.files, args.workers, args.repeat),
        }
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return
    results = {
        "files": args.files,
        "workers": args.workers,
        "runs": run_all(args.workdir, args.files, args.workers, args.repeat),
    }
    plain = results["runs"]["plain loop (ImageFolder + ShardWriter, 1 process)"]["files_per_s"]
    ours = results["runs"][f"make_shards --workers {args.workers}"]["files_per_s"]
    one = results["runs"]["make_shards --workers 1"]["files_per_s"]
    print(
        f"  make_shards --workers {args.workers} / plain loop: {ours / plain:.2f}x (target >= 1.7x); "
        f"/ make_shards --workers 1: {ours / one:.2f}x"
    )
    if args.rss_files:
        src = make_corpus(args.workdir, args.rss_files, args.files)
        out = args.workdir / "out"
        shutil.rmtree(out, ignore_errors=True)
        big = measure([sys.executable, "-m", "launch.make_shards", str(src), str(out), "--workers", str(args.workers)])
        shutil.rmtree(out, ignore_errors=True)
        small = results["runs"][f"make_shards --workers {args.workers}"]
        results["rss"] = {"files": args.rss_files, **big, "files_per_s": args.rss_files / big["seconds"]}
        for kind in ("rss", "pss"):
            a, b = small[f"peak_{kind}_mb"], big[f"peak_{kind}_mb"]
            print(
                f"  peak {kind.upper()}, make_shards --workers {args.workers}: {args.files} files {a:.0f} MB, "
                f"{args.rss_files} files {b:.0f} MB ({b / a - 1:+.0%}; target within 20%)"
            )
        print(f"  {args.rss_files} files: {args.rss_files / big['seconds']:.0f} files/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
