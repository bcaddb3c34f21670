"""`python -m trainer`: the config and the shards checked before any process starts, the job's
own error last and said once, and a real 2-process CPU run with its sizes settled from the data."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, cpu_env, run_training, wait_for, worker_pids
from toolbox.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED

pytestmark = pytest.mark.e2e


def one_command(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = cpu_env(HF_HOME=str(tmp / "hf"))  # no `accelerate config` file of this machine's
    del env["ACCELERATE_USE_CPU"], env["OMP_NUM_THREADS"]  # the launcher sets both itself
    command = [sys.executable, "-m", "trainer", "--config", "configs/demo.yaml", *TINY, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def truncated_copy(shards: Path, tmp: Path) -> Path:
    bad = tmp / "bad-shards"
    shutil.copytree(shards, bad, ignore=shutil.ignore_patterns("images"))
    with open(sorted((bad / "train").glob("*.tar"))[0], "r+b") as f:
        f.truncate(1000)
    return bad


def test_a_config_typo_is_one_line_and_nothing_starts(digits_shards, tmp_path):
    result = one_command(f"data.shards={digits_shards}", f"run.dir={tmp_path / 'run'}", "optim.lrr=1", tmp=tmp_path)
    assert result.returncode == 2
    assert lines(result) == ["error: unknown config key 'optim.lrr' — did you mean 'optim.lr'?"]
    assert not (tmp_path / "run").exists()


def test_missing_shards_are_one_line_before_any_process(tmp_path):
    result = one_command(f"data.shards={tmp_path / 'nowhere'}", f"run.dir={tmp_path / 'run'}", tmp=tmp_path)
    assert result.returncode == 2
    assert lines(result) == [
        f"error: {tmp_path / 'nowhere' / 'manifest.json'} not found — make shards first with "
        "`python -m launch.make_shards SRC OUT`"
    ]


def test_a_data_error_in_the_ranks_is_said_once_and_last(digits_shards, tmp_path):
    bad = truncated_copy(digits_shards, tmp_path)
    result = one_command(f"data.shards={bad}", f"run.dir={tmp_path / 'run'}", "wandb.mode=disabled", tmp=tmp_path)
    assert result.returncode == 2
    said = [line for line in lines(result) if "is 1,000 bytes but the manifest says" in line]
    assert len(said) == 1 and result.stderr.strip().splitlines()[-1] == said[0]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert "were not passed to `accelerate launch`" not in result.stderr


@pytest.mark.parametrize(
    "problem, said",
    [("truncated shard", "is 1,000 bytes but the manifest says"), ("fp16 on the CPU", "fp16 needs a GPU")],
)
def test_under_accelerate_launch_an_error_every_rank_meets_is_said_once(problem, said, digits_shards, tmp_path):
    shards = truncated_copy(digits_shards, tmp_path) if problem == "truncated shard" else digits_shards
    overrides = [f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", "wandb.mode=disabled"]
    if problem == "fp16 on the CPU":
        overrides.append("train.mixed_precision=fp16")
    result = run_training(overrides, processes=2)  # accelerate launch, 2 CPU processes
    assert result.returncode != 0
    assert sum(said in line for line in lines(result)) == 1, result.stderr


def test_two_cpu_processes_train_at_the_size_settled_from_the_shards(digits_shards, tmp_path):
    run = tmp_path / "run"
    args = [f"data.shards={digits_shards}", f"run.dir={run}", "data.image_size=auto", "model.small_inputs=auto"]
    result = one_command("--processes", "2", *args, "train.epochs=1", "wandb.mode=disabled", tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    out = lines(result)
    assert out[0].startswith("python -m trainer: 2 process(es) on the CPU, 1 thread(s) each (")
    assert "image size 16 train, 16 val (auto from the shards: median 8x8); small stem (auto: below 96 px)" in out
    assert any(line.startswith("training run: 2 process(es) on cpu") for line in out)
    assert "image_size: 16" in (run / "config.yaml").read_text()  # config.yaml holds what ran
    assert "were not passed to `accelerate launch`" not in result.stderr


def signal_the_command(sig: int, processes: str, shards: Path, tmp: Path) -> tuple[subprocess.Popen, str, list[int]]:
    """`python -m trainer` until its first complete checkpoint, then ``sig``: SIGTERM to the command
    alone (`kill PID`), SIGINT to its process group (Ctrl-C: the terminal's foreground group) -> it
    ended, its output, its trainers."""
    run = tmp / "run"
    env = cpu_env(HF_HOME=str(tmp / "hf"))
    args = [f"data.shards={shards}", f"run.dir={run}", "train.epochs=50", "train.checkpoint_every=3"]
    command = [sys.executable, "-m", "trainer", "--processes", processes, "--config", "configs/demo.yaml", *TINY, *args]
    command.append("wandb.mode=disabled")
    launcher = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        wait_for(lambda: list((run / "checkpoints").glob("ckpt-*/COMPLETE")), timeout=300, process=launcher)
        trainers = worker_pids(launcher.pid)
        if sig == signal.SIGINT:
            os.killpg(launcher.pid, sig)
        else:
            launcher.send_signal(sig)
        out, _ = launcher.communicate(timeout=300)
    finally:
        launcher.kill()
    return launcher, out, trainers


@pytest.mark.parametrize("processes", ["1", "2"])
def test_sigterm_to_the_command_checkpoints_its_trainers_and_ends_with_them(processes, digits_shards, tmp_path):
    """The command passes SIGTERM on and waits for the trainers, however long their checkpoint takes
    (one runs outside torch's agent; several under it, which would kill them 30 s on and exit 143)."""
    launcher, out, trainers = signal_the_command(signal.SIGTERM, processes, digits_shards, tmp_path)
    assert launcher.returncode == EXIT_PREEMPTED, out
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "preempted"
    last = out.strip().splitlines()[-1]
    assert last.startswith("preempted: stopped at a complete checkpoint; it resumes from ckpt-"), out
    assert last.endswith(" when the same command starts again")
    assert len(trainers) == int(processes)
    assert not [pid for pid in trainers if Path(f"/proc/{pid}").exists()]  # ended before the command


@pytest.mark.parametrize("processes", ["1", "2"])
def test_ctrl_c_stops_every_trainer_and_is_said_once_last(processes, digits_shards, tmp_path):
    """The trainers stop where they are and leave the line to the command, which says it when all
    have ended: one trainer may never reach its own (a peer gone mid-collective)."""
    launcher, out, trainers = signal_the_command(signal.SIGINT, processes, digits_shards, tmp_path)
    assert launcher.returncode == EXIT_INTERRUPTED, out
    said = [line for line in out.splitlines() if line.startswith("error: ")]
    assert said == [out.strip().splitlines()[-1]], out
    assert said[0].startswith("error: interrupted — start the same command again: it resumes from ckpt-"), out
    assert len(trainers) == int(processes) and not [pid for pid in trainers if Path(f"/proc/{pid}").exists()]
