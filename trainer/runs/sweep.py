"""A hyperparameter sweep, in wandb's sweep YAML, run two ways: as a Slurm job array that needs no
wandb server (slurm/sweep.sh), and as runs that `wandb agent` starts.

    python -m trainer.sweep configs/sweeps/demo-lr.yaml configs/demo.yaml [overrides ...]

checks every point of the sweep against the config (an unknown key, a bad value: one line naming
the point) and prints each array task's overrides and run dir, then the sbatch line that runs them.

The YAML is wandb's own, so the same file works with `wandb sweep`: `name`, `method` (grid |
random here; bayes needs wandb's server), `metric` {name, goal}, `run_cap`, and `parameters`, each
with `value`, `values` (with `probabilities` for random) or a `distribution` with `min`/`max`
(`mu`/`sigma` for the normals, `q` for the quantized ones). Task i of a grid is its i-th point:
the product of the parameters' values in the file's order, the last one varying fastest. Task i
of a random sweep is its i-th draw, seeded by the sweep's name and i, so a requeued task (or the
same array submitted again) draws the same point and resumes the same run dir.

Under `wandb agent` (WANDB_SWEEP_ID and WANDB_RUN_ID in the environment) the trainer (config.join_agent_sweep) gives
each run its own run dir, RUNS_ROOT/<sweep id>/<run id>, and the agent's run id: a preempted run
that wandb hands out again continues the same dir, checkpoints and wandb run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from toolbox.cli import add_debug_flag, run_command
from toolbox.errors import UserError
from trainer.training.config import RUNS_ROOT, load_config

METHODS = ("grid", "random")
GOALS = ("maximize", "minimize")
SAMPLERS = {  # distribution -> the keys it needs
    "constant": ("value",),
    "categorical": ("values",),
    "int_uniform": ("min", "max"),
    "uniform": ("min", "max"),
    "q_uniform": ("min", "max"),
    "log_uniform": ("min", "max"),  # min/max are natural-log exponents, as wandb has it
    "log_uniform_values": ("min", "max"),
    "q_log_uniform_values": ("min", "max"),
    "normal": ("mu", "sigma"),
    "log_normal": ("mu", "sigma"),
}
MAX_GRID = 10_000  # points; Slurm's MaxArraySize is 1001 by default
DESCRIPTION_CHARS = 60


@dataclass(frozen=True)
class Parameter:
    key: str  # a config key: optim.lr
    spec: dict  # wandb's: value | values (+ probabilities) | distribution + its keys

    @property
    def choices(self) -> Sequence | None:
        """The values a grid enumerates; None for a continuous distribution. int_uniform's is a range,
        never a list: its size is checked before anything is enumerated."""
        if "value" in self.spec:
            return [self.spec["value"]]
        if "values" in self.spec:
            return list(self.spec["values"])
        if self.spec.get("distribution") == "int_uniform":
            return range(self.spec["min"], self.spec["max"] + 1)
        return None


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    method: str
    metric: dict  # {name, goal}; {} when the file has none
    parameters: tuple[Parameter, ...]
    run_cap: int | None

    @property
    def size(self) -> int | None:
        """The points a grid has, the draws a random sweep caps at; None for an uncapped random one."""
        if self.method == "grid":
            return math.prod(len(p.choices) for p in self.parameters)
        return self.run_cap

    @property
    def swept(self) -> list[str]:
        """The keys that take more than one value: a run's description names only these."""
        return [p.key for p in self.parameters if p.choices is None or len(p.choices) > 1]


def read_sweep(path: Path) -> Sweep:
    """A sweep YAML, validated: every problem is one line naming the field and the fix."""
    spec = _load(path)
    method = spec.get("method", "grid")
    if method == "bayes":
        raise UserError(
            f"{path}: method bayes needs wandb's server to choose each point — create it with `wandb sweep {path}` "
            "and run `sbatch --array=0-N slurm/sweep.sh wandb:ENTITY/PROJECT/SWEEP_ID`, or use grid or random"
        )
    if method not in METHODS:
        raise UserError(f"{path}: method is {method!r} — use grid or random (or bayes with wandb's server)")
    parameters = spec.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise UserError(f"{path} has no parameters — add e.g. `parameters: {{optim.lr: {{values: [0.001, 0.01]}}}}`")
    sweep = Sweep(
        path=Path(path),
        name=_name(spec.get("name"), Path(path)),
        method=method,
        metric=_metric(spec.get("metric"), path),
        parameters=tuple(_parameter(key, value, path, method) for key, value in _flatten(parameters)),
        run_cap=_run_cap(spec.get("run_cap"), path),
    )
    if sweep.method == "grid" and sweep.size > MAX_GRID:
        raise UserError(
            f"{path}: the grid has {sweep.size:,} points (more than {MAX_GRID:,}) — use method random with run_cap"
        )
    return sweep


def read_metric(path: Path) -> dict:
    """Only the sweep's metric {name, goal} (trainer.compare ranks runs by it)."""
    metric = _metric(_load(path).get("metric"), path)
    if not metric:
        raise UserError(f"{path} has no metric — add `metric: {{name: best_top1, goal: maximize}}`")
    return metric


def _load(path: Path) -> dict:
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise UserError(
            f"cannot read sweep file {path} ({why}) — pass a wandb sweep YAML, e.g. configs/sweeps/demo-lr.yaml"
        ) from e
    if not isinstance(spec, dict):
        raise UserError(f"{path} is not a sweep (not a YAML mapping) — see configs/sweeps/demo-lr.yaml")
    return spec


def _flatten(parameters: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """wandb's nested form (`optim: {parameters: {lr: ...}}`) as dotted keys, in the file's order."""
    out = []
    for key, value in parameters.items():
        if isinstance(value, dict) and isinstance(value.get("parameters"), dict):
            out += _flatten(value["parameters"], f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _name(name, path: Path) -> str:
    name = path.stem if name is None else str(name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise UserError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-' (it names the sweep's folder)")
    return name


def _metric(metric, path) -> dict:
    if metric is None:
        return {}
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise UserError(f"{path}: metric needs a name — e.g. `metric: {{name: best_top1, goal: maximize}}`")
    if metric.get("goal", "maximize") not in GOALS:
        raise UserError(f"{path}: metric.goal is {metric['goal']!r} — use maximize or minimize")
    return {"name": metric["name"], "goal": metric.get("goal", "maximize")}


def _run_cap(run_cap, path) -> int | None:
    if run_cap is not None and (isinstance(run_cap, bool) or not isinstance(run_cap, int) or run_cap < 1):
        raise UserError(f"{path}: run_cap is {run_cap!r} — give a whole number of runs, at least 1")
    return run_cap


def _parameter(key: str, spec, path, method: str) -> Parameter:
    where = f"{path}: parameter {key}"
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a mapping — e.g. `{key}: {{values: [a, b]}}` or `{key}: {{value: a}}`")
    if "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise UserError(f"{where}: values must be a non-empty list")
        if "probabilities" in spec:
            _check_probabilities(spec, where)
    distribution = spec.get("distribution")
    if distribution is None and "value" not in spec and "values" not in spec:
        distribution = "uniform" if "min" in spec and "max" in spec else None  # wandb infers it from min/max
        if distribution is None:
            raise UserError(f"{where} needs value, values, or a distribution with min and max")
        spec = {**spec, "distribution": distribution}
    if distribution is not None:
        if distribution not in SAMPLERS:
            raise UserError(
                f"{where}: distribution {distribution!r} is not supported here — use one of {', '.join(SAMPLERS)}"
            )
        missing = [k for k in SAMPLERS[distribution] if k not in spec]
        if missing:
            raise UserError(f"{where}: distribution {distribution} needs {' and '.join(missing)}")
        _check_numbers(spec, distribution, where)
        if "min" in spec and not spec["min"] < spec["max"]:
            raise UserError(f"{where}: min ({spec['min']}) must be below max ({spec['max']})")
        if distribution in ("log_uniform_values", "q_log_uniform_values") and spec["min"] <= 0:
            raise UserError(f"{where}: {distribution} needs min above 0 (it is {spec['min']})")
    parameter = Parameter(key, spec)
    if method == "grid" and parameter.choices is None:
        raise UserError(f"{where}: a grid needs values (or int_uniform) — list the values, or use method random")
    return parameter


MAX_EXPONENT = 700  # exp() of more overflows a float


def _check_numbers(spec: dict, distribution: str, where: str) -> None:
    """A distribution's numbers: finite, of the right kind, and such that every draw is a number."""
    for key in ("min", "max", "mu", "sigma", "q"):
        value = spec.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            hint = " (YAML reads 1e-5 as text: write 1.0e-5)" if isinstance(value, str) else ""
            raise UserError(f"{where}: {key} is {value!r}, not a finite number{hint}")
    if spec.get("q", 1) <= 0 or spec.get("sigma", 1) < 0:
        raise UserError(f"{where}: q must be above 0 and sigma not below 0")
    if distribution == "int_uniform" and not all(isinstance(spec[k], int) for k in ("min", "max")):
        raise UserError(f"{where}: int_uniform needs whole numbers for min and max")
    top = spec.get("max", 0) if distribution == "log_uniform" else spec.get("mu", 0) + 10 * spec.get("sigma", 0)
    if distribution in ("log_uniform", "log_normal") and top > MAX_EXPONENT:
        raise UserError(
            f"{where}: {distribution} draws exp() of its numbers, and exp({top:g}) is not a number — give them as "
            "natural logs (e.g. min -9.2, max -2.3 for 1e-4..0.1), or use log_uniform_values with the values themselves"
        )


def _check_probabilities(spec: dict, where: str) -> None:
    probabilities = spec["probabilities"]
    if not isinstance(probabilities, list) or len(probabilities) != len(spec["values"]):
        raise UserError(f"{where}: probabilities must list one number per value")
    if any(not isinstance(p, (int, float)) or p < 0 for p in probabilities) or not math.isclose(sum(probabilities), 1):
        raise UserError(f"{where}: probabilities must be non-negative and sum to 1 (they sum to {sum(probabilities)})")


def point(sweep: Sweep, index: int) -> dict[str, Any]:
    """Task `index`'s value for every parameter."""
    size = sweep.size
    if index < 0:
        raise UserError(f"task {index} is out of range — array task ids start at 0")
    if size is not None and index >= size:
        unit = "points" if sweep.method == "grid" else "runs (run_cap)"
        raise UserError(
            f"task {index} is out of range: sweep {sweep.name} has {size} {unit} — submit with --array=0-{size - 1}"
        )
    if sweep.method == "grid":
        choices = [p.choices for p in sweep.parameters]
        picked = _nth_product(choices, index)
        return {p.key: value for p, value in zip(sweep.parameters, picked)}
    rng = random.Random(f"{sweep.name}:{index}")  # a str seed is hashed with sha512: the same in every process
    return {p.key: draw(p.spec, rng) for p in sweep.parameters}


def _nth_product(choices: list[list], index: int) -> list:
    """itertools.product(*choices)'s `index`-th tuple, without walking to it."""
    picked = []
    for options in reversed(choices):
        index, i = divmod(index, len(options))
        picked.append(options[i])
    return picked[::-1]


def draw(spec: dict, rng: random.Random):
    """One value as wandb's random search draws it."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choices(spec["values"], weights=spec.get("probabilities"))[0]
    name, low, high = spec["distribution"], spec.get("min"), spec.get("max")
    q = spec.get("q", 1)
    if name == "int_uniform":
        return rng.randint(int(low), int(high))
    if name == "uniform":
        return rng.uniform(low, high)
    if name == "q_uniform":
        return round(rng.uniform(low, high) / q) * q
    if name == "log_uniform":
        return math.exp(rng.uniform(low, high))
    if name == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if name == "q_log_uniform_values":
        return round(math.exp(rng.uniform(math.log(low), math.log(high))) / q) * q
    if name == "normal":
        return rng.gauss(spec["mu"], spec["sigma"])
    return math.exp(rng.gauss(spec["mu"], spec["sigma"]))  # log_normal


def overrides(values: dict[str, Any]) -> list[str]:
    """`key=value` words the trainer reads back as the same values (YAML scalars and flow lists)."""
    return [f"{key}={_yaml_scalar(value)}" for key, value in values.items()]


def _yaml_scalar(value) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def describe(sweep: Sweep, index: int, values: dict[str, Any]) -> str:
    """`<index>-<short description>`: the run dir's name, e.g. 3-lr0.01-weight_decay0.05."""
    name = str(index)
    for key in sweep.swept:  # whole parts only, while the name stays short
        part = re.sub(r"[^A-Za-z0-9._=]+", "_", f"{key.rsplit('.', 1)[-1]}{_short(values[key])}")
        if len(name) + 1 + len(part) > DESCRIPTION_CHARS:
            break
        name += f"-{part}"
    return name


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "x".join(map(str, value))
    return str(value)


def task(sweep: Sweep, index: int, runs_root: Path) -> tuple[list[str], Path]:
    """Array task `index`: its point as overrides, and its run dir."""
    values = point(sweep, index)
    return overrides(values), runs_root / sweep.name / describe(sweep, index, values)


def task_overrides(sweep: Sweep, index: int, runs_root: Path) -> list[str]:
    """Everything task `index` adds to the command line: its point, its run dir, the sweep as wandb group."""
    words, run_dir = task(sweep, index, runs_root)
    return [*words, f"run.dir={run_dir}", f"wandb.group={sweep.name}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.sweep",
        description="Check a sweep against a config and print its Slurm array: each task's overrides and run dir.",
    )
    parser.add_argument("sweep", type=Path, help="a wandb sweep YAML (configs/sweeps/)")
    parser.add_argument("config", help="the training config the sweep's points override")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="section.key=value for every task")
    parser.add_argument("--task", type=int, help="print only this task's overrides, one per line (slurm/sweep.sh)")
    parser.add_argument(
        "--tasks", type=positive, help="random sweeps without run_cap: how many draws to list (default 10)"
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: show_task(args) if args.task is not None else show_plan(args), args.debug)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tasks, at least 1")
    return value


def show_task(args) -> int:
    sweep = read_sweep(args.sweep)
    words = task_overrides(sweep, args.task, Path(os.environ.get(RUNS_ROOT) or "runs").resolve())
    load_config(args.config, [*args.overrides, *words])  # a bad point stops the task before any node starts
    last = os.environ.get("SLURM_ARRAY_TASK_MAX")
    if args.task == 0 and sweep.size and last and last.isdigit() and int(last) < sweep.size - 1:
        print(
            f"note: the array's tasks end at {last}, but sweep {sweep.name} has {sweep.size} points — "
            f"submit --array={int(last) + 1}-{sweep.size - 1} for the rest",
            file=sys.stderr,
        )
    print("\n".join(words))
    return 0


def show_plan(args) -> int:
    sweep = read_sweep(args.sweep)
    count = sweep.size or args.tasks or 10
    root = Path(os.environ.get(RUNS_ROOT) or "runs")
    for index in range(count):
        words, run_dir = task(sweep, index, root)
        try:
            load_config(args.config, [*args.overrides, *task_overrides(sweep, index, root)])
        except UserError as e:
            raise UserError(f"task {index} ({' '.join(words)}): {e}") from e
        print(f"{index:>4}  {run_dir}  {' '.join(words)}")
    extra = " ".join(shlex.quote(w) for w in args.overrides)
    total = f"{count} points" if sweep.method == "grid" else f"{count} draws" + ("" if sweep.size else " (no run_cap)")
    print(f"{total}; submit: sbatch --array=0-{count - 1} slurm/sweep.sh {args.sweep} {args.config} {extra}".rstrip())
    return 0
