"""What `wandb agent` does with one run, taken from wandb's own code (wandb/wandb_agent.py,
Agent._command_run and AgentProcess), for tests that have no wandb server."""

from __future__ import annotations

from pathlib import Path

import yaml
from wandb.sdk.launch.sweeps import utils as sweep_utils


def agent_command(spec_path: Path, values: dict, mode: str) -> list[str]:
    """The command the agent runs for a run with these parameter values: the sweep's own
    `command`, its ${...} macros substituted as Agent._command_run does, and its
    wandb.mode=online made wandb.mode=MODE."""
    spec = yaml.safe_load(Path(spec_path).read_text())
    command = [word.replace("wandb.mode=online", f"wandb.mode={mode}") for word in spec["command"]]
    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars.update(interpreter=["python"], program=[spec["program"]], env=["/usr/bin/env"])
    words = []
    for word in sweep_utils.create_sweep_command(command):
        word = str(word)
        words += sweep_vars.get(word[2:-1]) or [] if word.startswith("${") and word.endswith("}") else [word]
    return words


def agent_env(environ: dict, sweep_id: str, run_id: str, base_dir: Path) -> dict:
    """The environment the agent gives the run (and the sweep-param file it writes under WANDB_DIR,
    which slurm/sweep.sh reads to learn the run id)."""
    params = Path(base_dir) / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"
    params.parent.mkdir(parents=True, exist_ok=True)
    params.write_text("{}\n")
    return dict(environ, WANDB_SWEEP_ID=sweep_id, WANDB_RUN_ID=run_id, WANDB_SWEEP_PARAM_PATH=str(params))
