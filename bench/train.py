"""End-to-end training throughput against the model-only step rate and the loader alone.

Three numbers from one run, same config, same machine:
  loader      the train DataLoader alone (read shards, decode, augment, move to the device), for
              each data.decode (workers, device) and each --loader-workers count
  model-only  the training step on a synthetic batch already on the device (no loader)
  end-to-end  the real `accelerate launch trainer/main.py` (1 process), from its metrics.jsonl
The ratios say whether the loop and the loader cost anything: end-to-end / model-only should be
>= 0.9 when loader / model-only >= 1.

    python -m bench.train --synthetic 20000 --config configs/densenet121-imagenet.yaml  # GPU
    python -m bench.train --device cpu --synthetic 400 --config configs/densenet121-imagenet.yaml \
        model.block_config=[2,2] data.image_size=64 train.batch_size=16 data.workers=2        # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from shards.source import ShardSource
from toolbox.testing import accelerate_launch
from trainer.rundir import RunDir
from trainer.training.build import build_model
from trainer.training.config import load_config, normalize_overrides
from trainer.training.data import build_loaders, open_shards
from trainer.training.loop import train_inputs
from trainer.training.optim import make_optimizer, param_groups
from trainer.training.runtime import resolve_launch
from trainer.training.transforms import normalization

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/densenet121-imagenet.yaml")
    parser.add_argument("--shards", help="a make_shards OUT folder (default: make synthetic JPEG shards)")
    parser.add_argument("--synthetic", type=int, default=20000, help="images in the synthetic corpus")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50, help="timed steps for loader and model-only")
    parser.add_argument(
        "--loader-workers",
        default=None,
        help="comma-separated worker counts for the loader rows (default: the config's data.workers)",
    )
    parser.add_argument(
        "--no-end-to-end", dest="end_to_end", action="store_false", help="skip the accelerate launch run"
    )
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", help="write the results here")
    # the rest, in order, are overrides in any form trainer/main.py takes (--optim.lr 0.1 too)
    args, rest = parser.parse_known_args()
    args.overrides = normalize_overrides(rest)
    return args


def synthetic_shards(work: Path, n: int) -> Path:
    """ImageNet-like JPEGs (400-640 x 300-500, tens to hundreds of KB) through the real make_shards."""
    from bench.make_shards import make_corpus

    out = work / f"shards-{n}"
    if not (out / "manifest.json").exists():
        src = make_corpus(work, n, unique=min(n, 2000))
        subprocess.run(
            [sys.executable, "-m", "launch.make_shards", str(src), str(out), "--overwrite"], cwd=REPO, check=True
        )
    return out


def loader_rate(config, dataset: ShardSource, device: str, steps: int) -> float:
    """Batches/s of the real train loader and device stages (decode when data.decode=device, normalise)."""
    mean, std = normalization(config.data, dataset.manifest.mean, dataset.manifest.std)
    loaders = build_loaders(config, dataset, mean, std, 0, 1, device.startswith("cuda"))
    inputs = train_inputs(config, loaders, dataset.manifest, (mean, std), torch.device(device), 1)
    loader, iterator = loaders.train, iter(loaders.train)

    def next_batch() -> int:
        images, labels, _, _ = next(iterator)
        _, labels, _ = inputs.load(images, labels, 0, torch.device(device))
        return len(labels)

    for _ in range(min(5, steps)):  # workers start, first batches
        next_batch()
    _sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        seen += next_batch()
    _sync(device)
    rate = seen / (time.perf_counter() - start)
    del iterator, loader, loaders, inputs  # stops the workers before the next measurement
    return rate


def model_rate(config, num_classes: int, device: str, steps: int) -> float:
    model = build_model(config, num_classes).to(device)
    if config.train.compile != "none":
        model = torch.compile(model, mode=config.train.compile)
    optimizer = make_optimizer(param_groups(model, config.optim), config.optim)
    size, batch = config.data.image_size, config.train.batch_size
    images = torch.randn(batch, 3, size, size, device=device)
    if config.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.mixed_precision)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)

    def step():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(10):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def end_to_end_rate(
    config_path: str, overrides: list[str], shards: Path, work: Path, device: str
) -> tuple[float, float, float]:
    """Median img/s of the logged windows after the first (start-up, compile), the whole run's
    wall time, and the trainer's own time to its first step (compile included)."""
    run_dir = work / "run"
    shutil.rmtree(run_dir / "compile_cache", ignore_errors=True)  # a cold start, like a new run's
    args = [
        "--config",
        config_path,
        *overrides,
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "train.epochs=1",
        "train.log_every=10",
        "train.resume=false",
        "wandb.mode=disabled",
        f"train.device={'cpu' if device == 'cpu' else 'cuda'}",
    ]
    start = time.perf_counter()
    subprocess.run(accelerate_launch(REPO / "trainer/main.py", args), cwd=REPO, check=True)
    total = time.perf_counter() - start
    records = RunDir(run_dir).records()
    trains = [r for r in records if r["kind"] == "train"]
    rates = [r["img_per_s"] for r in trains][1:-1]  # drop warm-up and the short last window
    return statistics.median(rates), total, trains[0]["startup_s"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    shards = Path(args.shards) if args.shards else synthetic_shards(work, args.synthetic)
    overrides = [*args.overrides, f"data.shards={shards}", f"run.dir={work / 'run'}"]
    config = load_config(args.config, overrides)
    # None: no / none, as in the end-to-end run, which launches without a precision or compile of its own
    launch = resolve_launch(config.train, {})
    config = replace(
        config, train=replace(config.train, mixed_precision=launch.mixed_precision, compile=launch.compile)
    )
    dataset = open_shards(str(shards), config.data)
    manifest = dataset.manifest
    workers = [int(w) for w in args.loader_workers.split(",")] if args.loader_workers else [config.data.workers]
    loaders = {}
    for decode in ("workers", "device"):
        for n in workers:
            variant = load_config(args.config, [*overrides, f"data.decode={decode}", f"data.workers={n}"])
            loaders[f"loader, decode={decode}, {n} workers"] = loader_rate(variant, dataset, args.device, args.steps)
            print(f"{list(loaders)[-1]}: {loaders[list(loaders)[-1]]:,.0f} img/s", flush=True)
    results = {"loaders": loaders, "model_only": model_rate(config, len(manifest.classes), args.device, args.steps)}
    rows = dict(loaders, **{"model-only": results["model_only"]})
    if args.end_to_end:
        e2e = end_to_end_rate(args.config, args.overrides, shards, work, args.device)
        results["end_to_end"], results["end_to_end_wall_s"], results["time_to_first_step_s"] = e2e
        rows[f"end-to-end (decode={config.data.decode}, {config.data.workers} workers)"] = results["end_to_end"]
    results.update(
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        torch=torch.__version__,
        batch=config.train.batch_size,
        image_size=config.data.image_size,
        precision=config.train.mixed_precision,
        compile=config.train.compile,
        train_samples=manifest.splits["train"].num_samples,
    )
    print(
        f"\n{results['device']}, torch {results['torch']}, batch {results['batch']}, {results['image_size']} px, "
        f"precision {results['precision']}, compile {results['compile']}"
    )
    print("| measure | img/s | vs model-only |\n|---|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:,.0f} | {rate / results['model_only']:.2f}x |")
    if args.end_to_end:
        print(
            f"time to the first step (compile included): {results['time_to_first_step_s']:.0f} s; "
            f"whole run {results['end_to_end_wall_s']:.0f} s"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
