"""Progressive resizing against a fixed train size: the real trainer, one run of each, same
config, shards and machine, run one after the other in this one call.

    python -m bench.resize --device cpu --images 1200 --epochs 4 --min-size 64 --size 128      # CPU
    python -m bench.resize --device cuda --images 12000 --epochs 4 --min-size 160 --size 224 \\
        train.compile=reduce-overhead                                                             # GPU

Each run is `accelerate launch trainer/main.py` (1 process) for --epochs epochs on synthetic
ImageNet-like JPEG shards (bench.train's), the ramp run with data.min_size=--min-size and the
default ramp (to full size at 80% of the epochs). Per epoch: the train crop side and the train
time (the epoch's last train record's epoch_time, evaluation excluded; both runs validate at
full size). The ratio is ramp / fixed of the summed epoch times: what the ramp saves in training
time at equal epochs. It says nothing about accuracy (see README "Faster to accuracy").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.train import synthetic_shards
from toolbox.testing import accelerate_launch
from trainer.rundir import RunDir
from trainer.training.config import normalize_overrides

REPO = Path(__file__).resolve().parent.parent

CPU_MODEL = [  # a small SE-DenseNet with the ImageNet stem: CPU-sized, the same data path
    "model.block_config=[2,2,2]",
    "model.growth_rate=12",
    "model.num_init_features=24",
    "train.mixed_precision=no",
    "train.channels_last=false",
    "train.compile=none",  # pass train.compile=default to see what one compile per size costs
    "train.batch_size=32",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/densenet121-imagenet.yaml")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--images", type=int, default=1200, help="images in the synthetic corpus")
    parser.add_argument("--shards", help="make_shards output to train on instead (needs a val split)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=128, help="data.image_size (and the validation size)")
    parser.add_argument("--workers", type=int, default=2, help="data.workers")
    parser.add_argument("--work", help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", help="write the results here")
    args, rest = parser.parse_known_args()
    args.overrides = normalize_overrides(rest)  # the rest: overrides for both runs
    return args


def train(args, shards: Path, run_dir: Path, extra: list[str]) -> list[dict]:
    """One run; -> per epoch {epoch, image_size, seconds}."""
    overrides = [
        *(CPU_MODEL if args.device == "cpu" else []),
        *args.overrides,
        *extra,
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        f"data.image_size={args.size}",
        f"data.workers={args.workers}",
        f"train.epochs={args.epochs}",
        f"train.device={args.device}",
        "train.log_every=10",
        "train.resume=false",
        "wandb.mode=disabled",
    ]
    launch = accelerate_launch(REPO / "trainer/main.py", ["--config", args.config, *overrides])
    env = {"ACCELERATE_USE_CPU": "true"} if args.device == "cpu" else {}
    subprocess.run(launch, cwd=REPO, check=True, env={**os.environ, **env})
    last = {}
    for record in RunDir(run_dir).records():
        if record["kind"] == "train":
            last[record["epoch"]] = record  # the epoch's last record: its whole train time
    return [{"epoch": e, "image_size": r["image_size"], "seconds": r["epoch_time"]} for e, r in sorted(last.items())]


def main() -> None:
    args = parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-resize-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = Path(args.shards) if args.shards else synthetic_shards(work, args.images)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    fixed = train(args, shards, work / "fixed", [])
    ramp = train(args, shards, work / "ramp", [f"data.min_size={args.min_size}"])
    total_fixed, total_ramp = (sum(e["seconds"] for e in run) for run in (fixed, ramp))
    print(f"\n{args.epochs} epochs, {args.images} images, {args.device}, {started}")
    print("| epoch | fixed size | fixed s | ramp size | ramp s | ramp / fixed |")
    print("|---|---|---|---|---|---|")
    for a, b in zip(fixed, ramp):
        print(
            f"| {a['epoch']} | {a['image_size']} | {a['seconds']:.1f} | {b['image_size']} | {b['seconds']:.1f} "
            f"| {b['seconds'] / a['seconds']:.2f}x |"
        )
    print(f"| all | | {total_fixed:.1f} | | {total_ramp:.1f} | {total_ramp / total_fixed:.2f}x |")
    if args.json:
        result = {"fixed": fixed, "ramp": ramp, "ratio": total_ramp / total_fixed, "args": vars(args), "date": started}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
