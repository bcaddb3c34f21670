"""`python -m trainer.find_lr` on the demo: its suggestion near the demo's tuned rate with 1 and 2
processes, the run it suggests reaching the demo's accuracy, and nothing of the config's run touched."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, cpu_env, train_command
from toolbox.testing import accelerate_launch
from trainer.rundir import CHECKPOINTS

pytestmark = pytest.mark.e2e

DEMO_LR = 0.005  # configs/demo.yaml: optim.lr per optim.lr_base_size=64 images, tuned
SUGGESTED = re.compile(r"^suggested \(valley\): optim\.lr=(\S+)", re.MULTILINE)


def find_lr(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trainer.find_lr", "--config", "configs/demo.yaml", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env or cpu_env(), capture_output=True, text=True, timeout=600)


def suggested(result: subprocess.CompletedProcess) -> float:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return float(SUGGESTED.search(result.stdout).group(1))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_process(digits_shards, tmp_path_factory):
    """find_lr with the demo config as written, pointed at a run dir that holds a run's files."""
    root = tmp_path_factory.mktemp("find_lr")
    run_dir = root / "run"
    (run_dir / CHECKPOINTS / "ckpt-000000025").mkdir(parents=True)
    (run_dir / CHECKPOINTS / "ckpt-000000025" / "state.pt").write_bytes(b"weights and optimizer state " * 100)
    (run_dir / "best.safetensors").write_bytes(b"best weights")
    (run_dir / "config.yaml").write_text("optim:\n  lr: 0.005\n")
    before = files(run_dir)
    result = find_lr(f"data.shards={digits_shards}", f"run.dir={run_dir}")
    return result, root, before


def test_one_process_suggests_near_the_demos_rate_and_leaves_the_run_alone(one_process):
    result, root, before = one_process
    lr = suggested(result)
    assert DEMO_LR / 10 <= lr <= DEMO_LR * 10, result.stdout
    assert "global batch 32 (1 process(es)" in result.stdout
    assert files(root / "run") == before  # byte for byte, nothing added
    assert sorted(files(root / "run-find_lr")) == ["find_lr.csv", "find_lr.png"]
    assert sorted(p.name for p in root.iterdir()) == ["run", "run-find_lr"]  # no wandb run, no other folder
    rows = (root / "run-find_lr" / "find_lr.csv").read_text().splitlines()
    assert rows[0] == "step,lr,loss,smoothed_loss" and 20 < len(rows) <= 101


def test_two_processes_under_accelerate_launch_average_their_losses(digits_shards, tmp_path):
    out = tmp_path / "lr"
    args = ["--config", REPO / "configs/demo.yaml", f"data.shards={digits_shards}", f"run.dir={tmp_path / 'run'}"]
    result = subprocess.run(
        accelerate_launch(REPO / "trainer/find_lr.py", [*args, "--out", out], 2),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lr = suggested(result)
    assert DEMO_LR / 10 <= lr <= DEMO_LR * 10, result.stdout
    assert "global batch 64 (2 process(es)" in result.stdout
    assert result.stdout.count("suggested (valley)") == 1  # said once, by the main process
    assert sorted(files(out)) == ["find_lr.csv", "find_lr.png"] and not (tmp_path / "run").exists()


def test_processes_n_launches_itself_under_accelerate(digits_shards, tmp_path):
    env = cpu_env(HF_HOME=str(tmp_path / "hf"))  # no `accelerate config` file of this machine's
    del env["ACCELERATE_USE_CPU"], env["OMP_NUM_THREADS"]  # the launcher sets both itself
    out = tmp_path / "lr"
    result = find_lr("--processes", 2, "--steps", 20, "--out", out, *TINY, f"data.shards={digits_shards}", env=env)
    suggested(result)
    assert "python -m trainer.find_lr: 2 process(es) on the CPU" in result.stdout
    assert "global batch 64 (2 process(es)" in result.stdout
    assert len((out / "find_lr.csv").read_text().splitlines()) <= 21


def test_the_suggested_rate_trains_the_demo_to_its_accuracy(one_process, digits_shards, tmp_path):
    """The demo as run_demo.sh runs it (2 processes), at the suggested rate, for half its epochs:
    12 x 25 steps reach ~1.0 by epoch 9; at the suggestion 6 epochs took 76 s on 2 cores."""
    lr = suggested(one_process[0])
    run_dir = tmp_path / "run"
    overrides = [f"data.shards={digits_shards}", f"run.dir={run_dir}", f"optim.lr={lr}", "train.epochs=6"]
    result = subprocess.run(
        train_command("configs/demo.yaml", [*overrides, "wandb.mode=disabled"], 2),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["best_top1"] >= 0.95


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--steps", "5"], "error: --steps 5: give at least 20"),
        (["--out", "{run}"], "is the config's run.dir"),
        (["optim.lrr=1"], "optim.lrr"),
    ],
)
def test_bad_input_is_one_line(args, words, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [a.replace("{run}", str(run_dir)) for a in args]
    result = find_lr(*args, f"data.shards={digits_shards}", f"run.dir={run_dir}")
    assert result.returncode == 2
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not run_dir.exists()


def test_a_test_that_diverges_at_once_says_so_in_one_line_and_keeps_its_curve(digits_shards, tmp_path):
    out = tmp_path / "lr"
    result = find_lr(
        "--start-lr", 1e4, "--end-lr", 1e8, "--steps", 20, "--out", out, *TINY, f"data.shards={digits_shards}"
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: the loss diverged after only"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "stopped at lr" in result.stdout and (out / "find_lr.png").exists()
    assert len((out / "find_lr.csv").read_text().splitlines()) < 21
