"""The real `accelerate launch --num_processes 2` on CPU (gloo), end to end."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shards.manifest import Manifest
from tests.conftest import run_training
from trainer.config import config_from_dict
from trainer.data import EvalOrder, ShardDataset, make_loader, open_shards, split_index
from trainer.main import build_model
from trainer.metrics import EvalSums, summarize
from trainer.model import load_weights
from trainer.transforms import EvalPreset, normalization

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


def test_exported_weights_reproduce_logged_top1_on_one_process(trained_run, digits_shards):
    run_dir, _ = trained_run
    evals = records(run_dir, "eval")
    best = max(evals, key=lambda r: r["top1"])
    for name, expected in [("best", best), ("final", evals[-1])]:
        path = run_dir / f"{name}.safetensors"
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        config, classes = config_from_dict(json.loads(metadata["config"])), json.loads(metadata["classes"])
        model = build_model(config, len(classes))
        load_weights(model, path)
        manifest = Manifest.load(digits_shards)
        mean, std = normalization(config.data, manifest.mean, manifest.std)
        dataset = ShardDataset(
            split_index(open_shards(str(digits_shards)), "val"),
            EvalPreset(config.data.image_size, config.data.crop_pct, mean, std),
        )
        loader = make_loader(dataset, EvalOrder(len(dataset), 64, 0, 1), workers=0, pin_memory=False)
        sums = EvalSums.zeros(len(classes), "cpu")
        model.eval()
        with torch.no_grad():
            for images, labels, _, _ in loader:
                sums.add(model(images), labels)
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
