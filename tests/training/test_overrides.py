"""Overrides in every form a person or a wandb sweep agent writes them mean the same config.

The agent's forms are taken from wandb's own code (wandb/sdk/launch/sweeps/utils.py
create_sweep_command_args, and how wandb/wandb_agent.py Agent._command_run fills in the command).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from wandb.sdk.launch.sweeps.utils import DEFAULT_SWEEP_COMMAND, create_sweep_command_args

from tests.conftest import REPO, cpu_env
from toolbox.testing import accelerate_launch
from trainer.main import parse_args
from trainer.training.config import ConfigError, load_config, normalize_overrides, to_dict

REQUIRED = ["data.shards=s", "run.dir=r"]
# A requeued sweep run's parameters include the run's own `_wandb` config (wandb#4237).
WANDB_OWN = {"cli_version": "0.31.0", "python_version": "3.11.9", "start_time": 1700000000.5, "is_jupyter_run": False}
SWEEP = {
    "optim.lr": 0.1,
    "train.epochs": 30,
    "train.ema": True,
    "model.block_config": [2, 3],
    "schedule.final_lr_factor": 0,
    "wandb.name": "sweep run",
}


def sweep_args(params: dict, macro: str = "args") -> list[str]:
    """What wandb's agent puts in place of ${macro} for these sweep parameters."""
    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})[macro]


def agent_command(params: dict, program: str, command: list[str] = DEFAULT_SWEEP_COMMAND) -> list[str]:
    """wandb/wandb_agent.py Agent._command_run: each ${macro} word replaced by its list of words."""
    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars.update(interpreter=["python"], program=[program], env=["/usr/bin/env"])
    words = []
    for word in map(str, command):
        if word.startswith("${") and word.endswith("}"):
            words += sweep_vars.get(word[2:-1]) or []
        else:
            words.append(word)
    return words


def resolved(words: list[str]) -> dict:
    args, overrides = parse_args(["--config", "configs/demo.yaml", *words])
    return to_dict(load_config(args.config, [*REQUIRED, *overrides]))


def test_the_three_forms_resolve_to_the_same_config():
    plain = ["optim.lr=0.1", "train.epochs=30", "model.block_config=[2,3]", "wandb.name=a b", "train.ema=true"]
    dashed = [
        "--optim.lr=0.1",
        "--train.epochs=30",
        "--model.block_config=[2,3]",
        "--wandb.name=a b",
        "--train.ema=true",
    ]
    spaced = ["--optim.lr", "0.1", "--train.epochs", "30", "--model.block_config", "[2,3]", "--wandb.name", "a b"]
    spaced += ["--train.ema", "true"]
    mixed = [
        "optim.lr=0.1",
        "--train.epochs",
        "30",
        "--model.block_config=[2,3]",
        "--wandb.name",
        "a b",
        "train.ema=true",
    ]
    expected = resolved(plain)
    assert expected["optim"]["lr"] == 0.1 and expected["train"]["epochs"] == 30 and expected["wandb"]["name"] == "a b"
    for words in (dashed, spaced, mixed):
        assert resolved(words) == expected


def test_config_and_debug_stay_options_wherever_they_are():
    args, overrides = parse_args(["--optim.lr", "0.1", "--config=configs/demo.yaml", "train.epochs=3", "--debug"])
    assert (args.config, args.debug) == ("configs/demo.yaml", True)
    assert normalize_overrides(overrides) == ["optim.lr=0.1", "train.epochs=3"]


@pytest.mark.parametrize(
    "words, key, value",
    [
        (["--schedule.final_lr_factor", "0"], ("schedule", "final_lr_factor"), 0.0),
        (["--data.rotation", "-0"], ("data", "rotation"), 0.0),
        (["--wandb.name", "-x-"], ("wandb", "name"), "-x-"),
        (["--wandb.name=--x"], ("wandb", "name"), "--x"),  # a value starting with -- needs the = form
    ],
)
def test_a_value_may_start_with_a_dash(words, key, value):
    section, leaf = key
    assert resolved(words)[section][leaf] == value


def test_a_negative_value_reaches_validation_in_every_form():
    for words in (["optim.lr=-0.1"], ["--optim.lr=-0.1"], ["--optim.lr", "-0.1"]):
        _, overrides = parse_args(words)
        with pytest.raises(ConfigError, match=r"^optim.lr=-0.1 is out of range"):
            load_config(None, [*REQUIRED, *overrides])


@pytest.mark.parametrize("macro", ["args", "args_no_hyphens", "args_no_equals"])
def test_wandb_own_key_is_ignored(macro):
    words = sweep_args({**SWEEP, "_wandb": WANDB_OWN}, macro)
    assert any("_wandb" in word for word in words)
    assert resolved(words) == resolved(sweep_args(SWEEP, macro))
    assert normalize_overrides(["_wandb.x=1", "--_wandb.y", "2", "optim.lr=1"]) == ["optim.lr=1"]


@pytest.mark.parametrize("macro", ["args", "args_no_hyphens", "args_no_equals"])
def test_each_agent_macro_means_the_sweep_values(macro):
    config = resolved(sweep_args(SWEEP, macro))
    assert config["optim"]["lr"] == 0.1 and config["train"]["epochs"] == 30 and config["train"]["ema"] is True
    assert config["model"]["block_config"] == [2, 3] and config["schedule"]["final_lr_factor"] == 0.0
    assert config["wandb"]["name"] == "sweep run"


def test_the_agents_default_command_parses():
    """`command: [${env}, ${interpreter}, ${program}, ${args}]`, as a requeued run gets it."""
    command = agent_command({"optim.lr": 0.1, "train.epochs": 30, "_wandb": WANDB_OWN}, "trainer/main.py")
    assert command[:3] == ["/usr/bin/env", "python", "trainer/main.py"]
    assert command[3:5] == ["--optim.lr=0.1", "--train.epochs=30"] and command[5].startswith("--_wandb={'cli_version'")
    config = resolved(command[3:])
    assert config["optim"]["lr"] == 0.1 and config["train"]["epochs"] == 30 and "_wandb" not in config


def test_a_flag_without_a_value_is_a_one_line_error():
    for words in (["--optim.lr"], ["--optim.lr", "--train.epochs=3"], ["--lr=0.1"]):
        with pytest.raises(ConfigError, match="must look like section.key=value") as info:
            load_config(None, [*REQUIRED, *words])
        assert "\n" not in str(info.value)


def cli(*words: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "trainer/main.py", "--config", "configs/demo.yaml", *words],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("words", [["optim.lrr=0.1"], ["--optim.lrr=0.1"], ["--optim.lrr", "0.1"]])
def test_cli_typo_is_the_one_line_error_in_every_form(words):
    result = cli(*words, "--_wandb={'cli_version': '0.31.0'}")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key 'optim.lrr' — did you mean 'optim.lr'?"


def test_cli_help_names_the_forms():
    result = subprocess.run(
        [sys.executable, "trainer/main.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "--section.key=value | --section.key value" in result.stdout


def fake_slurm(tmp_path: Path) -> dict:
    """PATH with an `srun` that records its words and a silent `scontrol`: train.sh up to the step."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path / "srun.args"}\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\nexit 0\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return cpu_env(PATH=path, SLURM_JOB_ID="7", REPO=str(REPO), VENV="", RUNS_ROOT=str(tmp_path / "runs"))


def test_slurm_train_passes_every_form_through(tmp_path):
    words = ["--optim.lr", "0.1", "--train.epochs=3", "data.workers=1", "--_wandb={'cli_version': '0.31.0'}"]
    subprocess.run(
        ["bash", "slurm/train.sh", "--config", "configs/demo.yaml", *words],
        cwd=REPO,
        env=fake_slurm(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    passed = (tmp_path / "srun.args").read_text().splitlines()
    main = passed.index(f"{REPO}/trainer/main.py")
    run_dir = f"run.dir={tmp_path / 'runs'}/demo-7"
    assert passed[main + 1 :] == ["--config", "configs/demo.yaml", run_dir, "wandb.group=demo", *words]


def test_slurm_train_reports_a_typo_before_starting(tmp_path):
    result = subprocess.run(
        ["bash", "slurm/train.sh", "configs/demo.yaml", "--optim.lrr", "0.1"],
        cwd=REPO,
        env=fake_slurm(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key 'optim.lrr' — did you mean 'optim.lr'?"
    assert not (tmp_path / "srun.args").exists()


@pytest.mark.e2e
def test_a_config_error_under_two_processes_is_said_once():
    result = subprocess.run(
        accelerate_launch(
            REPO / "trainer/main.py", ["--config", "configs/demo.yaml", "--optim.lrr", "0.1"], processes=2
        ),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown config key 'optim.lrr' — did you mean 'optim.lr'?"]
