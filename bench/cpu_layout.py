"""Which CPU layout `python -m trainer` should start: N processes x 1 thread or fewer processes with
more threads each, on this machine's usable cores, for the same config.

Each layout trains the same run through the real launcher (`python -m trainer --processes P` with
OMP_NUM_THREADS=T), rounds alternating so that a noisy machine hurts all layouts alike; the rate is the run's mean train img/s (metrics.jsonl, the first record left out). The global
batch is the per-process batch x P, as in any DDP run, so this times the layout, not the recipe.

    python -m bench.cpu_layout                                   # the demo model at 16 px and at 64 px
    python -m bench.cpu_layout --sizes 32 --rounds 3 train.batch_size=16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from toolbox.cores import usable_cores
from trainer.rundir import RunDir, mean_throughput

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--sizes", default="16,64", help="comma-separated data.image_size values")
    parser.add_argument("--rounds", type=int, default=2, help="runs per layout, alternating")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args, rest = parser.parse_known_args()
    args.overrides = rest
    return args


def layouts(cores: int) -> list[tuple[int, int]]:
    """(processes, threads each) to compare: all cores as threads of one process, one thread per
    process on every core, halfway, and one process with one thread (a core left to its loader)."""
    return sorted({(p, cores // p) for p in (1, max(cores // 2, 1), cores)} | {(1, 1)})


def run_once(args: argparse.Namespace, shards: Path, work: Path, layout: tuple[int, int], size: int) -> float:
    processes, threads = layout
    run = work / f"run-{processes}x{threads}-{size}"
    command = [sys.executable, "-m", "trainer", "--config", args.config, "--processes", str(processes)]
    command += [f"data.shards={shards}", f"run.dir={run}", f"data.image_size={size}", f"train.epochs={args.epochs}"]
    command += ["train.log_every=5", "train.resume=false", "wandb.mode=disabled", *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return mean_throughput(RunDir(run).records())


def main() -> int:
    args = parse_args()
    cores = usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = work / "shards"
        subprocess.run([sys.executable, "-m", "launch.make_shards", "--demo", str(shards)], cwd=REPO, check=True)
        results = {}
        for size in map(int, args.sizes.split(",")):
            rates: dict[tuple[int, int], list[float]] = {layout: [] for layout in layouts(cores)}
            for _ in range(args.rounds):
                for layout in rates:
                    rates[layout].append(run_once(args, shards, work, layout, size))
            results[size] = {f"{p}x{t}": statistics.median(r) for (p, t), r in rates.items()}
    print(f"| image size | processes x threads | img/s | vs 1 x {cores} |")
    print("|---|---|---|---|")
    for size, by_layout in results.items():
        for layout, rate in by_layout.items():
            print(f"| {size} | {layout.replace('x', ' x ')} | {rate:.0f} | {rate / by_layout[f'1x{cores}']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "img_per_s": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
