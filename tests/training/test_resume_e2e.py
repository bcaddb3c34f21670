"""Runs killed at any moment resume exactly: real processes, real signals (2 gloo processes)."""

import json
import os
import random
import signal
import time

import pytest
from safetensors.torch import load_file

from tests.conftest import EXACT, kill_group, run_module, run_training, start_training, wait_for, worker_pids
from toolbox import failpoints
from toolbox.errors import EXIT_PREEMPTED
from trainer.training import checkpoint

pytestmark = pytest.mark.e2e

TIMING = {"img_per_s", "epoch_time", "startup_s"}


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def hold_env(release, step: int, **points) -> dict:
    """The trainer's main process holds right after optimizer step `step` (it writes RELEASE.held)
    until `release` exists or it is signalled to stop: a test acts at a known step, not a raced one.
    `points`: the process's other failpoints (one FAILPOINTS value holds them all)."""
    return failpoints.env(hold_after_step=step, release=release, **points)


def test_sigkill_at_a_random_step_then_restart_is_bitwise_identical(digits_shards, uninterrupted, tmp_path):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    kill_at = random.Random(20261122).randint(9, 40)  # 25 steps per epoch: mid-epoch, either epoch
    # The hold comes before step kill_at's own checkpoint: the newest complete one is the last
    # multiple of 7, or the end of epoch 1 (step 25), strictly before kill_at.
    newest = max(s for s in range(1, kill_at) if s % 7 == 0 or s % 25 == 0)
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT]
    process = start_training(overrides, **hold_env(release, kill_at))
    try:
        wait_for(lambda: (tmp_path / "release.held").exists(), timeout=300, process=process)
    finally:
        kill_group(process, signal.SIGKILL)  # while the main process holds after step kill_at
        process.wait(timeout=60)
    assert not (run_dir / "final.safetensors").exists()
    resumed = run_training(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resuming from {run_dir / 'checkpoints' / f'ckpt-{newest:09d}'} (epoch {newest // 25 + 1}, step {newest})"
        in resumed.stdout
    ), resumed.stdout[-3000:]
    expected, got = load_file(uninterrupted / "final.safetensors"), load_file(run_dir / "final.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name].equal(got[name]), name  # bit for bit
    assert records(run_dir) == records(uninterrupted)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT]
    process = start_training(overrides, **failpoints.env(pause_checkpoint=14))
    try:  # the step-14 write stalls after its files and before its marker: kill it there
        wait_for(lambda: (run_dir / "checkpoints/ckpt-000000014.tmp/state.pt").exists(), timeout=300, process=process)
    finally:
        kill_group(process, signal.SIGKILL)
        process.wait(timeout=60)
    path = checkpoint.complete_checkpoints(run_dir / "checkpoints")[-1]
    state, _ = checkpoint.read(path)
    assert path.name == "ckpt-000000007" and state["progress"]["step"] == 7
    resumed = run_training(overrides + ["train.epochs=1"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 7)" in resumed.stdout
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_and_exits_with_the_preempted_code(digits_shards, tmp_path, sig):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    process = start_training([f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT], **hold_env(release, 3))
    try:
        wait_for(lambda: (tmp_path / "release.held").exists(), timeout=300, process=process)
        workers = worker_pids(process.pid)
        assert len(workers) == 2
        for pid in workers:  # as a job scheduler does: every process, the loader workers too
            os.killpg(pid, sig)
        output, _ = process.communicate(timeout=120)
    finally:
        kill_group(process, signal.SIGKILL)
    assert f"exitcode  : {EXIT_PREEMPTED}" in output or process.returncode == EXIT_PREEMPTED, output[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    path = checkpoint.complete_checkpoints(run_dir / "checkpoints")[-1]
    state, _ = checkpoint.read(path)
    # Held after step 3, woken by the signal: the stop is agreed at the next check (every 5 steps).
    assert path.name == "ckpt-000000005" and state["progress"]["step"] == 5
    assert f"checkpoint {path} (epoch 1, step 5)" in output


def test_second_sigterm_exits_at_once(digits_shards, tmp_path):
    run_dir, release = tmp_path / "run", tmp_path / "release"  # never created: the write stays stalled
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT, "train.checkpoint_every=0"]
    process = start_training(overrides, processes=1, **hold_env(release, 1, pause_checkpoint=1))
    try:
        wait_for(lambda: (tmp_path / "release.held").exists(), timeout=300, process=process)
        process.send_signal(signal.SIGTERM)  # the first: checkpoint at the next stop check (step 5)
        wait_for(lambda: (tmp_path / "release.paused").exists(), timeout=300, process=process)
        assert (tmp_path / "release.paused").read_text() == "5"
        time.sleep(1.5)  # past StopFlag.REPEAT_AFTER_S: not an echo (the echo has a unit test in test_runtime.py)
        process.send_signal(signal.SIGTERM)  # deliberate, while the checkpoint write is stalled
        process.wait(timeout=30)
    finally:
        kill_group(process, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM
    assert not checkpoint.complete_checkpoints(run_dir / "checkpoints")  # the stalled write never completed
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


def test_resumed_run_continues_the_same_wandb_run(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    base = [f"data.shards={digits_shards}", f"run.dir={run_dir}", "wandb.mode=offline"]
    assert run_training(base + ["train.epochs=1"], processes=1).returncode == 0
    resumed = run_training(base + ["train.epochs=2"], processes=1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    ids = {path.name.rsplit("-", 1)[1] for path in runs}
    assert len(runs) == 2 and len(ids) == 1  # one wandb run, two offline segments that `wandb sync` joins


# Progressive resizing (8 px in epoch 1, 12 in epoch 2), validation at 16 with flips, each sample
# twice per epoch: every schedule here is a function of the epoch, so a resume is still exact.
FASTER = [
    "data.image_size=12",
    "data.min_size=8",
    "data.size_step=4",
    "data.ramp_epochs=[0,1]",
    "data.val_size=16",
    "data.aug_repeats=2",
    "train.eval_tta=flip",
]


@pytest.fixture(scope="module")
def faster(digits_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faster") / "run"
    result = run_training([f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT, *FASTER])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout


def test_progressive_resizing_and_aug_repeats_resume_bitwise(digits_shards, faster, tmp_path):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT, *FASTER]
    process = start_training(overrides, **hold_env(release, 30))  # mid-epoch 2, at the second size
    try:
        wait_for(lambda: (tmp_path / "release.held").exists(), timeout=300, process=process)
    finally:
        kill_group(process, signal.SIGKILL)
        process.wait(timeout=60)
    resumed = run_training(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'ckpt-000000028'} (epoch 2, step 28)" in resumed.stdout
    expected, got = load_file(faster[0] / "final.safetensors"), load_file(run_dir / "final.safetensors")
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert records(run_dir) == records(faster[0])


def test_the_records_and_preprocessing_say_which_sizes_and_tta_ran(faster):
    run_dir, stdout = faster
    assert "progressive resizing: train crop epoch 1: 8, epoch 2: 12; validation at 16" in stdout
    assert (
        "aug repeats 2: every sample 2 times per epoch, differently augmented (each copy on another process)" in stdout
    )
    logged = records(run_dir)
    train = [r for r in logged if r["kind"] == "train"]
    assert {r["image_size"] for r in train if r["epoch"] == 1} == {8} and {
        r["image_size"] for r in train if r["epoch"] == 2
    } == {12}
    evals = [r for r in logged if r["kind"] == "eval"]
    assert [(r["image_size"], r["tta"], r["num_samples"]) for r in evals] == [(16, "flip", 179)] * 2
    preprocessing = json.loads((run_dir / "preprocessing.json").read_text())
    assert preprocessing["image_size"] == 16 and preprocessing["train_image_size"] == 12
    # evaluate reads the size and the flips back from the run: the last evaluation, exactly
    result = run_module("trainer.evaluate", run_dir, "--checkpoint", "final", "--name", "again")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((run_dir / "eval" / "again.json").read_text())
    assert (again["image_size"], again["tta"]) == (16, "flip")
    assert again["confusion"] == evals[-1]["confusion"] and again["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-6)
