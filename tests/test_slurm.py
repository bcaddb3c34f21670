"""slurm/train.sh and slurm/make_shards.sh on a real two-node Slurm cluster, started and stopped here.

The cluster (tests/slurm/start_cluster.sh) is a private munged, slurmctld and two slurmd on
127.0.0.1, all state in a temp dir; the session fixture always stops every daemon by its pid.
"""

from __future__ import annotations

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
from safetensors.torch import load_file

from shards import failpoints
from tests.conftest import REPO, TINY, cpu_env
from trainer.config import wandb_id

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
