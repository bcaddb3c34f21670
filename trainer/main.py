"""Train an SE-DenseNet on make_shards output.

    accelerate launch trainer/main.py --config configs/demo.yaml [section.key=value ...]

An override may also be written --section.key=value or --section.key value (a wandb sweep's ${args}).

The entry point: arguments -> config -> accelerator -> the run dir claimed -> trainer.training.loop.fit, and
how each way a run ends becomes an exit code, a line and status.json. Nothing imports this file.
Add --debug (or set SE_DENSENET_DEBUG=1) to see the full traceback behind an error's line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch trainer/main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from toolbox.cli import Console, add_debug_flag, disk_error_line, is_disk_error, run_command
from toolbox.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USAGE, UserError, first_line
from trainer.rundir import RunDir
from trainer.training.checkpoint import interrupted_line, resume_hint
from trainer.training.config import Config, join_agent_sweep, load_config
from trainer.training.data import open_shards
from trainer.training.loop import Job, fit
from trainer.training.nonfinite import NonFiniteError
from trainer.training.runtime import (
    LAUNCHER_PID,
    PeerFailed,
    StopFlag,
    any_rank,
    close_job,
    make_accelerator,
    settle_launch,
    stop_with_launcher,
)
from trainer.training.sizing import settle_sizes


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    # Every rank reads the same command line and environment, so what they say about them before
    # the ranks meet (the config, a sweep's run dir, the sizes settled from the shards) the launcher's rank 0
    # says once for all.
    first_rank = os.environ.get("RANK", "0") == "0"
    settled: list[Config] = []

    def body() -> int:
        config, note = join_agent_sweep(load_config(args.config, overrides))
        config, lines = settle_sizes(config, open_shards(config.data.shards, config.data).manifest)
        settled.append(config)
        for line in [note, *lines] if note else lines:
            Console(first_rank).say(line)
        return train(config)

    def explain_here(e: BaseException) -> tuple[int, str] | None:
        if isinstance(e, UserError) and (not settled or getattr(e, "before_group", False)) and not first_rank:
            return e.exit_code, ""  # rank 0 says it
        if isinstance(e, KeyboardInterrupt) and LAUNCHER_PID in os.environ:
            return EXIT_INTERRUPTED, ""  # python -m trainer says it once, when every trainer has ended
        return explain(e, Path(settled[0].run.dir) if settled else None)

    return run_command(body, args.debug, explain=explain_here, cleanup=close_job, stop_on_sigterm=False)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """--config and --debug; the rest, in order, are the overrides in any form load_config takes
    (a wandb sweep agent's `--optim.lr=0.1`; its own `--_wandb=...` is ignored there). They come
    from the command line, which `accelerate launch` gives every rank alike, so no rank depends on
    wandb.config, which only rank 0's wandb run would see."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [-h] [--config YAML] [--debug] [section.key=value | --section.key=value | --section.key value ...]",
        allow_abbrev=False,  # --de is not --debug: every word but these two is an override
    )
    parser.add_argument("--config", help="YAML file in configs/")
    add_debug_flag(parser)
    return parser.parse_known_args(argv)


def explain(e: BaseException, run_dir: Path | None) -> tuple[int, str] | None:
    """The exit code and one line for an expected failure; None for anything else."""
    if isinstance(e, PeerFailed):
        return e.code, ""
    then = resume_hint(run_dir)
    if isinstance(e, NonFiniteError):
        return e.exit_code, f"{first_line(e)}, then start the same command: {then}"
    if isinstance(e, UserError):
        return e.exit_code, first_line(e)
    if is_disk_error(e):
        return EXIT_FAILURE, disk_error_line(e, f"start the same command: {then}", run_dir)
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, interrupted_line(run_dir)
    if isinstance(e, RuntimeError) and torch.distributed.is_initialized():  # a collective failed
        text = str(e).lower()
        if "timed out" in text:
            return EXIT_FAILURE, (
                f"no answer from another process of the job for train.collective_timeout_s (a frozen node or a "
                f"stuck file system?) — this process stops; start the same command: {then}"
            )
        if any(sign in text for sign in ("connection closed by peer", "connection reset by peer", "broken pipe")):
            return (
                EXIT_FAILURE,
                f"another process of the job went away (see its own error) — start the same command: {then}",
            )
    return None


def train(config: Config) -> int:
    stop = StopFlag()  # first: a preemption warning during setup must not kill the process
    stop_with_launcher()  # a launcher that dies takes its trainers with it, each through a checkpoint
    try:
        config, launch = settle_launch(config)  # config.yaml and wandb record what the run used
        accelerator = make_accelerator(config, launch)
    except UserError as e:  # the launcher's choices against the config: the same verdict on every rank
        e.before_group = True
        raise
    console = Console(accelerator.is_main_process)
    run = claim_run_dir(Path(config.run.dir), config.run.share_dir, accelerator, console)
    stop.before_exit = lambda: run.set_status("failed", "killed by a second SIGTERM before its checkpoint was written")
    try:
        ending = fit(Job(config, accelerator, run, stop, console))
    except BaseException as e:
        explained = explain(e, run.path)
        line = explained[1] if explained and explained[1] else first_line(e)
        run.set_status("failed", line if explained else f"{type(e).__name__}: {line}")
        if isinstance(e, (NonFiniteError, PeerFailed)) or getattr(e, "agreed", False):
            # Every rank failed here together: none leaves (and gets the main one killed by the
            # launcher) before status.json is written, and the main process alone says why.
            accelerator.wait_for_everyone()
            if not accelerator.is_main_process:
                raise PeerFailed(explained[0] if explained else EXIT_FAILURE) from None
        raise
    if ending.state != "finished":  # a run that had completed keeps its status.json as it was
        run.set_status(ending.state, ending.reason)
    if ending.state == "preempted":
        console.say(
            f"preempted: stopped at a complete checkpoint; {resume_hint(run.path)} when the same command starts again"
        )
    accelerator.wait_for_everyone()  # no rank leaves while the main one still writes
    return EXIT_PREEMPTED if ending.state == "preempted" else 0


def claim_run_dir(run_dir: Path, share: bool, accelerator, console: Console) -> RunDir:
    """One trainer per run dir: the main process locks it before anything is written, and every
    rank learns whether it did."""
    run, error = RunDir(run_dir), None
    if accelerator.is_main_process:
        try:
            if note := run.lock(share):
                console.say(note)
        except (UserError, OSError) as e:
            error = e
    if any_rank(error is not None, accelerator):
        raise error or PeerFailed(EXIT_USAGE)
    return run


if __name__ == "__main__":
    sys.exit(main())
