"""Early stopping in real runs (2 gloo processes on the digits): a plateau ends the run before its
last epoch, recorded everywhere a run's ending is; a run SIGKILLed between evaluations resumes
with its count where it was and stops at the same step, bit for bit."""

import json
import signal

import pytest
from safetensors.torch import load_file

from tests.conftest import EXACT, kill_group, run_training, start_training, wait_for
from tests.training.test_resume_e2e import hold_env, records
from tests.wandb_log import segments, summary
from trainer.rundir import read_weights_file

pytestmark = pytest.mark.e2e

# Nothing can improve val top-1 by more than 1: the first evaluation counts, the next two do not.
PLATEAU = ["train.epochs=6", "train.early_stop_patience=2", "train.early_stop_min_delta=1", "wandb.mode=offline"]
STOPPED = "stopped early at epoch 3 of 6: val top-1 has not improved by more than 1 for 2 evaluations"


def test_a_plateau_stops_the_run_early_with_the_reason_recorded(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *PLATEAU]
    result = run_training(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert (
        "early stopping: the run ends once val top-1 has not improved by more than 1 for 2 evaluations "
        "(evaluated every epoch)\n"
    ) in out
    assert "early stop after epoch 3 of 6: val top-1 has not improved by more than 1 for 2 evaluations" in out
    assert "epoch 4/6" not in out
    logged = records(run_dir)
    evals = [r for r in logged if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2, 3] and max(r["epoch"] for r in logged) == 3
    first = f"(last improvement {evals[0]['top1']:.4f} at epoch 1)"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["reason"] == f"{STOPPED} {first}"
    done = json.loads((run_dir / "summary.json").read_text())
    assert (done["stopped_early"], done["stopped_epoch"], done["stop_reason"]) == (True, 3, status["reason"])
    assert f"; stopped early at epoch 3 of 6; run dir {run_dir}" in out  # the done line
    assert f"- {status['reason']}" in (run_dir / "report.md").read_text()
    wandb = summary(segments(run_dir)[-1])["summary"]
    assert (wandb["stopped_early"], wandb["stopped_epoch"]) == (True, 3)
    # best.safetensors stays the best val top-1's evaluation; final.safetensors is the stopped weights
    best = max(evals, key=lambda r: r["top1"])  # the first of equals, as the run picks it
    assert read_weights_file(run_dir / "best.safetensors")[1].evaluation["epoch"] == best["epoch"] == done["best_epoch"]
    assert read_weights_file(run_dir / "final.safetensors")[1].evaluation["epoch"] == 3

    again = run_training(overrides)  # the same command on the completed run
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run {run_dir} is complete: {STOPPED}" in again.stdout
    assert "raise train.early_stop_patience above 2 (0 turns early stopping off)" in again.stdout
    assert json.loads((run_dir / "status.json").read_text()) == status and records(run_dir) == logged


# Evaluations after epochs 2, 4 and 6 of 8; no val loss falls by 10, so the run stops after
# epoch 6 (step 150, 25 steps an epoch), the count at 1 in between: a reset one would train on.
EARLY = [
    *EXACT,
    "train.epochs=8",
    "train.eval_every=2",
    "train.early_stop_patience=2",
    "train.early_stop_metric=loss",
    "train.early_stop_min_delta=10",
]


@pytest.fixture(scope="module")
def stopped_straight(digits_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("early") / "run"
    result = run_training([f"data.shards={digits_shards}", f"run.dir={run_dir}", *EARLY])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "early stopping: the run ends once val loss has not improved by more than 10 for 2 evaluations "
        "(evaluated every 2 epochs); best.safetensors stays the best val top-1"
    ) in result.stdout
    assert "early stop after epoch 6 of 8: val loss has not improved by more than 10 for 2 evaluations" in result.stdout
    return run_dir


def test_a_sigkilled_early_stopping_run_resumes_its_count_and_stops_at_the_same_step(
    digits_shards, stopped_straight, tmp_path
):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *EARLY]
    process = start_training(overrides, **hold_env(release, 110))  # in epoch 5: one evaluation counted as no gain
    try:
        wait_for(lambda: (tmp_path / "release.held").exists(), timeout=300, process=process)
    finally:
        kill_group(process, signal.SIGKILL)
        process.wait(timeout=60)
    resumed = run_training(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'ckpt-000000105'} (epoch 5, step 105)" in resumed.stdout
    assert "early stop after epoch 6 of 8" in resumed.stdout
    expected, got = load_file(stopped_straight / "final.safetensors"), load_file(run_dir / "final.safetensors")
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)  # bit for bit
    assert records(run_dir) == records(stopped_straight)
    assert [r["step"] for r in records(run_dir) if r["kind"] == "eval"] == [50, 100, 150]
    ended = [json.loads((d / "summary.json").read_text()) for d in (stopped_straight, run_dir)]
    assert [(s["stopped_epoch"], s["steps"], s["stop_reason"]) for s in ended] == [
        (6, 150, ended[0]["stop_reason"])
    ] * 2
