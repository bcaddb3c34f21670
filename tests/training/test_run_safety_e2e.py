"""Runs that cannot go wrong silently: non-finite steps, two trainers on one run dir, a full
disk, a frozen rank. Real 2-process gloo runs; status.json is checked after each."""

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import EXACT, REPO, kill_group, run_training, start_training, tmpfs, wait_for, worker_pids
from toolbox import failpoints
from trainer.training import checkpoint

pytestmark = pytest.mark.e2e


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def errors(output: str) -> list[str]:
    """The trainers' error lines; a trainer's traceback fails the test (the launcher's own report of a
    failed worker, ChildFailedError, is accelerate's and is left alone)."""
    for package in ("trainer", "shards"):
        assert f'File "{REPO / package}' not in output, output[-3000:]
    return [line for line in output.splitlines() if line.startswith("error: ")]


def every_tensor(run_dir: Path):
    """Every tensor the run wrote: weights files and checkpoints."""
    for path in run_dir.rglob("*.safetensors"):
        yield from ((f"{path}:{k}", v) for k, v in load_file(path).items())
    for path in run_dir.rglob("*.pt"):
        yield from _tensors(torch.load(path, map_location="cpu", weights_only=False), str(path))


def _tensors(value, name):
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{name}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{name}.{i}")


def test_a_diverging_run_stops_with_one_line_and_writes_nothing_nonfinite(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run_training(
        [
            f"data.shards={digits_shards}",
            f"run.dir={run_dir}",
            "optim.lr=1e6",
            "train.epochs=3",
            "train.max_bad_steps=5",
            "train.checkpoint_every=3",
            "wandb.mode=disabled",
        ]
    )
    assert result.returncode != 0, result.stderr[-3000:]
    (line,) = errors(result.stderr)  # both ranks stop; the main process says why
    streak = int(line.removeprefix("error: ").split()[0])
    assert streak >= 5 and "optimizer steps in a row had a non-finite loss or gradient" in line, line
    # The loss is printed as it was: nan or inf, or a finite number when only the gradients were not.
    assert re.search(r"\(step \d+, loss (nan|-?inf|-?\d[\d.]*(e[-+]\d+)?)\) — ", line), line
    assert "lower optim.lr" in line and "it resumes from ckpt-" in line, line
    assert status(run_dir)["state"] == "failed" and status(run_dir)["reason"] == line.removeprefix("error: ")
    skipped = sum(
        r.get("skipped_steps", 0) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    )
    assert skipped >= 5
    assert not (run_dir / "final.safetensors").exists()
    tensors = list(every_tensor(run_dir))
    assert tensors
    for name, tensor in tensors:
        assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), name


def test_a_single_bad_batch_is_skipped_and_the_run_completes(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    # The main process's loss is NaN at steps 4 and 5: the all-reduced gradients are NaN on both ranks.
    result = run_training(
        [
            f"data.shards={digits_shards}",
            f"run.dir={run_dir}",
            "train.epochs=1",
            "train.log_every=1",
            "wandb.mode=disabled",
        ],
        **failpoints.env(nan_loss="4,5"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r.get("skipped_steps", 0) for r in records if r["kind"] == "train" and r["step"] <= 6} == {
        1: 0,
        2: 0,
        3: 0,
        4: 1,
        5: 1,
        6: 0,
    }
    assert status(run_dir)["state"] == "completed"
    assert all(
        torch.isfinite(t).all() for t in load_file(run_dir / "final.safetensors").values() if t.is_floating_point()
    )


def test_a_second_trainer_on_the_same_run_dir_exits_2_and_touches_nothing(digits_shards, tmp_path):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    overrides = [
        f"data.shards={digits_shards}",
        f"run.dir={run_dir}",
        "train.epochs=1",
        "train.checkpoint_every=3",
        "wandb.mode=disabled",
    ]
    first = start_training(overrides, processes=1, **failpoints.env(pause_checkpoint=3, release=release))
    try:
        wait_for(lambda: Path(f"{release}.paused").exists(), timeout=300, process=first)
        holder = status(run_dir)["pid"]
        before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")}
        second = run_training(overrides, processes=1)
        assert second.returncode == 2, second.stderr[-3000:]
        (line,) = errors(second.stderr)
        assert f"run.dir {run_dir} is in use by another trainer" in line and f"pid {holder}" in line
        assert "host " in line and "since " in line and "Traceback" not in second.stderr
        assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")} == before
        release.touch()
        output, _ = first.communicate(timeout=300)
    finally:
        kill_group(first, signal.SIGKILL)
    assert first.returncode == 0, output[-3000:]
    assert status(run_dir)["state"] == "completed"
    third = run_training(overrides, processes=1)  # the lock died with its holder (nothing left to train)
    assert third.returncode == 0, third.stderr[-3000:]


@pytest.fixture
def small_disk(tmp_path):
    """A 300 MB tmpfs, unmounted after."""
    with tmpfs(tmp_path / "disk", "300m") as mount:
        yield mount


def test_a_full_disk_mid_run_is_one_line_and_the_restart_resumes_exactly(
    digits_shards, uninterrupted, small_disk, tmp_path
):
    run_dir, release, filler = small_disk / "run", tmp_path / "release", small_disk / "filler"
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT]
    process = start_training(overrides, **failpoints.env(pause_checkpoint=14, release=release))
    try:  # the step-14 checkpoint has its parts written and waits for its marker: fill the disk there
        wait_for(lambda: Path(f"{release}.paused").exists(), timeout=300, process=process)
        with open(filler, "wb") as f:
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            os.posix_fallocate(f.fileno(), 0, free)
        release.touch()
        output, _ = process.communicate(timeout=300)
    finally:
        kill_group(process, signal.SIGKILL)
    assert process.returncode != 0, output[-3000:]
    (line,) = errors(output)
    assert line == (
        f"error: cannot write {run_dir}/checkpoints/ckpt-000000014.tmp/COMPLETE: no space left on the device "
        "— free space, then start the same command: it resumes from ckpt-000000007"
    )
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["ckpt-000000007"]  # the partial one is gone
    assert status(run_dir)["state"] == "failed" and "no space left" in status(run_dir)["reason"]

    filler.unlink()
    resumed = run_training(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 7)" in resumed.stdout
    expected, got = load_file(uninterrupted / "final.safetensors"), load_file(run_dir / "final.safetensors")
    assert all(expected[name].equal(got[name]) for name in expected)  # bit for bit
    assert status(run_dir)["state"] == "completed"


def rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=")[1])


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_frozen_rank_makes_the_job_leave_within_the_timeout(digits_shards, tmp_path):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT, "train.collective_timeout_s=10"]
    process = start_training(overrides, **failpoints.env(pause_checkpoint=7, release=release))
    frozen = None
    try:
        wait_for(lambda: Path(f"{release}.paused").exists(), timeout=300, process=process)
        ranks = {rank_of(pid): pid for pid in worker_pids(process.pid)}
        frozen = ranks[1]
        os.kill(frozen, signal.SIGSTOP)  # rank 1 stops answering while rank 0 finishes its checkpoint
        release.touch()
        wait_for(lambda: gone(ranks[0]), timeout=300)  # rank 0 gave up after its 10 s
        os.kill(frozen, signal.SIGCONT)  # so that the launcher need not wait out its 30 s before SIGKILL
        output, _ = process.communicate(timeout=300)
    finally:
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGCONT)
            except ProcessLookupError:
                pass
        kill_group(process, signal.SIGKILL)
    assert process.returncode != 0, output[-3000:]
    assert any(
        "no answer from another process of the job for train.collective_timeout_s" in line for line in errors(output)
    ), output[-3000:]
    assert status(run_dir)["state"] == "failed"
    assert checkpoint.complete_checkpoints(run_dir / "checkpoints")[-1].name == "ckpt-000000007"


def test_the_same_command_on_a_completed_run_changes_nothing(digits_shards, uninterrupted, tmp_path):
    """Even with a setting changed (a smaller size than the weights were trained at): said, not done."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir, ignore=shutil.ignore_patterns("wandb", ".lock"))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = run_training([f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT, "data.image_size=12"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if " is complete: " in line]
    assert len(lines) == 1 and lines[0].startswith(f"run {run_dir} is complete: 2 epochs, best val top-1 0."), lines
    assert "nothing was changed — to train further raise train.epochs above 2" in lines[0]
    assert "resuming from" not in result.stdout
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == {p: b for p, b in before.items() if p.name != ".lock"}


def test_a_killed_launcher_takes_its_trainers_with_it_and_the_run_resumes(digits_shards, tmp_path):
    """SIGKILL to `accelerate launch` alone (a user, the OOM killer): each trainer gets SIGTERM from the
    kernel (parent-death signal), checkpoints at the next agreed step and exits, releasing the run
    dir; the restart resumes from there, and a setting changed since is said and recorded."""
    run_dir, release = tmp_path / "run", tmp_path / "release"
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT]
    process = start_training(overrides, **failpoints.env(hold_after_step=3, release=release))
    try:
        wait_for(lambda: (tmp_path / "release.held").exists(), timeout=300, process=process)
        trainers = worker_pids(process.pid)
        assert len(trainers) == 2
        os.kill(process.pid, signal.SIGKILL)  # the launcher only: the trainers are in sessions of their own
        process.wait(timeout=60)
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in trainers), timeout=120)
    finally:
        kill_group(process, signal.SIGKILL)
        for pid in worker_pids(process.pid):
            os.killpg(pid, signal.SIGKILL)
    assert status(run_dir)["state"] == "preempted"
    assert checkpoint.complete_checkpoints(run_dir / "checkpoints")[-1].name == "ckpt-000000005"
    resumed = run_training([*overrides, "train.log_every=2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # the lock went with the trainers
    assert "resuming from" in resumed.stdout and "(epoch 1, step 5)" in resumed.stdout
    assert "note: resuming with changed settings: train.log_every 1 -> 2" in resumed.stdout
    changes = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    changes = [r for r in changes if r["kind"] == "config_change"]
    assert changes == [
        {"kind": "config_change", "epoch": 0, "step": 5, "changes": {"train.log_every": {"from": 1, "to": 2}}}
    ]
    assert status(run_dir)["state"] == "completed"


def test_a_run_dir_of_someone_elses_files_is_refused_untouched(digits_shards, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "report.md", "best.safetensors"):
        (mine / name).write_text(f"my own {name}\n")
    result = run_training([f"data.shards={digits_shards}", f"run.dir={mine}", *EXACT])
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    lines = errors(result.stderr)
    assert len(lines) == 1 and "already holds files that are not a training run's" in lines[0], lines
    assert lines[0].endswith("or pass run.share_dir=true to use it anyway (files named as a run's are overwritten)")
    assert {p.name: p.read_text() for p in mine.iterdir()} == {
        name: f"my own {name}\n" for name in ("config.yaml", "metrics.jsonl", "report.md", "best.safetensors")
    }
