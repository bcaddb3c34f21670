"""`python -m trainer`: training on this machine in one command.

The config is checked here first (a bad key, value or shards location is one line, and no process
starts), then `accelerate launch trainer/main.py` runs in this process with every value it would
otherwise warn about: one process per visible GPU, or on a machine without one CPU processes with
their threads chosen as BENCHMARKS.md ("CPU layout") measured. A rank's one-line error is the last
line; torch's launcher block behind it (which rank, which pid) shows only with --debug.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from toolbox.cli import Console, add_debug_flag, run_command
from toolbox.cores import torch_threads, usable_cores
from toolbox.errors import EXIT_FAILURE, EXIT_INTERRUPTED, UserError
from toolbox.ports import free_port
from trainer.training.config import Config, load_config
from trainer.training.data import open_shards
from trainer.training.runtime import LAUNCHER_PID
from trainer.training.sizing import settle_sizes

MAIN = Path(__file__).resolve().parent.parent / "main.py"
THREADS_PER_CPU_PROCESS = 1  # BENCHMARKS.md, "CPU layout": processes beat threads for these models
MAX_CPU_PROCESSES = 8  # each CPU process multiplies the global batch (and with it the scaled lr)


@dataclass(frozen=True)
class Layout:
    """How many training processes on this machine, on what, with how many torch threads each."""

    processes: int
    device: str  # cuda | cpu
    threads: int
    threads_from: str  # what the count was derived from (toolbox.cores.torch_threads)

    def describe(self) -> str:
        if self.device == "cuda":
            return f"{self.processes} process(es), one per GPU"
        return f"{self.processes} process(es) on the CPU, {self.threads} thread(s) each ({self.threads_from})"


def choose_layout(config: Config, processes: int | None, gpus: int, cores: int, env=os.environ) -> Layout:
    """One process per GPU (train.device permitting); on the CPU one process per core, up to
    MAX_CPU_PROCESSES, each with its share of the cores less its loader workers as threads
    (OMP_NUM_THREADS wins). --processes N wins over both counts."""
    if config.train.device == "cuda" and gpus == 0:
        raise UserError("train.device=cuda but no GPU is visible here — run on a GPU node or set train.device=cpu")
    if gpus and config.train.device != "cpu":
        return Layout(processes or gpus, "cuda", 1, "one per GPU")
    count = processes or max(1, min(cores // THREADS_PER_CPU_PROCESS, MAX_CPU_PROCESSES))
    threads, where = torch_threads(workers=config.data.workers, processes=count, env=env, cores=cores)
    return Layout(count, "cpu", threads, where)


def accelerate_args(
    layout: Layout, config_path: str | None, overrides: list[str], debug: bool, script: Path = MAIN
) -> list[str]:
    """`accelerate launch`'s command line with every value it would otherwise fill in and warn about;
    script: what each process runs (the trainer, or trainer/find_lr.py)."""
    args = ["--num_processes", str(layout.processes), "--num_machines", "1"]
    args += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # "no": the config decides (runtime.py)
    args += ["--num_cpu_threads_per_process", str(layout.threads)]
    if layout.processes > 1:  # CPU processes too: ACCELERATE_USE_CPU makes their group a gloo one (launch)
        args += ["--multi_gpu", "--main_process_port", str(free_port())]
    elif layout.device == "cpu":
        args.append("--cpu")
    command = [str(script), *(["--config", config_path] if config_path else []), *overrides]
    return args + command + (["--debug"] if debug else [])


def launch(args: list[str], cpu: bool, debug: bool) -> int:
    """Accelerate's own launcher, in this process; -> the job's exit code, without the launcher's
    traceback block (the ranks have said why already)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not debug:  # "failed (exitcode: 2) local_rank: 0 (pid: ...)": the ranks' own lines say more
        import torch.distributed.run  # noqa: F401  (its loggers exist from here on, each with its level)

        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # else each process would train alone
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the trainers stop with this process (stop_with_launcher)
    parsed = launch_command_parser().parse_args(args)
    if parsed.num_processes == 1:
        return run_alone(_validate_launch_command(parsed)[0])
    # torch's agent would answer SIGTERM by passing it on, killing the trainers 30 s later whether their
    # checkpoint is written or not, and exiting 143: this process passes it on itself, and the agent
    # reports how the trainers ended (75: checkpointed, preempted). Ctrl-C stays the agent's.
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"  # torchrun's --signals-to-handle
    previous = signal.signal(signal.SIGTERM, pass_on_to_trainers)
    try:
        launch_command(parsed)
    except ChildFailedError as e:
        if debug:
            print(e.format_msg(), flush=True)
        return exit_code(e.get_first_failure()[1].exitcode)
    except SignalException as e:  # Ctrl-C: the agent told the trainers, and gave them 30 s to checkpoint
        return 128 + int(e.sigval)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def pass_on_to_trainers(signum: int, frame) -> None:
    """SIGTERM to the trainers torch's agent started (its children: they run in sessions of their own,
    so a signal to this process's group misses them). Before they exist, the agent stops as on its
    own signals, taking whatever it started with it."""
    import psutil
    from torch.distributed.elastic.multiprocessing.api import SignalException

    trainers = psutil.Process().children()
    if not trainers:
        raise SignalException(f"process {os.getpid()} got signal {signum}", sigval=signal.Signals(signum))
    for trainer in trainers:
        try:
            trainer.send_signal(signum)
        except psutil.NoSuchProcess:  # it has just ended
            pass


def run_alone(parsed: argparse.Namespace) -> int:
    """One trainer as Accelerate's simple launcher starts it, but waited for through SIGTERM (passed
    on: it checkpoints and stops) and Ctrl-C (which the terminal gave it too), so this command ends
    when the trainer has, with its exit code."""
    from accelerate.utils import prepare_simple_launcher_cmd_env

    command, env = prepare_simple_launcher_cmd_env(parsed)
    child = subprocess.Popen(command, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        while True:
            try:
                code = child.wait()
                return 0 if code == 0 else exit_code(code)
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(code: int) -> int:
    """A child's exit status as a shell reports it: a signal's death as 128 + its number."""
    return 128 - code if code < 0 else code or EXIT_FAILURE


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [-h] --config YAML [--processes N] [--debug] [section.key=value ...]",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML file in configs/, e.g. configs/own-images.yaml")
    parser.add_argument(
        "--processes", type=int, metavar="N", help="training processes (default: one per GPU; on the CPU, by its cores)"
    )
    add_debug_flag(parser)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)

    def body() -> int:
        if args.processes is not None and args.processes < 1:
            raise UserError(f"--processes {args.processes}: give 1 or more")
        config = load_config(args.config, overrides)
        settle_sizes(config, open_shards(config.data.shards, config.data).manifest)  # the shards are there
        import torch

        layout = choose_layout(config, args.processes, torch.cuda.device_count(), usable_cores())
        Console(True).say(f"python -m trainer: {layout.describe()}")
        code = launch(accelerate_args(layout, args.config, overrides, args.debug), layout.device == "cpu", args.debug)
        if code == EXIT_INTERRUPTED:
            # Ctrl-C: each trainer stops where it is, and one may never reach its line (a peer gone
            # mid-collective); they leave it to this process, which says it once they all ended.
            from trainer.training.checkpoint import interrupted_line

            print(f"error: {interrupted_line(Path(config.run.dir))}", file=sys.stderr, flush=True)
        return code

    return run_command(body, args.debug)  # SIGTERM before the trainers start: a line, as Ctrl-C
