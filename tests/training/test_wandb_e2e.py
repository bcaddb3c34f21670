"""One small run in two process starts (the second resumes it), then trainer.export: one wandb
run, every model version once, and the export attached to it; read back with wandb's reader."""

import json

import pytest
from safetensors import safe_open

from tests import wandb_log
from tests.conftest import run_module, run_training
from trainer.trained.load import load_trained
from trainer.training.config import wandb_id

pytestmark = pytest.mark.e2e


def test_a_resumed_run_and_its_export_add_to_one_wandb_run_without_repeats(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    base = [f"data.shards={digits_shards}", f"run.dir={run_dir}", "wandb.mode=offline"]
    first = run_training(base + ["train.epochs=1"], processes=1)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_training(base + ["train.epochs=2"], processes=1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    export = run_module("trainer.export", run_dir, "--format", "onnx", timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    assert f"wandb: exported-model-{wandb_id(run_dir)} attached to the training run (offline" in export.stdout

    segments = wandb_log.segments(run_dir)
    logs = [wandb_log.records(segment) for segment in segments]
    assert len(logs) == 3  # two training starts and the export: one run, as `wandb sync` will join them
    assert {wandb_log.of_type(log, "run")[0]["run_id"] for log in logs} == {wandb_id(run_dir)}

    # One version per evaluated step: 50 (epoch 1, the first start's end) and 100; none logged twice.
    versions = [v for log in logs for v in wandb_log.model_versions(log)]
    assert [wandb_log.step_of(v) for v in versions] == [50, 100]
    assert {"best", "final"} <= set(versions[0]["aliases"]) and "final" in versions[1]["aliases"]
    best = next(v for v in reversed(versions) if "best" in v["aliases"])  # where the alias ends up
    fetched = wandb_log.fetch(best, tmp_path / "best-of-run")  # "the best model of run X", as a run dir
    trained = load_trained(fetched)  # what evaluate, predict and export start from
    with safe_open(str(trained.weights), "pt") as f:
        assert json.loads(f.metadata()["eval"])["step"] == wandb_log.step_of(best)
    assert (fetched / "best.safetensors").read_bytes() == (run_dir / "best.safetensors").read_bytes()

    [exported] = wandb_log.model_versions(logs[2], "exported-model")
    assert exported["name"] == f"exported-model-{wandb_id(run_dir)}" and "best" in exported["aliases"]
    assert {e["path"] for e in exported["manifest"]["contents"]} == {"model.onnx", "model.json"}
    assert json.loads(exported["metadata"])["parity"]["onnx"]["samples"] == 16
