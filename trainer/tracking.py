"""What the main process records: metrics.jsonl, plots, the run report, wandb, progress bars.

The loop builds one Tracker per process; only the main process's is enabled, so other ranks
stay quiet without `if rank == 0` scattered through the loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from shards.store import redact_text
from trainer.config import Config, to_dict
from trainer.plots import plot_confusion, plot_curves
from trainer.rundir import writing


class Tracker:
    def __init__(self, config: Config, classes: list[str], enabled: bool, resume_step: int | None):
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
            self.wandb = _init_wandb(config)

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
            self.wandb.log(_wandb_view(record, self.classes), step=record["step"])

    def log_predictions(self, rows: list[tuple], step: int) -> None:
        """rows: (image HWC uint8 array, true class, predicted class, probability)."""
        if self.wandb is None or not rows:
            return
        import wandb

        table = wandb.Table(columns=["image", "true", "predicted", "probability"])
        for image, true, predicted, prob in rows:
            table.add_data(wandb.Image(image), true, predicted, prob)
        self.wandb.log({"val/predictions": table}, step=step)

    def summarize(self, summary: dict) -> None:
        if not self.enabled:
            return
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.wandb is not None:
            self.wandb.summary.update(summary)

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


def wandb_id(run_dir: Path) -> str:
    """Stable per run directory, so a resumed or requeued run continues the same wandb run."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


class TrackingError(RuntimeError):
    """wandb could not start (one-line message)."""


def _init_wandb(config: Config):
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return _start_wandb(wandb, config)
    except Exception as e:  # no login, no network, a bad entity: say so before any training
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(
            f"wandb ({config.wandb.mode}) could not start: {first} — use wandb.mode=offline and `wandb sync` later, "
            "or wandb.mode=disabled"
        ) from None


def _start_wandb(wandb, config: Config):
    run_dir = Path(config.run.dir)
    argv = sys.argv
    sys.argv = [redact_text(arg) for arg in argv]  # wandb records the command line: no URL token goes with it
    try:
        return _init(wandb, config, run_dir)
    finally:
        sys.argv = argv


def _init(wandb, config: Config, run_dir: Path):
    return wandb.init(
        project=config.wandb.project,
        entity=config.wandb.entity,
        name=config.wandb.name or config.run.name or run_dir.name,
        group=config.wandb.group,
        id=config.wandb.id or wandb_id(run_dir),
        tags=list(config.wandb.tags),
        dir=str(run_dir),
        mode=config.wandb.mode,
        resume="allow",
        config=to_dict(config),
    )


def _wandb_view(record: dict, classes: list[str]) -> dict:
    """Flat scalars for charts; the confusion matrix as wandb's plot."""
    kind = record["kind"]
    view = {f"{kind}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    if "macro" in record:
        view.update({f"{kind}/macro_{k}": v for k, v in record["macro"].items()})
    if "confusion" in record:
        import wandb

        view[f"{kind}/confusion"] = wandb.plot.confusion_matrix(
            y_true=[t for t, row in enumerate(record["confusion"]) for p, n in enumerate(row) for _ in range(n)],
            preds=[p for t, row in enumerate(record["confusion"]) for p, n in enumerate(row) for _ in range(n)],
            class_names=classes,
        )
    return view


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
