"""slurm/train.sh and slurm/make_shards.sh on a real two-node Slurm cluster, started and stopped here.

The cluster (tests/slurm/start_cluster.sh) is a private munged, slurmctld and two slurmd on
127.0.0.1, all state in a temp dir; the session fixture always stops every daemon by its pid.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, TINY, cpu_env
from toolbox import failpoints
from trainer.training.config import wandb_id

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
FINAL = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
)
TRAIN = [*TINY, "train.epochs=2", "train.checkpoint_every=7", "train.deterministic=true", "train.log_every=1"]


def missing_programs() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in DAEMONS if shutil.which(name, path=path) is None]


def free_ports(count: int) -> int:
    """A base port with `count` consecutive free ports (slurmctld, then one per slurmd)."""
    for _ in range(100):
        base = random.randint(20000, 30000)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports for the test cluster")


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.env = cpu_env(
            SLURM_CONF=str(root / "slurm.conf"),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]),
            VENV="",  # the interpreter running the tests is first on PATH
        )

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, **kwargs)

    def sbatch(self, script: str, sbatch_args: list[str], args: list[str], **env: str) -> str:
        result = subprocess.run(
            ["sbatch", "--parsable", "--time=10", *sbatch_args, script, *args],
            cwd=REPO,
            env=dict(self.env, **env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def job(self, job: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job)
            if info.get("JobState") in FINAL:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job} not finished after {timeout} s: {self.job(job)}")

    def cancel_all(self) -> None:
        self.run("scancel", "--full", "--user", "root")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.run("squeue", "-h").stdout.strip():
            time.sleep(0.5)


def stray_processes(conf: str) -> list[int]:
    """Processes of this cluster's jobs (slurmstepd and below inherit SLURM_CONF): none may outlive it."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if f"SLURM_CONF={conf}\0".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.fixture(scope="session")
def cluster():
    missing = missing_programs()
    if missing:
        pytest.skip(
            f"Slurm/munge not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs munged as the munge user and slurmd as root: run the tests as root")
    root = Path(tempfile.mkdtemp(prefix="slurm-test-"))  # not under pytest's 0700 tmp: munged must reach it
    base = free_ports(3)
    env = dict(os.environ, CTLD_PORT=str(base), NODE_PORT=str(base + 1), FIRST_JOB_ID=str(random.randint(1000, 900000)))
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])
    conf = str(root / "slurm.conf")
    try:
        started = subprocess.run(
            ["bash", str(REPO / "tests/slurm/start_cluster.sh"), str(root)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert started.returncode == 0, f"cluster did not start: {started.stderr}\n{logs(root)}"
        cluster = Cluster(root)
        yield cluster
        cluster.cancel_all()
    finally:
        subprocess.run(["bash", str(REPO / "tests/slurm/stop_cluster.sh"), str(root)], env=env, timeout=120)
        strays = stray_processes(conf)
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
        assert not strays, f"processes of the test cluster's jobs outlived it (killed): {strays}"


def logs(root: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((root / "log").glob("*.log")))


def train_job(cluster: Cluster, shards: Path, runs: Path, extra: list[str] = (), **env: str) -> tuple[str, Path, Path]:
    """sbatch slurm/train.sh on 2 nodes x 1 CPU process; run.dir derived from the config and job id."""
    log = runs / "job.log"
    job = cluster.sbatch(
        "slurm/train.sh",
        ["--nodes=2", f"--output={log}"],
        ["configs/demo.yaml", f"data.shards={shards}", *TRAIN, *extra],
        RUNS_ROOT=str(runs),
        **env,
    )
    return job, runs / f"demo-{job}", log


def hold_env(release: Path, step: int) -> dict:
    """The trainer's main process holds right after optimizer step `step` (writing RELEASE.held) until
    `release` exists or it is signalled to stop. sbatch passes the submitting environment on whole
    (no --export list, which would split FAILPOINTS at its commas), and a requeued job gets it again:
    pick a step the resumed run does not reach again."""
    return failpoints.env(hold_after_step=step, release=release)


def wait_held(cluster: Cluster, job: str, release: Path, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not Path(f"{release}.held").exists():
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
            log.read_text()[-3000:] if log.exists() else "no log"
        )
        time.sleep(0.2)


def saved_checkpoints(text: str) -> list[tuple[str, int]]:
    return [(path, int(step)) for path, step in re.findall(r"checkpoint (\S+) \(epoch \d+, step (\d+)\)", text)]


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["step"] for r in map(json.loads, lines) if r.get("kind") == "train"]


def assert_same_weights(a: Path, b: Path) -> None:
    expected, got = load_file(a), load_file(b)
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name].equal(got[name]), name


@pytest.fixture(scope="module")
def straight(cluster, digits_shards, tmp_path_factory):
    job, run_dir, log = train_job(cluster, digits_shards, tmp_path_factory.mktemp("straight"), ["wandb.mode=offline"])
    return job, run_dir, log, cluster.wait(job)


def test_two_nodes_train_as_one_group(straight):
    job, run_dir, log, info = straight
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", text[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(r["world_size"] == 2 for r in train)  # a rank on each node, one group
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    for name in ("final.safetensors", "best.safetensors", "report.md", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert "2 node(s) x 1 cpu process(es), main 127.0.0.1:" in text
    assert "requeue" not in text.split("SLURM_RESTART_COUNT=0", 1)[1]  # a finished run stays finished
    config = (run_dir / "config.yaml").read_text()
    assert "group: demo" in config and f"dir: {run_dir}" in config  # wandb group from the config's name
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in runs] == [wandb_id(run_dir)]


def test_preemption_checkpoints_requeues_and_resumes(cluster, digits_shards, straight, tmp_path):
    release = tmp_path / "release"  # never created: the signal wakes the hold
    # Held after step 9 (past the step-7 checkpoint, mid-epoch 1); the requeued run resumes at 10
    # and never holds again.
    job, run_dir, log = train_job(cluster, digits_shards, tmp_path, ["wandb.mode=offline"], **hold_env(release, 9))
    wait_held(cluster, job, release, log)
    # What --signal=B:USR1@N does before the time limit: USR1 to the batch shell only.
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    info = cluster.wait(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    first, second = text.split("SLURM_RESTART_COUNT=1", 1)
    assert "USR1" in first and f"requeueing job {job}" in first
    path = str(run_dir / "checkpoints" / "ckpt-000000010")
    # The stop is agreed at the next check after the hold (every 5 steps): step 10, the one checkpoint since.
    assert saved_checkpoints(first.split("USR1", 1)[1]) == [(path, 10)], first[-3000:]
    assert f"resuming from {path} (epoch 1, step 10)" in second  # from that checkpoint, not from scratch
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert train_steps(run_dir)[-1] == train_steps(straight[1])[-1] == 50  # 2 epochs x 25 steps
    assert_same_weights(straight[1] / "final.safetensors", run_dir / "final.safetensors")  # resumed exactly
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {p.name.rsplit("-", 1)[1] for p in runs} == {wandb_id(run_dir)}  # one wandb run


def test_preemption_past_the_restart_cap_is_not_requeued(cluster, digits_shards, tmp_path):
    release = tmp_path / "release"  # never created: the signal wakes the hold
    job, run_dir, log = train_job(
        cluster, digits_shards, tmp_path, ["wandb.mode=disabled"], MAX_RESTARTS="0", **hold_env(release, 2)
    )
    wait_held(cluster, job, release, log)
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    info = cluster.wait(job)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text[-3000:]
    assert "not requeueing: 0 restarts reached MAX_RESTARTS=0" in text
    # Held after step 2, stopped at the next check (step 5): its checkpoint is the run's only one.
    assert saved_checkpoints(text) == [(str(run_dir / "checkpoints" / "ckpt-000000005"), 5)], text[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"


def test_a_failing_run_is_not_requeued(cluster, digits_shards, tmp_path):
    job, run_dir, log = train_job(cluster, tmp_path / "no-such-shards", tmp_path)
    info = cluster.wait(job)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text[-3000:]
    assert "not requeueing" in text or "error:" in text


def test_make_shards_job_writes_the_same_shards_as_the_plain_command(cluster, digits_shards, tmp_path):
    src = digits_shards / "images"
    plain, job_out = tmp_path / "plain", tmp_path / "job"
    subprocess.run(
        [sys.executable, "-m", "launch.make_shards", str(src), str(plain)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    job = cluster.sbatch(
        "slurm/make_shards.sh", ["--cpus-per-task=1", f"--output={tmp_path / 'job.log'}"], [str(src), str(job_out)]
    )
    info = cluster.wait(job)
    assert info["JobState"] == "COMPLETED", (tmp_path / "job.log").read_text()[-3000:]
    assert "make_shards, --workers 1" in (tmp_path / "job.log").read_text()
    tars = sorted(p.relative_to(plain) for p in plain.rglob("*.tar"))
    assert tars and tars == sorted(p.relative_to(job_out) for p in job_out.rglob("*.tar"))
    for name in tars:
        assert (plain / name).read_bytes() == (job_out / name).read_bytes(), name
    manifest = [json.loads((out / "manifest.json").read_text()) for out in (plain, job_out)]
    assert manifest[0]["splits"] == manifest[1]["splits"] and manifest[0]["classes"] == manifest[1]["classes"]


def test_a_sweep_runs_as_a_job_array_and_a_preempted_task_requeues_alone(cluster, digits_shards, tmp_path):
    """A 3-point grid as `sbatch --array=0-2 slurm/sweep.sh`: every task trains its point in its own
    run dir; task 1, held after step 9 and sent USR1, checkpoints, is requeued alone and resumes."""
    spec = tmp_path / "grid3.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "grid3", "method": "grid", "parameters": {"optim.lr": {"values": [0.005, 0.01, 0.02]}}})
    )
    for task in (0, 2):  # their release files exist: only task 1 holds
        (tmp_path / f"release-{task}").touch()
    runs, release = tmp_path / "runs", tmp_path / "release-1"
    job = cluster.sbatch(
        "slurm/sweep.sh",
        ["--array=0-2", f"--output={tmp_path / 'task-%a.log'}"],
        [str(spec), "configs/demo.yaml", f"data.shards={digits_shards}", *TINY, "train.epochs=1"]
        + ["train.checkpoint_every=7", "train.log_every=1", "wandb.mode=disabled"],
        RUNS_ROOT=str(runs),
        # each task expands the variable: release-0, release-1, release-2
        **failpoints.env(hold_after_step=9, release=tmp_path / "release-$SLURM_ARRAY_TASK_ID"),
    )
    log = tmp_path / "task-1.log"
    wait_held(cluster, f"{job}_1", release, log)
    assert cluster.run("scancel", "--signal=USR1", "--batch", f"{job}_1").returncode == 0
    infos = [cluster.wait(f"{job}_{task}") for task in range(3)]
    logs = [(tmp_path / f"task-{task}.log").read_text() for task in range(3)]
    assert [i["JobState"] for i in infos] == ["COMPLETED"] * 3, "\n".join(text[-2000:] for text in logs)
    assert [i["Restarts"] for i in infos] == ["0", "1", "0"]  # Slurm requeued the one task
    run_dirs = [runs / "grid3" / name for name in ("0-lr0.005", "1-lr0.01", "2-lr0.02")]
    assert sorted((runs / "grid3").iterdir()) == run_dirs
    for run_dir, lr in zip(run_dirs, (0.005, 0.01, 0.02)):
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["optim"]["lr"] == lr and config["wandb"]["group"] == "grid3" and config["train"]["epochs"] == 1
        assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
        assert train_steps(run_dir)[-1] == 50  # 1,618 images / 32 on one process
    first, second = logs[1].split("SLURM_RESTART_COUNT=1", 1)
    checkpoint = run_dirs[1] / "checkpoints" / "ckpt-000000010"
    assert saved_checkpoints(first.split("USR1", 1)[1]) == [(str(checkpoint), 10)], first[-3000:]
    assert f"resuming from {checkpoint} (epoch 1, step 10)" in second

    compared = subprocess.run(
        [sys.executable, "-m", "trainer.compare", str(runs / "grid3")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert compared.returncode == 0, compared.stderr
    rows = list(csv.DictReader((runs / "grid3" / "compare.csv").open()))
    assert sorted(r["run"] for r in rows) == [d.name for d in run_dirs]
    assert {r["state"] for r in rows} == {"completed"} and {r["optim.lr"] for r in rows} == {"0.005", "0.01", "0.02"}


def test_a_wandb_sweep_task_requeues_and_its_agent_continues_the_run(cluster, digits_shards, tmp_path):
    """slurm/sweep.sh wandb:E/P/ID with a stand-in `wandb` (tests/fake_wandb: wandb's own AgentProcess
    and command building, no server): USR1 reaches the trainer through the agent and the launcher,
    the task requeues, and the agent that asks again gets the preempted run, which resumes."""
    release = tmp_path / "release"  # never created: the signal wakes the hold
    values = dict(word.split("=", 1) for word in TINY)
    values.update({"data.shards": str(digits_shards), "train.epochs": 1, "train.checkpoint_every": 7})
    values["train.log_every"] = 1
    log = tmp_path / "task.log"
    job = cluster.sbatch(
        "slurm/sweep.sh",
        ["--array=0", f"--output={log}"],
        ["wandb:me/se-densenet-demo/sw33p"],
        PATH=os.pathsep.join([str(REPO / "tests/fake_wandb"), cluster.env["PATH"]]),
        FAKE_SWEEP_YAML=str(REPO / "configs/sweeps/demo-lr.yaml"),
        FAKE_SWEEP_VALUES=json.dumps(values),
        RUNS_ROOT=str(tmp_path / "runs"),
        **hold_env(release, 9),
    )
    wait_held(cluster, f"{job}_0", release, log)
    assert cluster.run("scancel", "--signal=USR1", "--batch", f"{job}_0").returncode == 0
    info = cluster.wait(f"{job}_0")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    run_dir = tmp_path / "runs" / "sw33p" / "run-0"
    first, second = text.split("SLURM_RESTART_COUNT=1", 1)
    assert "run run-0 checkpointed and marked preempting: requeueing job" in first, first[-3000:]
    checkpoint = run_dir / "checkpoints" / "ckpt-000000010"
    assert f"resuming from {checkpoint} (epoch 1, step 10)" in second, second[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["wandb"]["id"] == "run-0"
    assert train_steps(run_dir)[-1] == 50
