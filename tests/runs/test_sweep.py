"""trainer/sweep.py: a wandb sweep YAML read and numbered for a Slurm array, and a run that
`wandb agent` starts, with the command line built by wandb's own code."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY, cpu_env
from tests.wandb_agent import agent_command, agent_env
from toolbox.errors import UserError
from trainer.runs import sweep
from trainer.training.config import join_agent_sweep, load_config

DEMO = REPO / "configs/sweeps/demo-lr.yaml"


def write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "method": "grid", **spec}, sort_keys=False))
    return path


def test_grid_points_are_the_product_in_file_order_last_fastest():
    spec = sweep.read_sweep(DEMO)
    assert spec.size == 6 and spec.swept == ["optim.lr", "optim.weight_decay"]
    points = [sweep.point(spec, i) for i in range(6)]
    assert [(p["optim.lr"], p["optim.weight_decay"]) for p in points] == [
        (0.002, 0.01),
        (0.002, 0.05),
        (0.005, 0.01),
        (0.005, 0.05),
        (0.01, 0.01),
        (0.01, 0.05),
    ]
    assert sweep.describe(spec, 3, points[3]) == "3-lr0.005-weight_decay0.05"


def test_nested_parameters_and_fixed_values(tmp_path):
    path = write(
        tmp_path,
        {
            "parameters": {
                "optim": {"parameters": {"lr": {"values": [0.1, 0.2]}, "name": {"value": "sgd"}}},
                "model.block_config": {"values": [[2, 2], [4, 4]]},
            }
        },
    )
    spec = sweep.read_sweep(path)
    assert [p.key for p in spec.parameters] == ["optim.lr", "optim.name", "model.block_config"]
    assert spec.size == 4 and spec.swept == ["optim.lr", "model.block_config"]
    values = sweep.point(spec, 3)
    assert values == {"optim.lr": 0.2, "optim.name": "sgd", "model.block_config": [4, 4]}
    assert sweep.describe(spec, 3, values) == "3-lr0.2-block_config4x4"


def test_random_draws_are_seeded_by_the_sweep_and_the_task(tmp_path):
    path = write(
        tmp_path,
        {
            "method": "random",
            "run_cap": 50,
            "parameters": {
                "optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
                "optim.weight_decay": {"min": 0.0, "max": 0.1},  # wandb infers uniform
                "train.batch_size": {"distribution": "int_uniform", "min": 8, "max": 64},
                "optim.name": {"values": ["sgd", "adamw"], "probabilities": [0.25, 0.75]},
            },
        },
    )
    spec = sweep.read_sweep(path)
    draws = [sweep.point(spec, i) for i in range(50)]
    assert draws == [sweep.point(sweep.read_sweep(path), i) for i in range(50)]  # the same in any process
    assert len({d["optim.lr"] for d in draws}) == 50
    assert all(1e-4 <= d["optim.lr"] <= 1e-1 and 0 <= d["optim.weight_decay"] <= 0.1 for d in draws)
    assert all(isinstance(d["train.batch_size"], int) and 8 <= d["train.batch_size"] <= 64 for d in draws)
    assert {d["optim.name"] for d in draws} == {"sgd", "adamw"}
    renamed = sweep.read_sweep(write(tmp_path, {**yaml.safe_load(path.read_text()), "name": "other"}))
    assert sweep.point(renamed, 0) != draws[0]  # the sweep's name is part of the seed


def test_overrides_read_back_as_the_same_values():
    values = {"optim.lr": 0.1 / 3, "model.block_config": [2, 2], "model.growth_rate": None, "train.ema": True}
    config = load_config(REPO / "configs/demo.yaml", sweep.overrides(values))
    assert config.optim.lr == 0.1 / 3 and config.model.block_config == [2, 2]
    assert config.model.growth_rate is None and config.train.ema is True


def random_lr(distribution: str, **numbers) -> dict:
    return {"method": "random", "parameters": {"optim.lr": {"distribution": distribution, **numbers}}}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"method": "bayes", "parameters": {"optim.lr": {"values": [1]}}}, "method bayes needs wandb's server"),
        ({"method": "hyperband", "parameters": {"optim.lr": {"values": [1]}}}, "use grid or random"),
        ({"parameters": {}}, "has no parameters"),
        ({"parameters": {"optim.lr": {"min": 0.1, "max": 1}}}, "a grid needs values"),
        ({"parameters": {"optim.lr": {"values": []}}}, "values must be a non-empty list"),
        ({"method": "random", "parameters": {"optim.lr": {"distribution": "beta"}}}, "is not supported here"),
        ({"method": "random", "parameters": {"optim.lr": {"distribution": "normal", "mu": 1}}}, "needs sigma"),
        ({"method": "random", "parameters": {"optim.lr": {"min": 1, "max": 0.5}}}, "must be below max"),
        (
            {
                "method": "random",
                "parameters": {"optim.lr": {"distribution": "log_uniform_values", "min": 0, "max": 1}},
            },
            "needs min above 0",
        ),
        (
            {"method": "random", "parameters": {"optim.name": {"values": ["a", "b"], "probabilities": [0.5, 0.6]}}},
            "sum to 1",
        ),
        ({"name": "a b", "parameters": {"optim.lr": {"values": [1]}}}, "names the sweep's folder"),
        ({"metric": {"name": "best_top1", "goal": "up"}, "parameters": {"optim.lr": {"values": [1]}}}, "goal"),
        ({"parameters": {f"k{i}.x": {"values": list(range(10))} for i in range(5)}}, "more than 10,000"),
        # Each of these was a traceback, a hang or a MemoryError.
        (random_lr("q_uniform", min=0.1, max=1, q=0), "q must be above 0"),
        (random_lr("log_uniform", min=0, max=1000), "exp(1000) is not a number — give them as natural logs"),
        (random_lr("log_normal", mu=100, sigma=100), "exp(1100) is not a number"),
        (random_lr("uniform", min="1e-5", max=0.1), "min is '1e-5', not a finite number (YAML reads 1e-5 as text"),
        (random_lr("uniform", min=0.1, max=float("inf")), "max is inf, not a finite number"),
        (random_lr("int_uniform", min=0.5, max=3), "int_uniform needs whole numbers"),
        ({"parameters": {"train.seed": {"distribution": "int_uniform", "min": 0, "max": 10**12}}}, "more than 10,000"),
    ],
)
def test_a_bad_sweep_is_one_line_naming_the_field(tmp_path, spec, message):
    with pytest.raises(UserError) as raised:
        sweep.read_sweep(write(tmp_path, spec))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_task_out_of_range_names_the_array_to_submit():
    spec = sweep.read_sweep(DEMO)
    with pytest.raises(
        UserError, match=r"task 6 is out of range: sweep demo-lr has 6 points — submit with --array=0-5"
    ):
        sweep.point(spec, 6)


def run_sweep_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.sweep", *args],
        cwd=REPO,
        env=cpu_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plan_lists_every_task_and_the_sbatch_line(tmp_path):
    result = run_sweep_cli(str(DEMO), "configs/demo.yaml", "train.epochs=3", RUNS_ROOT=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "0",
        f"{tmp_path}/demo-lr/0-lr0.002-weight_decay0.01",
        "optim.lr=0.002",
        "optim.weight_decay=0.01",
    ]
    assert len(lines) == 7
    assert lines[-1] == (f"6 points; submit: sbatch --array=0-5 slurm/sweep.sh {DEMO} configs/demo.yaml train.epochs=3")


def test_plan_stops_at_an_unknown_key_naming_the_point(tmp_path):
    path = write(tmp_path, {"parameters": {"optim.lrr": {"values": [0.1, 0.2]}}})
    result = run_sweep_cli(str(path), "configs/demo.yaml")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: task 0 (optim.lrr=0.1): unknown config key 'optim.lrr' — did you mean 'optim.lr'?"
    )


def test_task_prints_its_words_and_notes_an_array_too_small(tmp_path):
    result = run_sweep_cli(
        "--task", "0", str(DEMO), "configs/demo.yaml", RUNS_ROOT=str(tmp_path), SLURM_ARRAY_TASK_MAX="2"
    )
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "demo-lr" / "0-lr0.002-weight_decay0.01"
    assert result.stdout.splitlines() == [
        "optim.lr=0.002",
        "optim.weight_decay=0.01",
        f"run.dir={run_dir}",
        "wandb.group=demo-lr",
    ]
    assert "submit --array=3-5 for the rest" in result.stderr
    bad = run_sweep_cli("--task", "0", str(DEMO), "configs/demo.yaml", "train.epochs=many")
    assert bad.returncode == 2 and bad.stderr.startswith("error: train.epochs:") and bad.stderr.count("\n") == 1


def test_join_agent_sweep_takes_the_agents_run_id_and_its_own_run_dir(tmp_path):
    config = load_config(REPO / "configs/demo.yaml", ["wandb.mode=online"])
    assert join_agent_sweep(config, {}) == (config, None)
    env = {"WANDB_SWEEP_ID": "sw33p", "WANDB_RUN_ID": "r4nd0m", "RUNS_ROOT": str(tmp_path)}
    joined, note = join_agent_sweep(config, env)
    assert joined.run.dir == str(tmp_path / "sw33p" / "r4nd0m") and joined.wandb.id == "r4nd0m"
    assert dataclasses.replace(joined, run=config.run, wandb=config.wandb) == config  # nothing else changes
    assert note == f"wandb sweep sw33p, run r4nd0m: run.dir {tmp_path / 'sw33p' / 'r4nd0m'}"
    offline = load_config(REPO / "configs/demo.yaml")
    with pytest.raises(UserError, match="wandb.mode=offline cannot join wandb sweep sw33p"):
        join_agent_sweep(offline, env)


def run_env(tmp_path: Path, run_id: str) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # accelerate, as the agent's PATH would have it
    environ = cpu_env(PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), RUNS_ROOT=str(tmp_path / "runs"))
    return agent_env(environ, "sw33p", run_id, tmp_path)


@pytest.mark.e2e
def test_the_command_wandb_agent_builds_starts_a_run_in_its_own_dir(digits_shards, tmp_path):
    values = dict(word.split("=", 1) for word in TINY)
    values.update({"optim.lr": 0.02, "train.epochs": 1, "data.cache_limit": None, "data.shards": str(digits_shards)})
    command = agent_command(DEMO, values, "disabled")
    assert command[:6] == ["/usr/bin/env", "accelerate", "launch", "trainer/main.py", "--config", "configs/demo.yaml"]
    assert "--optim.lr=0.02" in command and "--data.cache_limit=None" in command
    result = subprocess.run(
        command, cwd=REPO, env=run_env(tmp_path, "r4nd0m"), capture_output=True, text=True, timeout=600
    )
    run_dir = tmp_path / "runs" / "sw33p" / "r4nd0m"
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wandb sweep sw33p, run r4nd0m: run.dir {run_dir}" in result.stdout
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.02 and saved["wandb"]["id"] == "r4nd0m" and saved["data"]["cache_limit"] is None


@pytest.mark.e2e
def test_an_offline_run_under_the_agent_is_refused_before_anything_starts(tmp_path):
    command = agent_command(DEMO, {"optim.lr": 0.02}, "offline")
    result = subprocess.run(command, cwd=REPO, env=run_env(tmp_path, "r1"), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: wandb.mode=offline cannot join wandb sweep sw33p: an offline run reaches no sweep — use wandb.mode=online "
        "under `wandb agent`, or run the sweep without a server as a Slurm array (slurm/sweep.sh)"
    ]
    assert not (tmp_path / "runs").exists()


def test_a_count_of_tasks_below_one_is_refused_in_one_line():
    result = run_sweep_cli("--tasks", "-5", str(DEMO), "configs/demo.yaml")
    assert result.returncode == 2 and "'-5' is not a whole number of tasks, at least 1" in result.stderr
