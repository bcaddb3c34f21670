"""What the main process records: metrics.jsonl, plots, the run report, wandb, progress bars.

The loop builds one Tracker per process; only the main process's is enabled, so other ranks
stay quiet without `if rank == 0` scattered through the loop. What goes to wandb, and how it
looks there, is trainer/training/tracking/wandb_run.py's business.
"""

from __future__ import annotations

import torch

from toolbox.cli import Console, progress_bar
from trainer.rundir import CONFUSION, CURVES, SUMMARY, TOP_LOSSES, Preprocessing, RunDir, WeightsInfo, best_eval
from trainer.training.config import Config, to_dict
from trainer.training.tracking.plots import plot_confusion, plot_curves, plot_top_losses
from trainer.training.tracking.report import write_report
from trainer.training.tracking.wandb_run import WandbRun


class Tracker:
    def __init__(
        self,
        config: Config,
        run: RunDir,
        classes: list[str],
        preprocessing: Preprocessing,  # what the weights files carry: written once, at start-up
        console: Console,
        resume_step: int | None,
        dataset,
    ):
        self.enabled = console.speaks
        self.run = run
        self.classes = classes
        self.preprocessing = preprocessing
        self.config = config
        self.wandb = None
        if not self.enabled:
            return
        self.run.keep_records(resume_step)
        if config.wandb.mode != "disabled":
            self.wandb = WandbRun(config, classes, dataset, fresh=resume_step is None)

    def bar(self, iterable, total: int, desc: str):
        return progress_bar(iterable, total, desc, self.enabled)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.run.append_record(record)
        if self.wandb is not None:
            best = best_eval(self.run.records()) if record["kind"] == "eval" else {}
            self.wandb.log(record, {f"best_{k}": best[k] for k in ("top1", "top5", "epoch")} if best else {})

    def log_config_change(self, epoch: int, step: int, changes: dict[str, tuple]) -> None:
        """A resume with changed settings: a record in metrics.jsonl, and the changes in wandb's config
        (which holds this start's values already)."""
        if not self.enabled:
            return
        changed = {key: {"from": old, "to": new} for key, (old, new) in changes.items()}
        self.run.append_record({"kind": "config_change", "epoch": epoch, "step": step, "changes": changed})
        if self.wandb is not None:
            self.wandb.log_config_change(step, changed)

    def log_predictions(self, rows: list[tuple], step: int) -> None:
        """rows: (image HWC uint8 array, true class, predicted class, probability), in the order shown."""
        if self.wandb is not None and rows:
            self.wandb.log_predictions(rows, step)

    def log_model(self, step: int, aliases: list[str], evaluation: dict) -> None:
        """The run dir's weights for `aliases` (best, final) as one model version for `step`."""
        if self.wandb is not None:
            self.wandb.log_model(step, aliases, evaluation)

    def save_weights(self, alias: str, net: torch.nn.Module, evaluation: dict | None) -> None:
        """best or final weights into the run dir, with what they are and how to preprocess for them."""
        if not self.enabled:
            return
        tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items() if k != "n_averaged"}
        info = WeightsInfo(
            config=to_dict(self.config),
            classes=self.classes,
            fingerprint=net.fingerprint(),
            preprocessing=self.preprocessing,
            evaluation={k: evaluation[k] for k in ("epoch", "step", "top1", "top5", "num_samples")}
            if evaluation
            else None,
            temperature=evaluation.get("temperature") if evaluation else None,
        )
        self.run.write_weights(alias, tensors, info)

    def top_losses(self, rows: list[tuple]) -> None:
        """top_losses.png: rows as log_predictions takes them, the highest loss first."""
        if self.enabled:
            plot_top_losses(rows, self.run.file(TOP_LOSSES), "highest-loss wrong predictions (final evaluation)")

    def summarize(self, summary: dict) -> None:
        if not self.enabled:
            return
        self.run.write_json(SUMMARY, summary)
        if self.wandb is not None:
            self.wandb.summarize(summary)

    def plots(self) -> None:
        if not self.enabled:
            return
        records = self.run.records()
        plot_curves(records, self.run.file(CURVES))
        evals = [r for r in records if r["kind"] == "eval"]
        if evals:
            plot_confusion(evals[-1]["confusion"], self.classes, self.run.file(CONFUSION))

    def write_report(self, summary: dict) -> None:
        if self.enabled:
            write_report(self.run, self.config, self.classes, summary)

    def finish(self, preempted: bool = False) -> None:
        if self.wandb is not None:
            self.wandb.finish(preempted)
            self.wandb = None
