"""What the main process records: metrics.jsonl, plots, the run report, wandb, progress bars.

The loop builds one Tracker per process; only the main process's is enabled, so other ranks
stay quiet without `if rank == 0` scattered through the loop. What goes to wandb, and how it
looks there, is trainer/wandb_run.py's business.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from trainer.config import Config
from trainer.plots import plot_confusion, plot_curves
from trainer.rundir import writing
from trainer.wandb_run import TrackingError, WandbRun, wandb_id  # noqa: F401 (the loop and tests import them here)


class Tracker:
    def __init__(self, config: Config, classes: list[str], enabled: bool, resume_step: int | None, dataset):
        self.enabled = enabled
        self.run_dir = Path(config.run.dir)
        self.classes = classes
        self.config = config
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        if resume_step is None:
            self.metrics_path.unlink(missing_ok=True)
        else:  # records past the checkpoint were logged by the killed run: they are about to be redone
            _truncate_records(self.metrics_path, resume_step)
        if config.wandb.mode != "disabled":
            self.wandb = WandbRun(config, classes, dataset, fresh=resume_step is None)

    def progress(self, iterable, total: int, desc: str):
        return tqdm(
            iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None if self.enabled else True
        )  # None: no bar when not a terminal (log files)

    def print(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with writing(self.metrics_path), open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            best = best_eval(read_records(self.metrics_path)) if record["kind"] == "eval" else {}
            self.wandb.log(record, best)

    def log_predictions(self, rows: list[tuple], step: int) -> None:
        """rows: (image HWC uint8 array, true class, predicted class, probability), in the order shown."""
        if self.wandb is not None and rows:
            self.wandb.log_predictions(rows, step)

    def log_model(self, step: int, aliases: list[str], evaluation: dict) -> None:
        """The run dir's weights for `aliases` (best, final) as one model version for `step`."""
        if self.wandb is not None:
            self.wandb.log_model(step, aliases, evaluation)

    def summarize(self, summary: dict) -> None:
        if not self.enabled:
            return
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.wandb is not None:
            self.wandb.summarize(summary)

    def plots(self) -> None:
        if not self.enabled:
            return
        records = read_records(self.metrics_path)
        plot_curves(records, self.run_dir / "curves.png")
        evals = [r for r in records if r["kind"] == "eval"]
        if evals:
            plot_confusion(evals[-1]["confusion"], self.classes, self.run_dir / "confusion.png")

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def best_eval(records: list[dict]) -> dict:
    """The best evaluation so far (the first with the highest top-1, as the loop picks best.safetensors)."""
    evals = [r for r in records if r["kind"] == "eval"]
    if not evals:
        return {}
    best = max(evals, key=lambda r: r["top1"])  # max keeps the first of equals
    return {"best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"]}


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_records(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
