"""Runs killed at any moment resume exactly: real processes, real signals (2 gloo processes)."""
import json
import os
import random
import signal
import time

import pytest
from safetensors.torch import load_file

from tests.conftest import EXACT, kill_group, run_training, start_training, wait_for, worker_pids
from trainer import checkpoint
from trainer.main import EXIT_PREEMPTED

pytestmark = pytest.mark.e2e

TIMING = {"img_per_s", "epoch_time", "startup_s"}


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def last_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def test_sigkill_at_a_random_step_then_restart_is_bitwise_identical(digits_shards, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    kill_at = random.Random(20261122).randint(9, 40)  # 25 steps per epoch: mid-epoch, either epoch
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT]
    process = start_training(overrides)
    try:
        wait_for(lambda: last_step(run_dir) >= kill_at, timeout=300, process=process)
    finally:
        kill_group(process, signal.SIGKILL)
        process.wait(timeout=60)
    assert not (run_dir / "final.safetensors").exists()
    resumed = run_training(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_at = int(resumed.stdout.split("resuming from", 1)[1].split("step ", 1)[1].split(")")[0])
    assert (kill_at // 7) * 7 <= resumed_at < 50  # from the newest checkpoint, mid-run, not from scratch
    expected, got = load_file(uninterrupted / "final.safetensors"), load_file(run_dir / "final.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name].equal(got[name]), name  # bit for bit
    assert records(run_dir) == records(uninterrupted)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT]
    process = start_training(overrides, TRAINER_TEST_PAUSE_CHECKPOINT_AT_STEP="14")
    try:  # the step-14 write stalls after its files and before its marker: kill it there
        wait_for(lambda: (run_dir / "checkpoints/ckpt-000000014.tmp/state.pt").exists(), timeout=300, process=process)
    finally:
        kill_group(process, signal.SIGKILL)
        process.wait(timeout=60)
    path, state, _ = checkpoint.load_newest(run_dir / "checkpoints", rank=0)
    assert path.name == "ckpt-000000007" and state["progress"]["step"] == 7
    resumed = run_training(overrides + ["train.epochs=1"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 7)" in resumed.stdout
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_and_exits_with_the_preempted_code(digits_shards, tmp_path, sig):
    run_dir = tmp_path / "run"
    process = start_training([f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT])
    try:
        wait_for(lambda: last_step(run_dir) >= 3, timeout=300, process=process)
        workers = worker_pids(process.pid)
        assert len(workers) == 2
        for pid in workers:  # as a job scheduler does: every process, the loader workers too
            os.killpg(pid, sig)
        output, _ = process.communicate(timeout=120)
    finally:
        kill_group(process, signal.SIGKILL)
    assert f"exitcode  : {EXIT_PREEMPTED}" in output or process.returncode == EXIT_PREEMPTED, output[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    path, state, _ = checkpoint.load_newest(run_dir / "checkpoints", rank=0)
    assert state["progress"]["step"] >= 3
    assert f"checkpoint {path}" in output


def test_second_sigterm_exits_at_once(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT, "train.checkpoint_every=0"]
    process = start_training(overrides, processes=1, TRAINER_TEST_PAUSE_CHECKPOINT_AT_STEP="1")
    try:
        wait_for(lambda: last_step(run_dir) >= 1, timeout=300, process=process)
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGTERM)  # an echo of the same signal (Slurm + launcher): not a second one
        wait_for(lambda: list((run_dir / "checkpoints").glob("*.tmp")), timeout=60, process=process)
        time.sleep(1.5)
        process.send_signal(signal.SIGTERM)  # deliberate, while the checkpoint write is stalled
        process.wait(timeout=30)
    finally:
        kill_group(process, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM
    assert not checkpoint.complete_checkpoints(run_dir / "checkpoints")  # the stalled write never completed


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
