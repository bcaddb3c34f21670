"""Shared fixtures: real digits shards, and a runner for the real `accelerate launch` command."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from toolbox.testing import accelerate_launch

REPO = Path(__file__).resolve().parent.parent
# A model small enough that a 2-process CPU epoch over the 1,618 digits takes seconds.
TINY = [
    "model.block_config=[2,2]",
    "model.growth_rate=4",
    "model.num_init_features=8",
    "model.se_reduction=2",
    "data.image_size=8",
    "data.scale_min=0.8",
    "data.rotation=0",
    "data.workers=1",
    "train.batch_size=32",
    "train.log_every=5",
    "optim.lr=0.01",
]


def cpu_env(**extra: str) -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.update(extra)
    return env


def train_command(config: str, overrides: list[str], processes: int = 2) -> list[str]:
    args = ["--config", str(REPO / config), *overrides]
    if processes == 1:
        return [sys.executable, str(REPO / "trainer/main.py"), *args]
    return accelerate_launch(REPO / "trainer/main.py", args, processes)


def run_module(module: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repo, on the CPU, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_training(overrides: list[str], processes: int = 2, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command("configs/demo.yaml", TINY + overrides, processes),
        cwd=REPO,
        env=cpu_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Settings under which a run is a pure function of its inputs (bit for bit on CPU), for the
# tests that compare runs: resumed vs uninterrupted, remote vs local shards.
EXACT = [
    "train.epochs=2",
    "train.checkpoint_every=7",
    "train.deterministic=true",
    "train.log_every=1",
    "wandb.mode=disabled",
]


@pytest.fixture(scope="session")
def uninterrupted(digits_shards, tmp_path_factory) -> Path:
    """The run dir of a 2-process EXACT run on the local digits shards."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run_training([f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The real make_shards output for scikit-learn's digits (1,618 train / 179 val: an odd val count)."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    subprocess.run(
        [sys.executable, "-m", "launch.make_shards", "--demo", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def start_training(overrides: list[str], processes: int = 2, log=None, **env) -> subprocess.Popen:
    """The training command in its own process group, so a test can signal or kill all of it."""
    return subprocess.Popen(
        train_command("configs/demo.yaml", TINY + overrides, processes),
        cwd=REPO,
        env=cpu_env(**env),
        stdout=log or subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen, sig: int) -> None:
    """The launcher's group and each trainer's: torch's agent starts every trainer in a session of its own."""
    groups = [process.pid] + (worker_pids(process.pid) if process.poll() is None else [])
    for group in groups:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass


def worker_pids(launcher_pid: int) -> list[int]:
    """The trainer processes started by `accelerate launch` (children of its elastic agent)."""
    found = []
    try:
        for task in Path(f"/proc/{launcher_pid}/task").iterdir():
            found += [int(p) for p in (task / "children").read_text().split()]
    except FileNotFoundError:  # the launcher is gone
        pass
    return found


def wait_for(predicate, timeout: float, process: subprocess.Popen | None = None, interval: float = 0.1):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before the condition held")
        time.sleep(interval)
    raise AssertionError("timed out waiting")


@contextmanager
def http_server(root: Path):
    """Python's file server on loopback over ``root`` (it ignores Range: whole files only)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def make_shards_to(out: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.make_shards", *args, out],
        cwd=REPO,
        env=cpu_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@contextmanager
def tmpfs(where: Path, size: str):
    """A file system of `size` (e.g. 1m, 300m) mounted at `where` by the test (as root, as CI runs);
    unmounted after. Skips the test where mounting is not allowed."""
    where.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]).returncode
    ):
        pytest.skip("mounting a small file system needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
