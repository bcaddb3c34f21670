"""report.md: one page a user without wandb access can open or attach.

Written from the run dir's files alone (config, classes, metrics.jsonl, summary.json, eval/), so
training writes it at its end and `trainer.evaluate` writes it again to list a new evaluation.
"""

from __future__ import annotations

from toolbox.redact import redact
from trainer.rundir import CONFUSION, CURVES, EVAL, REPORT, SUMMARY, TOP_LOSSES, RunDir, best_eval
from trainer.training.config import Config
from trainer.training.metrics import one_line, table_rows


def write_report(run: RunDir, config: Config, classes: list[str], summary: dict) -> None:
    run_dir = run.path
    evals = [r for r in run.records() if r["kind"] == "eval"]
    m, t = config.model, config.train
    lines = [
        f"# Run report: {one_line(config.run.name or run_dir.name)}",
        "",
        "## Setup",
        "",
        f"- model: SE-DenseNet depth {m.depth}{' block_config ' + str(m.block_config) if m.block_config else ''}, "
        f"SE {'on' if m.se else 'off'}, efficient {'on' if m.efficient else 'off'}, "
        f"{summary['parameters']:,} parameters, {len(classes)} classes",
        f"- data: {redact(config.data.shards)}, image size {config.data.image_size}",
        f"- training: {t.epochs} epochs, batch {t.batch_size} x {summary['world_size']} processes x {t.grad_accum} accumulation, "
        f"{config.optim.name} lr {config.optim.lr}, precision {t.mixed_precision}, seed {t.seed}",
        *([_fold_line(summary)] if summary.get("folds") else []),
        "",
        "## Results",
        "",
        f"- best val top-1: {summary['best_top1']:.4f} (epoch {summary['best_epoch']})",
        *([f"- {summary['stop_reason']}"] if summary.get("stop_reason") else []),
        f"- final val top-1: {_fmt(summary['final_top1'])}, top-5: {_fmt(summary['final_top5'])} "
        f"on {summary['num_val_samples']} samples",
    ]
    if summary.get("img_per_s") is not None:
        lines.append(
            f"- throughput: {summary['img_per_s']:,.0f} images/s (mean over logged windows but the first, which holds start-up)"
        )
    if summary.get("startup_s"):
        starts = ", ".join(f"{s:.0f} s" for s in summary["startup_s"])
        lines.append(f"- time to first step (start-up and compilation), per process start: {starts}")
    lines += calibration_lines(evals)
    if evals:
        last = evals[-1]
        lines += [
            "",
            "## Per class (final evaluation)",
            "",
            "| class | precision | recall | specificity | F1 | support |",
            "|---|---|---|---|---|---|",
        ]
        rows = table_rows(last)
        for i, (name, *scores, support) in enumerate(rows):
            name = "**macro**" if i == len(rows) - 1 else markdown_cell(name)
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in scores) + f" | {support} |")
    lines += evaluations(run.evals())
    lines += ["", "## Plots", "", f"![curves]({CURVES})", "", f"![confusion matrix]({CONFUSION})", ""]
    if run.file(TOP_LOSSES).is_file():
        lines += ["The final evaluation's highest-loss wrong predictions (true -> predicted, probability):", ""]
        lines += [f"![top losses]({TOP_LOSSES})", ""]
    run.replace_text(REPORT, "\n".join(lines))


def _fold_line(summary: dict) -> str:
    return (
        f"- k-fold: fold {summary['fold']} of {summary['folds']}: trained on {summary['num_train_samples']} train "
        f"samples, validated on the {summary['num_val_samples']} held out (the val split is not used); "
        "their predictions: heldout.npz"
    )


def calibration_lines(evals: list[dict]) -> list[str]:
    """The temperatures fitted for best.safetensors and final.safetensors, and what they did to the ECE."""
    lines = []
    for weights, record in (("best", best_eval(evals)), ("final", evals[-1] if evals else {})):
        if "temperature" in record:
            lines.append(
                f"- calibration of {weights}.safetensors: temperature {record['temperature']:.3f} (fitted on val, "
                f"epoch {record['epoch']}), ECE {record['ece']:.4f} -> {record['ece_calibrated']:.4f}"
            )
    return lines


def refresh_report(run: RunDir, config: Config, classes: list[str]) -> bool:
    """report.md again, after `trainer.evaluate` wrote an evaluation, for a run that has finished
    (summary.json is there). A run still training lists every evaluation in the report it writes at
    its end. -> whether it was written."""
    summary = run.read_json(SUMMARY)
    if summary is None:
        return False
    write_report(run, config, classes, summary)
    return True


def evaluations(records: dict[str, dict]) -> list[str]:
    """The report's lines for evaluate's outputs (eval/<name>.json): one table row each."""
    if not records:
        return []
    lines = [
        "",
        "## Evaluations (`python -m trainer.evaluate`)",
        "",
        "| output | data | weights | samples | top-1 | top-5 | macro F1 | TTA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in records.items():
        weights = markdown_cell(r.get("checkpoint", "").rsplit("/", 1)[-1])
        lines.append(
            f"| [{markdown_cell(name)}]({EVAL}/{name}.png) | {markdown_cell(str(r.get('data', '')))} | {weights} "
            f"| {r['num_samples']} | {r['top1']:.4f} | {r['top5']:.4f} | {r['macro']['f1']:.4f} | {r.get('tta', 'none')} |"
        )
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def markdown_cell(text: str) -> str:
    """Text as one cell of a Markdown table: its pipes and line breaks would end the cell or the row."""
    return one_line(text).replace("|", "\\|")
