"""trainer.compare over run dirs written as the trainer writes them: RunDir's own writers
(config.yaml, metrics.jsonl, summary.json, status.json), run_summary's summary and the
loop's record shapes. No training; the errors go through the real CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from matplotlib.figure import Figure

from trainer.rundir import CONFIG, METRICS, STATUS, SUMMARY, Preprocessing, RunDir
from trainer.runs import compare
from trainer.training.config import load_config, to_yaml
from trainer.training.loop import run_summary
from trainer.training.state import Progress

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["a", "b", "c"]


def train_record(epoch: int, step: int, img_per_s: float) -> dict:
    """The fields trainer/training/loop.py log_train writes."""
    return {
        "kind": "train",
        "epoch": epoch,
        "step": step,
        "loss": 1.0 / step,
        "acc": 0.5,
        "lr": 0.01,
        "img_per_s": img_per_s,
        "epoch_time": 1.0,
        "world_size": 1,
    }


def eval_record(epoch: int, step: int, top1: float, loss: float) -> dict:
    """The fields of trainer/training/loop.py evaluate_and_log's record (trainer/training/metrics.py summarize)."""
    scores = {"precision": top1, "recall": top1, "specificity": top1, "f1": top1}
    return {
        "kind": "eval",
        "epoch": epoch,
        "step": step,
        "num_samples": 30,
        "top1": top1,
        "top5": 1.0,
        "loss": loss,
        "per_class": {name: {**scores, "support": 10} for name in CLASSES},
        "macro": scores,
        "confusion": [[10, 0, 0], [0, 10, 0], [0, 0, 10]],
    }


def make_run(path: Path, overrides: list[str], evals: list[tuple[float, float]], state: str | None, **how) -> RunDir:
    """A run dir after len(evals) epochs of (top1, loss); `state` None leaves no status.json, and a
    run that did not complete gets no summary.json, as finish_run writes it only at the end."""
    config = load_config(REPO / "configs/demo.yaml", [f"run.dir={path}", *overrides])
    run = RunDir(path)
    run.prepare(to_yaml(config), CLASSES, Preprocessing([0.5] * 3, [0.25] * 3, 16, 0.875, 16), resume=False)
    progress = Progress()
    for epoch, (top1, loss) in enumerate(evals, 1):
        for step in (2 * epoch - 1, 2 * epoch):
            run.append_record(train_record(epoch, step, how.get("img_per_s", 100.0)))
        record = eval_record(epoch, 2 * epoch, top1, loss)
        run.append_record(record)
        progress.record_eval(record)
        progress.epoch, progress.step = epoch, 2 * epoch
    if state is not None:
        run.owned = True  # RunDir writes status.json only for the lock holder; none is needed here
        run.set_status("running")
        if state != "running":
            run.set_status(state, how.get("reason"))
    if state == "completed":
        fake = SimpleNamespace(progress=progress, eval_net=torch.nn.Linear(10, 3))
        job = SimpleNamespace(
            accelerator=SimpleNamespace(num_processes=1, device=torch.device("cpu")),
            config=config,
        )
        run.write_json(SUMMARY, run_summary(fake, job, run.records()))
    return run


STOPPED = (
    "stopped early at epoch 2 of 12: val top-1 has not improved for 1 evaluation (last improvement 0.9500 at epoch 1)"
)


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Four runs at different depths: two completed, one running (no summary), one failed."""
    root = tmp_path / "sweep"
    make_run(root / "lr" / "a", ["optim.lr=0.01"], [(0.80, 0.5), (0.90, 0.4), (0.85, 0.45)], "completed")
    make_run(root / "lr" / "b", ["optim.lr=0.001", "model.growth_rate=24"], [(0.95, 0.6), (0.93, 0.3)], "completed")
    make_run(root / "c", ["optim.lr=0.1"], [(0.70, 0.2), (0.60, 0.9)], "running")
    make_run(root / "deep" / "er" / "d", ["optim.lr=1.0"], [(0.20, 2.0)], "failed", reason="NonFiniteError: loss")
    wandb_copy = root / "lr" / "a" / "wandb" / "offline-run-x" / "files"  # wandb's own config.yaml: not a run
    wandb_copy.mkdir(parents=True)
    (wandb_copy / CONFIG).write_text("wandb_version: 1\n")
    return root


def compare_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.compare", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def pick(row: dict, *keys: str) -> list[str]:
    return [row[k] for k in keys]


def test_ranks_runs_best_first_with_the_differing_keys(sweep, capsys):
    assert compare.main([str(sweep)]) == 0
    rows = read_csv(sweep / compare.CSV_NAME)
    assert [r["run"] for r in rows] == ["lr/b", "lr/a", "c", "deep/er/d"]
    header = list(rows[0])
    assert header == ["run", "model.growth_rate", "optim.lr", *compare.COLUMNS]  # no run.dir, no wandb.id
    b, a, c, d = rows
    assert [pick(r, "model.growth_rate", "optim.lr") for r in (b, a)] == [["24", "0.001"], ["12", "0.01"]]
    shown = ("best_top1", "best_epoch", "final_top1", "parameters", "state")
    assert pick(a, *shown) == ["0.9", "2", "0.85", "33", "completed"]  # summary.json's (run_summary's) values
    assert float(a["img_per_s"]) == pytest.approx(100.0)
    # Running: no summary.json, so best and final come from its eval records; parameters not known yet.
    assert pick(c, *shown) == ["0.7", "1", "0.6", "", "running"]
    assert (d["state"], d["note"]) == ("failed", "NonFiniteError: loss")
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == header
    assert [line.split()[0] for line in table[1:5]] == ["lr/b", "lr/a", "c", "deep/er/d"]
    assert len({line.index("completed") for line in table[1:3]}) == 1  # aligned columns


def test_metric_series_and_sweep_file_choose_the_order(sweep, tmp_path):
    assert compare.main([str(sweep), "--metric", "eval/loss"]) == 0  # min over evals, minimized
    rows = read_csv(sweep / compare.CSV_NAME)
    assert [r["run"] for r in rows] == ["c", "lr/b", "lr/a", "deep/er/d"]
    assert [float(r["eval/loss"]) for r in rows] == [0.2, 0.3, 0.4, 2.0]
    spec = tmp_path / "sweep.yaml"
    spec.write_text("program: trainer/main.py\nmethod: grid\nmetric: {name: final_top1, goal: minimize}\n")
    assert compare.main([str(sweep), "--sweep", str(spec), "--out", str(tmp_path / "out")]) == 0
    rows = read_csv(tmp_path / "out" / compare.CSV_NAME)
    assert [r["run"] for r in rows] == ["deep/er/d", "c", "lr/a", "lr/b"]


def test_plot_is_a_png_and_nothing_half_written_is_left(sweep):
    assert compare.main([str(sweep)]) == 0
    assert (sweep / compare.PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in sweep.iterdir()) == sorted(["lr", "c", "deep", compare.CSV_NAME, compare.PLOT_NAME])


def test_the_plot_names_the_best_runs_at_their_points(sweep, monkeypatch):
    metric = compare.Metric("best_top1", "maximize")
    runs = compare.ranked([compare.read_run(p) for p in compare.find_runs([sweep])], metric)
    keys = compare.differing(runs)
    growth, lr = compare.figure(runs, keys, metric).axes[:2]
    assert [ax.get_xlabel() for ax in (growth, lr)] == keys == ["model.growth_rate", "optim.lr"]
    assert sorted(t.get_text() for t in lr.texts) == ["c", "deep/er/d", "lr/a", "lr/b"]  # four lrs: four spots
    assert [t.xy for t in lr.texts if t.get_text() == "lr/b"] == [(0.001, 0.95)]  # beside its own point
    monkeypatch.setattr(compare, "MAX_NAMED", 2)  # many runs: only the best are named, and the title says so
    fig = compare.figure(runs, keys, metric)
    assert sorted(t.get_text() for t in fig.axes[1].texts) == ["lr/a", "lr/b"]
    assert fig.get_suptitle().endswith("names: the best 2")
    by_run = compare.figure(runs, [], metric)  # no setting differs: the axis itself names the runs
    assert len(by_run.axes[0].texts) == 0 and "names" not in by_run.get_suptitle()


def test_runs_at_one_spot_share_a_label_and_long_names_keep_their_end():
    ax = Figure().subplots()
    names = ["a", "b", "c", "sweeps/lr-search/run-0007"]
    compare.draw_panel(ax, ["sgd", "sgd", "sgd", "adamw"], [0.5, 0.5, 0.5, float("nan")], ["completed"] * 4, names)
    assert [t.get_text() for t in ax.texts] == ["a, b +1"]  # a NaN has no place to be named
    assert compare.short_name(names[3]) == "…search/run-0007"  # NAME_CHARS (16) characters


def test_numeric_keys_spanning_more_than_10x_are_on_a_log_axis():
    axes = Figure().subplots(1, 3)
    ys, states = [0.1, 0.2, 0.3], ["completed"] * 3
    compare.draw_panel(axes[0], [0.001, 0.01, 0.1], ys, states)
    compare.draw_panel(axes[1], [12, 24, 12], ys, states)
    compare.draw_panel(axes[2], ["sgd", "adamw", None], ys, states)
    assert [ax.get_xscale() for ax in axes] == ["log", "linear", "linear"]
    assert [t.get_text() for t in axes[2].get_xticklabels()] == ["sgd", "adamw", "-"]


def test_a_run_that_stopped_early_says_why_in_its_note(tmp_path, capsys):
    make_run(tmp_path / "runs" / "e", [], [(0.95, 0.6), (0.93, 0.3)], "completed", reason=STOPPED)
    assert compare.main([str(tmp_path / "runs")]) == 0
    (row,) = read_csv(tmp_path / "runs" / compare.CSV_NAME)
    assert (row["state"], row["note"]) == ("completed", STOPPED)


def test_a_damaged_metrics_line_is_noted_in_its_row_only(sweep):
    path = sweep / "lr" / "a" / METRICS
    lines = path.read_text().splitlines()
    lines.insert(3, '{"kind": "eval", "top1": 0.99, "ep')  # a torn line in the middle
    path.write_text("\n".join(lines) + "\n" + '{"kind": "train", "ste')  # and one still being written
    (sweep / "lr" / "a" / SUMMARY).unlink()
    assert compare.main([str(sweep)]) == 0
    rows = {r["run"]: r for r in read_csv(sweep / compare.CSV_NAME)}
    assert rows["lr/a"]["note"] == f"{METRICS} line 4 damaged (skipped)"
    assert rows["lr/a"]["best_top1"] == "0.9"
    assert [rows[name]["note"] for name in ("lr/b", "c")] == ["", ""]


def test_a_running_status_whose_process_is_gone_is_not_called_running(sweep):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    status = sweep / "c" / STATUS
    value = json.loads(status.read_text())
    status.write_text(json.dumps({**value, "pid": int(gone.stdout)}))
    (sweep / "lr" / "b" / STATUS).unlink()
    assert compare.main([str(sweep)]) == 0
    rows = {r["run"]: r for r in read_csv(sweep / compare.CSV_NAME)}
    assert rows["c"]["state"] == "running?"
    assert f"pid {int(gone.stdout)}" in rows["c"]["note"]
    assert pick(rows["lr/b"], "state", "note") == ["unknown", f"no {STATUS} ({SUMMARY} says training finished)"]


def test_bad_input_is_one_line_and_exit_code_2(sweep, tmp_path):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken" / "r1"
    broken.mkdir(parents=True)
    (broken / CONFIG).write_text("model: [unclosed\n")
    cases = {
        "no run dirs under": [tmp_path / "empty"],
        "unknown metric 'eval/topp1'": [sweep, "--metric", "eval/topp1"],
        f"cannot read {broken / CONFIG}": [tmp_path / "broken"],
    }
    for expected, args in cases.items():
        result = compare_cli(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.stderr
        assert " — " in lines[0]
    assert not (sweep / compare.CSV_NAME).exists()


def test_values_of_the_wrong_type_and_a_config_of_thousands_of_keys_are_not_believed(sweep, capsys):
    """Each was a traceback, or minutes of plotting: files a run did not write as the trainer does."""
    a = sweep / "lr" / "a"
    (a / SUMMARY).write_text(json.dumps({"best_top1": "0.99", "parameters": [1], "img_per_s": {"x": 1}}))
    with open(a / METRICS, "a") as f:
        f.write(json.dumps({**eval_record(9, 99, 0.5, 0.5), "macro": "oops"}) + "\n")
        f.write(json.dumps({"kind": "config_change", "epoch": 1, "step": 2, "changes": {}}) + "\n")
    status = json.loads((sweep / "c" / STATUS).read_text())
    (sweep / "c" / STATUS).write_text(json.dumps({**status, "time": "yesterday", "pid": "x"}))
    config = (sweep / "lr" / "b" / CONFIG).read_text()
    (sweep / "lr" / "b" / CONFIG).write_text(config + "extra:\n" + "".join(f"  k{i}: {i}\n" for i in range(5000)))
    capsys.readouterr()
    assert compare.main([str(sweep), "--metric", "eval/macro_f1"]) == 0
    out = capsys.readouterr().out
    assert "note: 4990 more settings differ between the runs; compare.csv lists them all" in out, out[-2000:]
    rows = {r["run"]: r for r in read_csv(sweep / compare.CSV_NAME)}
    assert rows["lr/a"]["best_top1"] == "0.9" and rows["lr/a"]["note"] == ""  # from the records, not the text
    assert len(rows["lr/b"]) > 5000 and rows["lr/b"]["extra.k4999"] == "4999"
