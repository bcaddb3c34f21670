"""`accelerate launch --mixed_precision/--dynamo_backend` against train.mixed_precision/train.compile:
real launches of the default demo config (TINY, one process, CPU)."""

import json
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, TINY, cpu_env
from toolbox.testing import accelerate_launch

pytestmark = pytest.mark.e2e


def launch(launcher_args: list[str], overrides: list[str], shards: Path, run_dir: Path) -> subprocess.CompletedProcess:
    args = [
        "--config",
        str(REPO / "configs/demo.yaml"),
        *TINY,
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "train.epochs=1",
        "train.deterministic=true",
        "wandb.mode=disabled",
        *overrides,
    ]
    command = accelerate_launch(REPO / "trainer/main.py", args, launcher_args=launcher_args)
    # HF_HOME of its own: no `accelerate config` file of this machine's takes part
    env = cpu_env(HF_HOME=str(run_dir.parent / "hf"))
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory) -> dict:
    """bf16: the launcher's bf16, the config silent; no: the config's explicit no against the launcher's
    bf16 and inductor; fp32: a launch that chose nothing."""
    cases = {
        "bf16": (["--mixed_precision", "bf16"], []),
        "no": (
            ["--mixed_precision", "bf16", "--dynamo_backend", "inductor"],
            ["train.mixed_precision=no", "train.compile=none"],
        ),
        "fp32": ([], []),
    }
    done = {}
    for name, (launcher_args, overrides) in cases.items():
        run_dir = tmp_path_factory.mktemp(f"launch-{name}") / "run"
        result = launch(launcher_args, overrides, digits_shards, run_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        done[name] = (run_dir, result.stdout)
    return done


def saved_train(run_dir: Path):
    return OmegaConf.load(run_dir / "config.yaml").train


def losses(run_dir: Path) -> list[float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_launcher_bf16_trains_the_default_config_in_bf16(runs):
    run_dir, stdout = runs["bf16"]
    assert (saved_train(run_dir).mixed_precision, saved_train(run_dir).compile) == ("bf16", "none")
    assert "precision bf16 (accelerate launch), compile none (default)" in stdout.splitlines()
    assert "note:" not in stdout
    # autocast was on: the same seeds and data give other losses than the full-precision run
    assert len(losses(run_dir)) == len(losses(runs["fp32"][0])) > 0
    assert losses(run_dir) != losses(runs["fp32"][0])


def test_the_configs_explicit_no_overrides_the_launcher_with_a_note_and_trains_in_fp32(runs):
    run_dir, stdout = runs["no"]
    lines = stdout.splitlines()
    assert lines.count("note: train.mixed_precision=no (config) overrides accelerate launch's bf16") == 1
    assert lines.count("note: train.compile=none (config) overrides accelerate launch's inductor (mode default)") == 1
    assert "precision no (config), compile none (config)" in lines
    assert (saved_train(run_dir).mixed_precision, saved_train(run_dir).compile) == ("no", "none")
    assert not (run_dir / "compile_cache").exists()
    assert losses(run_dir) == losses(runs["fp32"][0])  # bit for bit the full-precision, uncompiled run


def test_a_launch_that_chose_nothing_trains_in_fp32(runs):
    run_dir, stdout = runs["fp32"]
    assert "precision no (default), compile none (default)" in stdout.splitlines()
    assert (saved_train(run_dir).mixed_precision, saved_train(run_dir).compile) == ("no", "none")
