"""Compare runs: the run dirs under the folders given, best first by a metric, as a table, a CSV
and a plot of the metric against every config key that differs between them.

    python -m trainer.compare runs/sweep1 [runs/r7 ...] [--metric best_top1 | --sweep sweep.yaml]

A run dir is a folder with a config.yaml; a folder given may be one or hold them at any depth.
Only the run dirs' files are read (config.yaml, metrics.jsonl, summary.json, status.json), so it
works on a login node and for runs still going: a run without summary.json (running, preempted,
failed) gets its best and final accuracies from its metrics.jsonl eval records.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib.figure import Figure  # not pyplot: no GUI backend or global figure state

from toolbox import lock
from toolbox.cli import add_debug_flag, run_command
from toolbox.csv_cells import SafeWriter
from toolbox.errors import UserError
from toolbox.fonts import setup_fonts
from trainer.rundir import CONFIG, METRICS, STATUS, SUMMARIES, SUMMARY, best_eval, mean_throughput
from trainer.runs.sweep import GOALS, read_metric

MAX_SHOWN_KEYS = 12  # differing settings in the printed table and the plot (the CSV has every one)
MAX_NAMED = 10  # the plot's points labelled with their run's name, the best first: more would hide the points
NAME_CHARS = 16  # a longer run name is shown by its end, where sweeps' names differ
CSV_NAME = "compare.csv"  # written into --out, by default the first folder given
PLOT_NAME = "compare.png"
# Keys that name a run rather than say how it trained: they differ between any two runs.
IDENTITY_KEYS = ("run.dir", "run.name", "wandb.id", "wandb.name")
# What summary.json holds (or the eval records give, for a run without one) -> its default goal.
RUN_VALUES = {
    "best_top1": "maximize",
    "best_top5": "maximize",
    "final_top1": "maximize",
    "final_top5": "maximize",
    "parameters": "minimize",
    "img_per_s": "maximize",
}
STALE_AFTER_S = 3600  # a running run with no record or status for this long may be dead
COLUMNS = ("best_top1", "best_top5", "best_epoch", "final_top1", "parameters", "img_per_s", "state", "note")


@dataclass
class Metric:
    name: str  # best_top1, ... or a series as wandb names it: eval/top1, eval/loss, train/loss
    goal: str  # maximize | minimize


@dataclass
class Run:
    path: Path
    config: dict  # dotted key -> value, as config.yaml says
    values: dict  # the RUN_VALUES keys and best_epoch; None where not known yet
    records: list[dict]
    state: str = "unknown"
    notes: list[str] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="run dirs, or folders holding run dirs at any depth")
    parser.add_argument(
        "--metric",
        help="what to rank by (default best_top1, or the --sweep file's): "
        f"{', '.join(RUN_VALUES)}, or a series as wandb names it (eval/top1, eval/loss, eval/macro_f1, train/loss)",
    )
    parser.add_argument("--goal", choices=GOALS, help="default: the sweep file's, else minimize for losses")
    parser.add_argument("--sweep", type=Path, help="a wandb sweep YAML: its metric.name and metric.goal are used")
    parser.add_argument("--out", type=Path, help=f"where {CSV_NAME} and {PLOT_NAME} go (default: the first folder)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: run(args), args.debug)


def run(args: argparse.Namespace) -> int:
    runs = [read_run(path) for path in find_runs(args.folders)]
    metric = resolve_metric(args.metric, args.goal, args.sweep, runs)
    runs = ranked(runs, metric)
    keys = differing(runs)
    shown = keys[:MAX_SHOWN_KEYS]  # a tampered config.yaml of thousands of keys: a table and plot one can read
    header, rows = table(runs, keys, metric)
    out = args.out or args.folders[0]
    write_atomically(out / CSV_NAME, lambda tmp: tmp.write_text(csv_text(header, rows), encoding="utf-8"))
    write_atomically(out / PLOT_NAME, lambda tmp: plot(runs, shown, metric, tmp))
    try:
        print(format_table(*table(runs, shown, metric)))
        if len(keys) > len(shown):
            print(f"note: {len(keys) - len(shown)} more settings differ between the runs; {CSV_NAME} lists them all")
        print(f"wrote {out / CSV_NAME} and {out / PLOT_NAME}", flush=True)
    except BrokenPipeError:  # `| head`: the reader has what it wanted; the files are written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def find_runs(folders: list[Path]) -> list[Path]:
    """Every run dir under the folders, each once; nothing inside a run dir is searched (its
    wandb/offline-run-*/files/config.yaml is wandb's copy, not another run)."""
    found: dict[Path, None] = {}
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder — pass run dirs or folders that hold them")
        for root, dirs, files in os.walk(folder):
            if CONFIG in files:
                found[Path(root).resolve()] = None
                dirs.clear()
            else:
                dirs.sort()
    if not found:
        names = " ".join(str(f) for f in folders)
        raise UserError(f"no run dirs under {names} (none holds a {CONFIG}) — pass the run.dir of a training run")
    return list(found)


def read_run(path: Path) -> Run:
    notes: list[str] = []
    records, damaged = read_metrics(path / METRICS)
    if damaged:
        shown = ", ".join(map(str, damaged[:3])) + (", ..." if len(damaged) > 3 else "")
        notes.append(f"{METRICS} line {shown} damaged (skipped)")
    summary = read_json(path / SUMMARY, notes)
    run = Run(path, read_config(path / CONFIG), run_values(summary, records), records, notes=notes)
    run.state = run_state(read_json(path / STATUS, notes), path, summary is not None, notes)
    return run


def read_yaml(path: Path, fix: str):
    """A YAML file's content, or one line naming it, why it cannot be read and `fix`."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise UserError(f"cannot read {path} ({why}) — {fix}") from e


def read_config(path: Path) -> dict:
    values = read_yaml(path, "fix or remove that run dir, or leave its folder out")
    if not isinstance(values, dict):
        raise UserError(f"{path} is not a config (not a YAML mapping) — fix or remove that run dir")
    return flatten(values)


def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_metrics(path: Path) -> tuple[list[dict], list[int]]:
    """The good records and the numbers of the damaged lines. An unfinished last line (no newline
    yet) is a record being written by a run still going, not damage."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], []
    lines = text.split("\n")
    records, damaged = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            usable = isinstance(record, dict) and _has_fields(record)
        except ValueError:
            usable = False
        if usable:
            records.append(record)
        elif number < len(lines):  # the last piece has no newline after it
            damaged.append(number)
    return records, damaged


def _has_fields(record: dict) -> bool:
    """What best_eval and mean_throughput read from each kind of record (other kinds, such as a
    resume's config_change, they pass over)."""
    need = {"eval": ("epoch", "top1", "top5"), "train": ("img_per_s",)}.get(record.get("kind"), ())
    return isinstance(record.get("kind"), str) and all(isinstance(record.get(k), (int, float)) for k in need)


def read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        notes.append(f"{path.name} unreadable ({getattr(e, 'strerror', None) or type(e).__name__})")
        return None
    return value if isinstance(value, dict) else None


def run_values(summary: dict | None, records: list[dict]) -> dict:
    """summary.json's values when the run wrote one; else what its records say so far (a running
    run's parameter count is known only at the end)."""
    best = best_eval(records)
    evals = [r for r in records if r["kind"] == "eval"]
    final = evals[-1] if evals else {}
    values = {
        "best_top1": best.get("top1"),
        "best_top5": best.get("top5"),
        "best_epoch": best.get("epoch"),
        "final_top1": final.get("top1"),
        "final_top5": final.get("top5"),
        "parameters": None,
        "img_per_s": mean_throughput(records),
    }
    if summary:  # a number where the trainer writes one; anything else in the file is not believed
        values.update({k: summary[k] for k in values if _number(summary.get(k))})
    return values


def run_state(status: dict | None, path: Path, finished: bool, notes: list[str]) -> str:
    """status.json's state; for a run that says running but looks dead, 'running?' with why."""
    if status is None or status.get("state") not in ("completed", "preempted", "failed", "running"):
        if not (path / STATUS).exists():  # an unreadable one is noted by read_json
            notes.append(f"no {STATUS}" + (f" ({SUMMARY} says training finished)" if finished else ""))
        return "unknown"
    state = status["state"]
    if state in ("failed", "completed") and status.get("reason"):  # a completed one's: it stopped early
        notes.append(str(status["reason"])[:300])
    if state != "running":
        return state
    host, pid = status.get("host"), status.get("pid")
    if host == socket.gethostname() and isinstance(pid, int) and not lock.alive(pid):
        notes.append(f"pid {pid} on {host} is gone (killed?)")
        return "running?"
    quiet = time.time() - _last_activity(path, status)
    if quiet > STALE_AFTER_S:
        notes.append(f"no record for {quiet / 3600:.1f} h (on {host})")
        return "running?"
    return state


def _last_activity(path: Path, status: dict) -> float:
    try:
        written = (path / METRICS).stat().st_mtime
    except OSError:
        written = 0.0
    return max(written, status["time"] if _number(status.get("time")) else 0.0)


def resolve_metric(name: str | None, goal: str | None, sweep: Path | None, runs: list[Run]) -> Metric:
    """--metric and --goal win over the sweep file's; then the goal a name implies."""
    sweep_metric = read_metric(sweep) if sweep else {}
    name = name or sweep_metric.get("name") or "best_top1"
    goal = goal or sweep_metric.get("goal") or RUN_VALUES.get(name)
    if name not in RUN_VALUES and not any(name in scalars(r) for run in runs for r in run.records):
        raise UserError(
            f"unknown metric {name!r} (no run dir records it) — use one of {', '.join(RUN_VALUES)}, or a series "
            f"of {METRICS} as wandb names it: eval/top1, eval/loss, eval/macro_f1, train/loss, ..."
        )
    if goal is None:
        goal = "minimize" if "loss" in name else "maximize"
    return Metric(name, goal)


def scalars(record: dict) -> dict:
    """A record's numbers as wandb names them: eval/top1, eval/macro_f1, train/loss, ..."""
    kind = record["kind"]
    flat = {f"{kind}/{k}": v for k, v in record.items() if _number(v) and k != "step"}
    macro = record.get("macro")
    flat.update({f"{kind}/macro_{k}": v for k, v in (macro if isinstance(macro, dict) else {}).items() if _number(v)})
    return flat


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_value(run: Run, metric: Metric) -> float | None:
    """A run value, or a series' wandb summary: max or min where the trainer declares one, else the last."""
    if metric.name in RUN_VALUES:
        return run.values[metric.name]
    series = [s[metric.name] for s in map(scalars, run.records) if metric.name in s]
    if not series:
        return None
    how = SUMMARIES.get(metric.name)
    return max(series) if how == "max" else min(series) if how == "min" else series[-1]


def ranked(runs: list[Run], metric: Metric) -> list[Run]:
    """Best first; runs without a value yet last; ties in path order."""
    sign = -1 if metric.goal == "maximize" else 1

    def key(run: Run):
        value = metric_value(run, metric)
        return (value is None or math.isnan(value), 0 if value is None else sign * value, str(run.path))

    return sorted(runs, key=key)


def differing(runs: list[Run]) -> list[str]:
    """The dotted config keys whose values are not the same in every run, in config order."""
    keys = list(dict.fromkeys(k for run in runs for k in run.config if k not in IDENTITY_KEYS))
    return [k for k in keys if len({json.dumps(run.config.get(k), sort_keys=True) for run in runs}) > 1]


def run_names(runs: list[Run]) -> list[str]:
    """Each run's path relative to their common root (one run: its folder's name)."""
    paths = [run.path for run in runs]
    root = Path(os.path.commonpath(paths))
    if root in paths:
        root = root.parent
    return [str(p.relative_to(root)) for p in paths]


def table(runs: list[Run], keys: list[str], metric: Metric) -> tuple[list[str], list[list]]:
    extra = [] if metric.name in COLUMNS else [metric.name]
    header = ["run", *keys, *extra, *COLUMNS]
    rows = []
    for name, run in zip(run_names(runs), runs):
        shown = {**run.values, "state": run.state, "note": "; ".join(run.notes)}
        rows.append(
            [
                name,
                *(run.config.get(k) for k in keys),
                *(metric_value(run, metric) for _ in extra),
                *(shown[c] for c in COLUMNS),
            ]
        )
    return header, rows


def cell(value) -> str:
    """A value as the table shows it; the CSV keeps full precision."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"  # a learning rate of 3e-5 stays 3e-05
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return value if isinstance(value, str) else json.dumps(value)


def format_table(header: list[str], rows: list[list]) -> str:
    text = [header] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(line[i]) for line in text) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in text)


def csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = SafeWriter(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v if isinstance(v, str) or _number(v) else json.dumps(v) for v in row])
    return buffer.getvalue()


def write_atomically(path: Path, write) -> None:
    """write(tmp) fills a .tmp beside path, renamed when complete: an older file stays until then."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a second compare into the same folder writes its own
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot(runs: list[Run], keys: list[str], metric: Metric, out: Path) -> None:
    figure(runs, keys, metric).savefig(out, dpi=100, format="png")


def figure(runs: list[Run], keys: list[str], metric: Metric) -> Figure:
    """One small panel per differing key, the metric on y, the best runs' points named; with no key
    differing, one panel by run (its axis names them)."""
    names = run_names(runs)
    panels = [(k, [run.config.get(k) for run in runs]) for k in keys] or [("run", names)]
    setup_fonts(any(not str(v).isascii() for v in names) or any(not str(v).isascii() for _, xs in panels for v in xs))
    ys = [metric_value(run, metric) for run in runs]
    states = [run.state for run in runs]
    cols = min(len(panels), 4)
    fig = Figure(figsize=(3.6 * cols, 3.0 * math.ceil(len(panels) / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    labels = [name if i < MAX_NAMED else None for i, name in enumerate(names)]  # runs come best first
    for ax, (key, xs) in zip(axes, panels):
        draw_panel(ax, xs, ys, states, labels if keys else None)
        ax.set(xlabel=key, ylabel=metric.name)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    named = f"; names: the best {MAX_NAMED}" if keys and len(runs) > MAX_NAMED else ""
    fig.suptitle(f"{metric.name} ({metric.goal}), {len(runs)} runs; hollow: not completed{named}")
    return fig


def draw_panel(ax, xs: list, ys: list, states: list[str], names: list[str | None] | None = None) -> None:
    """Numbers on a linear axis, or a log one when they span more than 10x; anything else as categories.
    Each point with a name gets it beside it, in small type; runs at one spot share one label."""
    names = names or [None] * len(xs)
    shown = [(x, y, s, n) for x, y, s, n in zip(xs, ys, states, names) if y is not None]
    numeric = all(_number(x) for x in xs)
    if numeric:
        positive = [x for x in xs if x > 0]
        if len(positive) == len(xs) and max(positive) > 10 * min(positive):
            ax.set_xscale("log")
    else:
        labels = list(dict.fromkeys(cell(x) for x in xs))
        ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0, fontsize=8)
        ax.set_xlim(-0.5, len(labels) - 0.5)
    spots: dict[tuple, list[str]] = {}
    for x, y, state, name in shown:
        at = x if numeric else labels.index(cell(x))
        done = state == "completed"
        ax.scatter([at], [y], s=30, edgecolors="C0", facecolors="C0" if done else "none")
        if name is not None and math.isfinite(at) and math.isfinite(y):  # no place for a NaN's name
            spots.setdefault((at, y), []).append(short_name(name))
    name_points(ax, spots)
    ax.grid(alpha=0.3)


def name_points(ax, spots: dict[tuple, list[str]]) -> None:
    """Each spot's run names beside it in small type: two, then a count; on its left near the right edge."""
    ax.margins(y=0.12)  # room above the top point for its name
    ax.autoscale_view()
    for spot, here in spots.items():
        text = ", ".join(here[:2]) + (f" +{len(here) - 2}" if len(here) > 2 else "")
        right = ax.transAxes.inverted().transform(ax.transData.transform(spot))[0] > 0.6  # named on its left
        ax.annotate(
            text,
            spot,
            xytext=(-4 if right else 4, 3),
            textcoords="offset points",
            ha="right" if right else "left",
            fontsize=7,
            alpha=0.8,
        )


def short_name(name: str) -> str:
    return name if len(name) <= NAME_CHARS else "…" + name[1 - NAME_CHARS :]
