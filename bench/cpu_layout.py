"""Which CPU layout `python -m trainer` should start: N processes x 1 thread or fewer processes with
more threads each, on this machine's usable cores, for the same config.

Each layout trains the same run through the real launcher (`python -m trainer --processes P`, which
gives each process cores // P threads), rounds alternating so that a noisy machine hurts all layouts
alike; the rate is the run's mean train img/s (metrics.jsonl, the first record left out). The global
batch is the per-process batch x P, as in any DDP run, so this times the layout, not the recipe.

    python -m bench.cpu_layout                                   # the demo model at 16 px and at 64 px
    python -m bench.cpu_layout --sizes 32 --rounds 3 train.batch_size=16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.rundir import RunDir, mean_throughput
from trainer.training.launcher import usable_cores

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


def layouts(cores: int) -> list[int]:
    """The process counts to compare: 1 (all cores as threads), cores (one thread each), and halfway."""
    return sorted({1, max(cores // 2, 1), cores})


def run_once(args: argparse.Namespace, shards: Path, work: Path, processes: int, size: int) -> float:
    run = work / f"run-{processes}-{size}"
    command = [sys.executable, "-m", "trainer", "--config", args.config, "--processes", str(processes)]
    command += [f"data.shards={shards}", f"run.dir={run}", f"data.image_size={size}", f"train.epochs={args.epochs}"]
    command += ["train.log_every=5", "train.resume=false", "wandb.mode=disabled", *args.overrides]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
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
            rates: dict[int, list[float]] = {p: [] for p in layouts(cores)}
            for _ in range(args.rounds):
                for processes in rates:
                    rates[processes].append(run_once(args, shards, work, processes, size))
            results[size] = {p: statistics.median(r) for p, r in rates.items()}
    print(f"| image size | layout (processes x threads) | img/s | vs 1 x {cores} |")
    print("|---|---|---|---|")
    for size, by_layout in results.items():
        for processes, rate in by_layout.items():
            ratio = rate / by_layout[1]
            print(f"| {size} | {processes} x {max(cores // processes, 1)} | {rate:.0f} | {ratio:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "img_per_s": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
