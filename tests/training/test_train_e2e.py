"""The real `accelerate launch --num_processes 2` on CPU (gloo), end to end."""

import hashlib
import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shards.manifest import Manifest
from tests import wandb_log
from tests.conftest import run_training
from trainer.trained.load import load_trained
from trainer.training.build import build_model
from trainer.training.config import config_from_dict
from trainer.training.data import EvalOrder, ShardDataset, make_loader, open_shards, split_reader
from trainer.training.metrics import EvalSums, summarize
from trainer.training.model import load_weights
from trainer.training.transforms import EvalPreset, normalization

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained_run(digits_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train") / "run"
    result = run_training(
        [f"data.shards={digits_shards}", f"run.dir={run_dir}", "train.epochs=2", "wandb.mode=offline"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_run_directory_is_complete(trained_run):
    run_dir, _ = trained_run
    for name in [
        "config.yaml",
        "classes.json",
        "metrics.jsonl",
        "curves.png",
        "confusion.png",
        "best.safetensors",
        "final.safetensors",
        "report.md",
        "summary.json",
        "status.json",
    ]:
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "classes.json").read_text()) == [str(d) for d in range(10)]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert list((run_dir / "checkpoints").glob("ckpt-*/COMPLETE"))


def test_both_ranks_trained_and_metrics_fields(trained_run):
    run_dir, result = trained_run
    train = records(run_dir, "train")
    assert train and all(r["world_size"] == 2 for r in train)
    assert "2 process(es)" in result.stdout + result.stderr
    for field in ["epoch", "step", "loss", "acc", "lr", "img_per_s", "epoch_time"]:
        assert field in train[-1]
    evals = records(run_dir, "eval")
    assert [e["epoch"] for e in evals] == [1, 2]
    for field in ["num_samples", "top1", "top5", "loss", "per_class", "macro", "confusion"]:
        assert field in evals[-1]
    assert set(evals[-1]["per_class"]["3"]) >= {"precision", "recall", "specificity", "f1"}


def test_a_log_file_shows_progress_and_each_epochs_train_loss_and_time(trained_run):
    run_dir, result = trained_run  # stdout captured: not a terminal, as in a Slurm log
    lines = result.stdout.splitlines()
    progress = re.compile(
        r"epoch (\d)/2  step (\d+)/25  loss \d+\.\d{4}  \d+ img/s  elapsed \S+  ETA epoch \S+, run \S+"
    )
    shown = [tuple(map(int, m.groups())) for m in map(progress.fullmatch, lines) if m]
    assert (1, 5) in shown and (2, 5) in shown, lines  # each epoch's first record (train.log_every=5) at once
    summary = re.compile(
        r"epoch (\d)/2  step \d+  train loss (\d+\.\d{4})  val top-1 .*\(179 samples\)  time \S+(  best)?"
    )
    losses = {int(m[1]): float(m[2]) for m in map(summary.fullmatch, lines) if m}
    assert sorted(losses) == [1, 2], lines
    for epoch, loss in losses.items():  # equal windows of 5 full steps: the epoch's mean is the records' mean
        expected = statistics.mean(r["loss"] for r in records(run_dir, "train") if r["epoch"] == epoch)
        assert loss == pytest.approx(expected, abs=1e-4)


def test_validation_counts_every_sample_exactly_once(trained_run, digits_shards):
    run_dir, _ = trained_run
    expected = Manifest.load(digits_shards).splits["val"].num_samples
    assert expected % 2 == 1  # odd: does not divide by 2 ranks
    for record in records(run_dir, "eval"):
        assert record["num_samples"] == expected
        assert sum(map(sum, record["confusion"])) == expected


def test_exactly_one_offline_wandb_run(trained_run):
    run_dir, _ = trained_run
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))


@pytest.fixture(scope="module")
def wandb_run(trained_run):
    """The trained run as wandb recorded it: (segment, its records, its summary and config)."""
    [segment] = wandb_log.segments(trained_run[0])
    return segment, wandb_log.records(segment), wandb_log.summary(segment)


def test_wandb_has_per_class_tables_and_best_of_summaries(trained_run, wandb_run):
    run_dir, _ = trained_run
    segment, log, state = wandb_run
    evals, trains = records(run_dir, "eval"), records(run_dir, "train")
    rows = wandb_log.history(log)
    for evaluation in evals:
        per_class = wandb_log.table(segment, rows[evaluation["step"]], "eval/per_class")
        assert per_class["columns"] == ["class", "precision", "recall", "specificity", "f1", "support"]
        expected = [[name, *(c[k] for k in per_class["columns"][1:])] for name, c in evaluation["per_class"].items()]
        assert per_class["data"] == expected
        assert "eval/per_class_f1_table.path" in rows[evaluation["step"]]  # the F1 bar chart's data
    # Every series against the step; best-of summaries where the last value says little.
    metrics = wandb_log.of_type(log, "metric")
    prefixes = [
        m["glob_name"].removesuffix("*") for m in metrics if m.get("step_metric") == "step" and "glob_name" in m
    ]
    series = {key.split(".")[0] for row in rows.values() for key in row if not key.startswith("_")} - {"step"}
    assert series and all(key.startswith(tuple(prefixes)) for key in series), series
    summary = state["summary"]
    assert summary["eval/top1"] == {"max": max(e["top1"] for e in evals)}
    assert summary["eval/top5"] == {"max": max(e["top5"] for e in evals)}
    assert summary["eval/loss"] == {"min": min(e["loss"] for e in evals)}
    assert summary["train/loss"] == {"min": pytest.approx(min(t["loss"] for t in trains))}
    best = max(evals, key=lambda e: e["top1"])
    assert (summary["best_top1"], summary["best_top5"], summary["best_epoch"]) == (
        best["top1"],
        best["top5"],
        best["epoch"],
    )
    assert (summary["final_top1"], summary["final_top5"]) == (evals[-1]["top1"], evals[-1]["top5"])
    assert summary["world_size"] == 2 and summary["gpu_count"] == 0 and summary["parameters"] > 0
    assert summary["img_per_s"] > 0 and summary["time_to_first_step_s"] > 0


def test_wandb_config_names_the_data_and_the_run_shows_its_report(trained_run, wandb_run, digits_shards):
    segment, log, state = wandb_run
    dataset = state["config"]["dataset"]
    assert dataset["location"] == str(digits_shards)
    assert dataset["manifest_sha256"] == hashlib.sha256((digits_shards / "manifest.json").read_bytes()).hexdigest()
    assert (dataset["classes"], dataset["train_samples"], dataset["val_samples"], dataset["skipped_files"]) == (
        10,
        1618,
        179,
        0,
    )
    start = wandb_log.history(log)[0]
    for plot in ("data/class_distribution", "data/image_sizes"):  # make_shards' plots, logged once
        assert start[f"{plot}._type"] == "image-file" and (segment / "files" / start[f"{plot}.path"]).is_file()
    assert state["summary"]["data/skipped_files"] == 0


def test_wandb_predictions_show_the_most_confidently_wrong_of_all_ranks_first(trained_run, wandb_run, digits_shards):
    run_dir, _ = trained_run
    segment, log, _ = wandb_run
    last = wandb_log.history(log)[records(run_dir, "eval")[-1]["step"]]
    shown = wandb_log.table(segment, last, "val/predictions")
    assert shown["columns"] == ["image", "true", "predicted", "probability", "correct"]
    logits, labels, classes = val_logits(run_dir / "final.safetensors", digits_shards)  # the whole split, one process
    confidence, predicted = logits.softmax(1).max(1)
    # Wrong ones, most confident first; then right ones, least confident first; wandb.sample_predictions of them.
    outcomes = zip(confidence.tolist(), (predicted == labels).tolist())
    expected = sorted(outcomes, key=lambda o: (o[1], o[0] if o[1] else -o[0]))[:32]
    assert [(row[3], row[4]) for row in shown["data"]] == [(pytest.approx(p, abs=1e-5), right) for p, right in expected]
    assert all((row[1] == row[2]) == row[4] for row in shown["data"])


def test_wandb_model_versions_hold_what_a_run_dir_needs(trained_run, wandb_run, tmp_path):
    run_dir, _ = trained_run
    _, log, _ = wandb_run
    evals = records(run_dir, "eval")
    improved = evals[1]["top1"] > evals[0]["top1"]
    versions = wandb_log.model_versions(log)
    assert [(wandb_log.step_of(v), set(v["aliases"])) for v in versions] == [
        (25, {"best", "step-25", "latest"}),
        (50, {"final", "step-50", "latest"} | ({"best"} if improved else set())),
    ]
    final = versions[-1]
    files = {e["path"] for e in final["manifest"]["contents"]}
    assert files == {"final.safetensors", "config.yaml", "classes.json", "preprocessing.json"} | (
        {"best.safetensors"} if improved else set()
    )
    assert all(
        e["local_path"].startswith(str(run_dir / "wandb" / "artifacts" / "staging"))
        for e in final["manifest"]["contents"]
    )
    fetched = wandb_log.fetch(final, tmp_path / "fetched")
    assert (fetched / "final.safetensors").read_bytes() == (run_dir / "final.safetensors").read_bytes()
    assert load_trained(fetched, "final").classes == [str(d) for d in range(10)]


def val_logits(path: Path, digits_shards: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The exported weights at `path` over the whole val split on one process: logits, labels, classes."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    config, classes = config_from_dict(json.loads(metadata["config"])), json.loads(metadata["classes"])
    model = build_model(config, len(classes))
    load_weights(model, path)
    manifest = Manifest.load(digits_shards)
    mean, std = normalization(config.data, manifest.mean, manifest.std)
    dataset = ShardDataset(
        split_reader(open_shards(str(digits_shards)), "val"),
        EvalPreset(config.data.image_size, config.data.crop_pct, mean, std),
    )
    loader = make_loader(dataset, EvalOrder(len(dataset), 64, 0, 1), workers=0, pin_memory=False)
    model.eval()
    with torch.no_grad():
        batches = [(model(images), labels) for images, labels, _, _ in loader]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), classes


def test_exported_weights_reproduce_logged_top1_on_one_process(trained_run, digits_shards):
    run_dir, _ = trained_run
    evals = records(run_dir, "eval")
    best = max(evals, key=lambda r: r["top1"])
    for name, expected in [("best", best), ("final", evals[-1])]:
        logits, labels, classes = val_logits(run_dir / f"{name}.safetensors", digits_shards)
        sums = EvalSums.zeros(len(classes), "cpu")
        sums.add(logits, labels)
        record = summarize(sums, classes)
        assert record["confusion"] == expected["confusion"], name
        assert record["top1"] == expected["top1"]


def test_optional_features_train_together(digits_shards, tmp_path):
    """EMA, mixup/cutmix, accumulation, clipping, balanced sampling, SGD, auto-augment, efficient
    mode, decoding on the device: one real run."""
    run_dir = tmp_path / "run"
    result = run_training(
        [
            f"data.shards={digits_shards}",
            f"run.dir={run_dir}",
            "train.epochs=1",
            "wandb.mode=disabled",
            "train.ema=true",
            "train.ema_decay=0.9",
            "data.mixup_alpha=0.2",
            "data.cutmix_alpha=1.0",
            "train.grad_accum=2",
            "optim.grad_clip=1.0",
            "data.balance=sampler",
            "optim.name=sgd",
            "data.auto_augment=trivialaugment",
            "model.drop_rate=0.1",
            "model.efficient=true",
            "data.decode=device",
        ],
        processes=1,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evals = records(run_dir, "eval")
    assert evals[-1]["weights"] == "ema" and evals[-1]["num_samples"] == 179
    assert records(run_dir, "train")[-1]["step"] == 1618 // 32 // 2  # optimizer steps, not batches


def test_compiled_efficient_training_resumes_with_its_compiled_kernels(digits_shards, tmp_path):
    """train.compile with model.efficient and model.shared_bn: inductor compiles the selectively
    checkpointed layers on shared normalisations,
    the kernels land in the run dir, and a resumed process finds every one of them there."""
    run_dir = tmp_path / "run"
    overrides = [
        f"data.shards={digits_shards}",
        f"run.dir={run_dir}",
        "wandb.mode=disabled",
        "train.compile=default",
        "model.efficient=true",
        "model.shared_bn=true",
    ]
    first = run_training([*overrides, "train.epochs=1"], processes=1, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "context_fn is passed" not in first.stderr
    graphs = run_dir / "compile_cache" / "fxgraph"
    compiled = sorted(p.relative_to(graphs) for p in graphs.rglob("*") if p.is_file())
    assert compiled, "no compiled graph in the run dir"

    second = run_training([*overrides, "train.epochs=2"], processes=1, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.relative_to(graphs) for p in graphs.rglob("*") if p.is_file()) == compiled  # all hits
    starts = [r for r in records(run_dir, "train") if "startup_s" in r]
    assert [r["epoch"] for r in starts] == [1, 2]  # one per process: time to its first step
    assert records(run_dir, "eval")[-1]["epoch"] == 2
