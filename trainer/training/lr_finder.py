"""`python -m trainer.find_lr`: the learning-rate range test (Smith 2017, as fastai's and
Lightning's lr_find run it).

The rate grows exponentially from --start-lr to --end-lr over at most --steps optimizer steps of the
config's own loader, augmentation, model, precision and optimizer (the training loop's micro-batch,
trainer.training.loop.forward_backward), each step's loss averaged over the processes. The loss is
smoothed (an exponential moving average, bias-corrected) and the test stops once it diverges. The
suggestion is fastai's `valley`; the steepest descent is printed beside it. Nothing of the config's
run is read or written: the model starts from its initialisation (or model.pretrained), and the
curve goes to a folder of its own.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from toolbox.cli import Console, add_debug_flag, run_command
from toolbox.cores import usable_cores
from toolbox.errors import UserError
from trainer.training.build import build_model
from trainer.training.config import Config, load_config
from trainer.training.data import build_loaders, loader_workers, open_shards
from trainer.training.launcher import accelerate_args, choose_layout, launch
from trainer.training.loop import TrainInputs, forward_backward, optimizer_step, train_inputs, train_mode
from trainer.training.optim import config_lr, resolved_scale
from trainer.training.randomness import mix_seed
from trainer.training.runtime import (
    close_job,
    make_accelerator,
    said_once,
    settle_launch,
    stop_with_launcher,
    use_threads,
)
from trainer.training.sizing import settle_sizes
from trainer.training.state import TrainState
from trainer.training.tracking.plots import plot_lr_finder
from trainer.training.transforms import normalization

SCRIPT = Path(__file__).resolve().parent.parent / "find_lr.py"  # what `--processes N` launches N times
STEPS, START_LR, END_LR = 100, 1e-7, 10.0  # fastai's and Lightning's defaults
MIN_STEPS = 20  # fewer leave no curve to read once its start and end are set aside
BETA = 0.98  # the smoothing's weight on the past (fastai)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its best (fastai, Lightning)
SKIP_END = 5  # the last points, already climbing, never hold the suggestion (fastai); and the first tenth
CSV_NAME, PLOT_NAME = "find_lr.csv", "find_lr.png"


@dataclass
class Curve:
    """The test's record: each step's rate, loss, and loss smoothed by a bias-corrected EMA."""

    beta: float = BETA
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    average: float = 0.0

    def add(self, lr: float, loss: float) -> None:
        self.average = self.beta * self.average + (1 - self.beta) * loss
        # Dividing by 1 - beta^n undoes the average's pull towards its start at 0.
        self.lrs.append(lr)
        self.losses.append(loss)
        self.smoothed.append(self.average / (1 - self.beta ** (len(self.losses))))

    def diverged(self, factor: float = DIVERGED) -> bool:
        """The last loss is not finite, or the smoothed loss passed `factor` x its best so far."""
        last = self.smoothed[-1]
        return not math.isfinite(self.losses[-1]) or not math.isfinite(last) or last > factor * min(self.smoothed)


def steepest(lrs: list[float], smoothed: list[float]) -> int:
    """Where the smoothed loss falls fastest against log lr (its most negative gradient)."""
    return int(np.argmin(np.gradient(np.asarray(smoothed), np.log(np.asarray(lrs)))))


def valley(smoothed: list[float]) -> int:
    """fastai's `valley`: the longest valley is the longest run (not necessarily contiguous) of ever
    lower losses, and the suggestion lies halfway along it, its start counted back from its end by
    the run's length (fastai's rule: a run that began in the plateau's noise starts later so). A rate
    inside the fall and short of its bottom, which one noisy dip cannot move far."""
    n = len(smoothed)
    length = [1] * n  # the longest run of ever lower losses that ends at i
    for i in range(n):
        for j in range(i):
            if smoothed[i] < smoothed[j]:
                length[i] = max(length[i], length[j] + 1)
    end = max(range(n), key=lambda i: (length[i], -i))  # the first of the longest
    start = end - length[end]
    third = (end - start) / 3
    return max(0, start + int(third) + int(third / 2))


def suggestions(curve: Curve, steps: int) -> dict[str, int]:
    """valley (the suggestion) and steepest, as indices of the curve, chosen past its first tenth
    (the steps planned) and before its last SKIP_END points; none when too little is left."""
    first, last = steps // 10, len(curve.lrs) - SKIP_END
    if last - first < 3:
        return {}
    window = curve.smoothed[first:last]
    return {
        "valley": first + valley(window),
        "steepest": first + steepest(curve.lrs[first:last], window),
    }


@dataclass(frozen=True)
class Plan:
    start: float
    end: float
    steps: int

    def factor(self, step: int) -> float:
        """The rate at `step` over the rate at step 0: exponential from start to end."""
        return (self.end / self.start) ** (step / (self.steps - 1))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.find_lr",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [-h] --config YAML [--steps N] [--start-lr LR] [--end-lr LR] [--out DIR] "
        "[--processes N] [--debug] [section.key=value ...]",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML file in configs/, e.g. configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps at most (default {STEPS})")
    parser.add_argument("--start-lr", type=float, default=START_LR, help=f"the first rate (default {START_LR:g})")
    parser.add_argument("--end-lr", type=float, default=END_LR, help=f"the last rate (default {END_LR:g})")
    parser.add_argument("--out", help="folder for find_lr.csv and find_lr.png (default: <run.dir>-find_lr)")
    parser.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="run under `accelerate launch` with N processes, as `python -m trainer` would (default: this one)",
    )
    add_debug_flag(parser)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    first_rank = os.environ.get("RANK", "0") == "0"  # under accelerate launch every rank reads the same

    def body() -> int:
        plan = check_plan(args)
        config = load_config(args.config, overrides)
        config, lines = settle_sizes(config, open_shards(config.data.shards, config.data).manifest)
        out = output_dir(args.out, config)
        if args.processes is not None and args.processes > 1:
            return relaunch(args, overrides, config, out)
        for line in lines:
            Console(first_rank).say(line)
        return find_lr(config, plan, out)

    def explain(e: BaseException) -> tuple[int, str] | None:
        if isinstance(e, UserError) and getattr(e, "agreed", False) and not first_rank:
            return e.exit_code, ""  # every rank failed alike (said_once): rank 0 says it
        return None

    return run_command(body, args.debug, explain=explain, cleanup=close_job)


def check_plan(args: argparse.Namespace) -> Plan:
    if args.processes is not None and args.processes < 1:
        raise UserError(f"--processes {args.processes}: give 1 or more")
    if args.steps < MIN_STEPS:
        raise UserError(f"--steps {args.steps}: give at least {MIN_STEPS} (100 is usual)")
    if not 0 < args.start_lr < args.end_lr:
        raise UserError(
            f"--start-lr {args.start_lr:g} --end-lr {args.end_lr:g}: give 0 < start < end (default {START_LR:g} to "
            f"{END_LR:g})"
        )
    return Plan(args.start_lr, args.end_lr, args.steps)


def output_dir(asked: str | None, config: Config) -> Path:
    """--out, or <run.dir>-find_lr beside the run; never the run dir or a folder inside it."""
    run_dir = Path(config.run.dir).resolve()
    out = Path(asked) if asked else run_dir.with_name(run_dir.name + "-find_lr")
    if out.resolve() == run_dir or run_dir in out.resolve().parents:
        raise UserError(
            f"--out {out} is the config's run.dir {config.run.dir} or inside it — find_lr leaves runs alone; "
            "choose another folder"
        )
    return out


def relaunch(args: argparse.Namespace, overrides: list[str], config: Config, out: Path) -> int:
    """This command again under `accelerate launch`, N times, as `python -m trainer` launches the trainer."""
    layout = choose_layout(config, args.processes, torch.cuda.device_count(), usable_cores())
    Console(True).say(f"python -m trainer.find_lr: {layout.describe()}")
    flags = ["--steps", str(args.steps), "--start-lr", repr(args.start_lr), "--end-lr", repr(args.end_lr)]
    command = accelerate_args(layout, args.config, [*flags, "--out", str(out), *overrides], args.debug, SCRIPT)
    return launch(command, layout.device == "cpu", args.debug)


def find_lr(config: Config, plan: Plan, out: Path) -> int:
    """The test in this process (one rank of N under accelerate launch); the main process writes and says."""
    stop_with_launcher()  # a launcher that dies takes its processes with it
    # The run's own settings but nothing of its run: no EMA to keep, the rate the plan's, and any
    # compile cache in the output folder rather than the run dir.
    config, launched = settle_launch(config)
    tested = replace(
        config,
        optim=replace(config.optim, lr=plan.start, lr_base_size=None),
        train=replace(config.train, ema=False),
        run=replace(config.run, dir=str(out)),
    )
    accelerator = make_accelerator(tested, launched)
    console = Console(accelerator.is_main_process)
    console.say(use_threads(None, loader_workers(config.data.workers)[0]))
    state, inputs, order = prepare(tested, accelerator, console, plan)
    console.say(
        f"find_lr: {plan.steps} steps at most, lr {plan.start:g} to {plan.end:g}, global batch {state.global_batch} "
        f"({accelerator.num_processes} process(es) x {config.train.batch_size} x accumulation "
        f"{config.train.grad_accum}), {config.optim.name}"
    )
    curve = run_test(state, inputs, order, plan, console)
    found = suggestions(curve, plan.steps)
    settings = {name: config_setting(config, state.global_batch, curve.lrs[i]) for name, i in found.items()}
    if accelerator.is_main_process:
        written = write_outputs(curve, {f"{name}: {settings[name]}": i for name, i in found.items()}, out)
        console.say(f"wrote {written[0]} and {written[1]}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the others leave with the same code, quietly
        say_suggestion(
            curve, found, settings, how_scaled(config, state.global_batch, curve.lrs[found.get("valley", 0)])
        )
    return 0 if found else UserError.exit_code


def prepare(config: Config, accelerator, console: Console, plan: Plan) -> tuple[TrainState, TrainInputs, object]:
    """The training run's loader, device stages, model and optimizer (at the plan's rates), wrapped
    for the processes."""
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(mix_seed(config.train.seed, rank))  # as training starts: rank 0's weights go to all
    with said_once(accelerator):  # the same data error on every rank is one line
        source = open_shards(config.data.shards, config.data)
        mean, std = normalization(config.data, source.manifest.mean, source.manifest.std)
        loaders = build_loaders(config, source, mean, std, rank, world, accelerator.device.type == "cuda")
        inputs = train_inputs(config, loaders, source.manifest, (mean, std), accelerator.device, world)
    classes = len(source.manifest.classes)
    steps = inputs.batches // config.train.grad_accum
    state = TrainState(config, build_model(config, classes, console), accelerator, steps, console)
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, plan.factor)  # each group's rate x factor
    state.prepare()
    return state, inputs, loaders.order


def run_test(state: TrainState, inputs: TrainInputs, order, plan: Plan, console: Console) -> Curve:
    """Optimizer steps at growing rates until the plan ends or the loss diverges; every rank sees the
    same averaged loss, so all stop at the same step."""
    accelerator, curve = state.accelerator, Curve()
    batches = micro_batches(state, inputs, order)
    train_mode(state)
    every = max(1, plan.steps // 10)
    for step in range(plan.steps):
        lr = state.scheduler.get_last_lr()[0]
        loss = one_step(state, inputs, batches)
        if accelerator.num_processes > 1:
            loss = accelerator.reduce(loss, "mean")
        curve.add(lr, loss.item())
        stop = curve.diverged()
        if stop or (step + 1) % every == 0:
            console.say(
                f"step {step + 1}/{plan.steps}  lr {lr:.3g}  loss {curve.losses[-1]:.4f}  "
                f"smoothed {curve.smoothed[-1]:.4f}"
            )
        if stop:
            console.say(f"stopped at lr {lr:.3g}: {why_stopped(curve)}")
            break
    return curve


def why_stopped(curve: Curve) -> str:
    if not math.isfinite(curve.losses[-1]):
        return "the loss is not finite"
    return f"the smoothed loss passed {DIVERGED:g} x its best ({min(curve.smoothed):.4f})"


def micro_batches(state: TrainState, inputs: TrainInputs, order) -> Iterator[tuple]:
    """The train loader's batches, epoch after epoch, with progress.epoch/batch where each one is
    (the data order and the model's randomness are functions of them, as in training)."""
    progress = state.progress
    while True:
        order.set_epoch(progress.epoch, 0)
        for progress.batch, batch in zip(range(inputs.batches), inputs.loader):
            yield batch
        progress.epoch += 1


def one_step(state: TrainState, inputs: TrainInputs, batches: Iterator[tuple]) -> torch.Tensor:
    """One optimizer step as training takes it (accumulation, clipping, a non-finite step skipped)
    -> this rank's mean loss over its micro-batches."""
    state.guard.start()
    total = torch.zeros((), device=state.accelerator.device)
    for _ in range(state.config.train.grad_accum):
        images, labels, _, bad = next(batches)
        loss, *_ = forward_backward(state, inputs, images, labels, bad)
        total += loss.detach().float()
    optimizer_step(state, state.guard.check(loss))
    return total / state.config.train.grad_accum


def say_suggestion(curve: Curve, found: dict[str, int], settings: dict[str, str], how: str) -> None:
    if not found:
        raise UserError(
            f"the loss diverged after only {len(curve.lrs)} steps (at lr {curve.lrs[-1]:.2g}), too few to read a "
            "suggestion from — lower --start-lr, or look at the curve in the output folder"
        )
    console = Console(True)
    console.say(f"steepest descent: {settings['steepest']} (for comparison)")
    console.say(f"suggested (valley): {settings['valley']}  — {how}")


def config_setting(config: Config, global_batch: int, rate: float) -> str:
    """The override that gives `rate` at this global batch, as the config is written (optim.lr_base_size's rule)."""
    return f"optim.lr={config_lr(config.optim, global_batch, rate):.2g}"


def how_scaled(config: Config, global_batch: int, rate: float) -> str:
    """What the suggested optim.lr means for the config as written."""
    optim = config.optim
    if optim.lr_base_size is None:
        return (
            f"the rate at global batch {global_batch}; for another batch size or process count add "
            f"optim.lr_base_size={global_batch} to keep it scaled"
        )
    return (
        f"{rate:.2g} at global batch {global_batch}, written per optim.lr_base_size={optim.lr_base_size} images "
        f"({resolved_scale(optim)} rule)"
    )


def write_outputs(curve: Curve, marks: dict[str, int], out: Path) -> tuple[Path, Path]:
    """find_lr.csv (step, lr, loss, smoothed_loss) and find_lr.png (marks: a label -> a point of the
    curve), each written whole and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(["step", "lr", "loss", "smoothed_loss"])
    for step, row in enumerate(zip(curve.lrs, curve.losses, curve.smoothed), 1):
        rows.writerow([step, *(f"{value:.6g}" for value in row)])
    csv_path, plot_path = out / CSV_NAME, out / PLOT_NAME
    own = f"{os.getpid()}.tmp"
    csv_tmp, plot_tmp = out / f"{CSV_NAME}.{own}", out / f"find_lr.{own}.png"  # savefig goes by the suffix
    try:
        csv_tmp.write_text(text.getvalue(), encoding="utf-8")
        plot_lr_finder(curve.lrs, curve.losses, curve.smoothed, marks, plot_tmp)
        os.replace(csv_tmp, csv_path)
        os.replace(plot_tmp, plot_path)
    finally:
        csv_tmp.unlink(missing_ok=True)
        plot_tmp.unlink(missing_ok=True)
    return csv_path, plot_path
