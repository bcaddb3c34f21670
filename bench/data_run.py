"""What the two data benchmarks (bench.loader_rate, bench.index_memory) share: their common
options, and one run in a scratch folder that ends with its tables and a results JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CLASSES = 10  # in both synthetic corpora


def parser(doc: str, out: str, quick: str, workers: str) -> argparse.ArgumentParser:
    """--quick, --out (default ``out``), --workdir and --workers; the caller adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--out", type=Path, default=Path(out), help="write the results here")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a new temp folder, removed at the end)")
    p.add_argument("--workers", type=int, default=4, help=workers)
    return p


def run(args, part: str, measure: Callable[[argparse.Namespace, Path], dict], report: Callable[[dict], None]) -> None:
    """``measure(args, work)`` in the scratch folder, then ``report(its results)``; the results go
    to --out under the key ``part`` ("a" or "b"), beside the cores, the load before and after and
    the wall time."""
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
        results[part] = measure(args, work)
        print(f"  part {part.upper()}: {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        if scratch:
            shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - start
    report(results[part])
    results["load_after"] = os.getloadavg()[0]
    print(
        f"\nwall time {results['wall_s']:.0f} s; load average {results['load_before']:.1f} before, {results['load_after']:.1f} after"
    )
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {args.out}")
