"""Evaluate's rate beside training's, on an idle and a busy CPU, with torch's default threads and
with the threads trainer.evaluate and trainer.predict now choose (toolbox.cores.torch_threads).

evaluate: the model's forward in eval mode without gradients, what trainer.evaluate runs per
batch; train: forward, backward and an AdamW step. Busy: two other processes spin on the cores
(started by this bench and stopped by pid). Other work on a shared machine moves every number, so
each round measures the two thread counts back to back and the table gives the medians and the
ratio of each round's pair, not absolute rates alone.

    python -m bench.threads                              # the demo model at 28 px, batch 64
    python -m bench.threads --rounds 5 --seconds 4 --json threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from toolbox.cores import torch_threads
from trainer.training.build import build_model
from trainer.training.config import load_config

REPO = Path(__file__).resolve().parent.parent
SPIN = "while True: pass"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--size", type=int, default=28, help="image side (default: 28)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="back-to-back pairs per row (default: 3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed per measurement (default: 3)")
    parser.add_argument("--burners", type=int, default=2, help="spinning processes for busy (default: 2)")
    parser.add_argument("--workers", type=int, help="evaluate's loader workers (default: the config's data.workers)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def steps(config, size: int, batch: int) -> dict[str, Callable[[], None]]:
    """mode -> one batch of it, on the demo model."""
    model = build_model(config, 10)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            model(images)

    def train() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(images), labels).backward()
        optimizer.step()

    return {"evaluate": evaluate, "train": train}


def rate(step: Callable[[], None], threads: int, batch: int, seconds: float) -> float:
    torch.set_num_threads(threads)
    step()  # warm-up at this thread count
    start, done = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds or done < 1:
        step()
        done += 1
    return done * batch / elapsed


def start_burners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]


def stop_burners(burners: list[subprocess.Popen]) -> None:
    for p in burners:  # by pid: only what this bench started
        p.kill()
        p.wait()


def measure(args, modes, default: int, chosen: int) -> list[dict]:
    rows = []
    for load in ("idle", "busy"):
        burners = start_burners(args.burners) if load == "busy" else []
        try:
            time.sleep(0.5 if burners else 0)  # the burners up to speed
            for mode, step in modes.items():
                pairs = []
                for _ in range(args.rounds):
                    pairs.append(tuple(rate(step, t, args.batch, args.seconds) for t in (default, chosen)))
                rows.append(row(load, mode, default, chosen, pairs))
                print(rows[-1], flush=True)
        finally:
            stop_burners(burners)
    return rows


def row(load: str, mode: str, default: int, chosen: int, pairs: list[tuple[float, float]]) -> dict:
    return {
        "load": load,
        "mode": mode,
        "default_threads": default,
        "chosen_threads": chosen,
        "default_img_s": statistics.median(p[0] for p in pairs),
        "chosen_img_s": statistics.median(p[1] for p in pairs),
        "ratio": statistics.median(p[1] / p[0] for p in pairs),
        "pairs": pairs,
    }


def table(rows: list[dict]) -> str:
    out = [
        "| machine | mode | default threads: img/s | chosen threads: img/s | chosen / default (median of pairs) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['load']} | {r['mode']} | {r['default_threads']}: {r['default_img_s']:.0f} | "
            f"{r['chosen_threads']}: {r['chosen_img_s']:.0f} | {r['ratio']:.2f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(REPO / args.config, [f"data.image_size={args.size}"])
    workers = config.data.workers if args.workers is None else args.workers
    default = torch.get_num_threads()  # torch's own choice at start-up (OMP_NUM_THREADS when set)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # what evaluate chooses without it
    chosen, why = torch_threads(None, workers, 1, env)
    print(f"default threads {default}, chosen {chosen} ({why})", flush=True)
    rows = measure(args, steps(config, args.size, args.batch), default, chosen)
    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "size": args.size,
        "batch": args.batch,
        "why": why,
    }
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
