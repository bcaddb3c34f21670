"""Where the job runs, and how its processes agree: the accelerator and what the launcher chose, the
stop signals, the compile cache, and the collectives the loop and the after-training commands use.

The loop owns the Accelerator and hands it to these functions; nothing here keeps distributed state
of its own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin

from toolbox.cli import Console
from toolbox.cores import torch_threads
from toolbox.errors import EXIT_FAILURE, UserError, first_line
from trainer.rundir import COMPILE_CACHE
from trainer.training.config import CHOICES, Config, ConfigError, TrainConfig, train_sizes
from trainer.training.data import close_loaders

# `accelerate launch` hands its choices (its flags, else the `accelerate config` file) to every
# process in these variables. It fills in "no" for what nobody chose, so "no" reads as "not chosen".
LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"  # no | fp16 | bf16 | fp8
LAUNCHER_BACKEND = "ACCELERATE_DYNAMO_BACKEND"  # NO | INDUCTOR | EAGER | ...
LAUNCHER_MODE = "ACCELERATE_DYNAMO_MODE"  # default | reduce-overhead | max-autotune
LAUNCHER_PID = "SE_DENSENET_LAUNCHER_PID"  # set by `python -m trainer`, whose single trainer has no LOCAL_RANK


class PeerFailed(RuntimeError):
    """Another rank failed and says why itself: this one leaves quietly, with the same exit code."""

    def __init__(self, code: int = EXIT_FAILURE):
        super().__init__("another process of the job failed")
        self.code = code


@dataclass(frozen=True)
class Launch:
    """Precision and compilation as settled between the config and `accelerate launch`."""

    mixed_precision: str  # no | bf16 | fp16
    compile: str  # none | a torch.compile mode
    backend: str  # the dynamo backend: "no" when compile is none, inductor for the config's own modes
    precision_from: str  # config | accelerate launch | default | evaluate always (trainer.evaluate)
    compile_from: str
    notes: tuple[str, ...] = ()  # a line per setting both chose, differently: the config's applies


def resolve_launch(train: TrainConfig, env: Mapping[str, str]) -> Launch:
    """train.mixed_precision / train.compile against the launcher's environment: a value set in
    the config wins (with a note when the launcher chose otherwise), None takes the launcher's
    choice, neither is no / none. ConfigError when the launcher's choice is one this trainer lacks."""
    notes = []
    precision, precision_from = _resolve_precision(train.mixed_precision, env, notes)
    backend = (env.get(LAUNCHER_BACKEND) or "no").lower()
    mode = env.get(LAUNCHER_MODE) or "default"
    if train.compile is not None:
        compiled, compile_from = train.compile, "config"
        if backend != "no" and (backend, mode) != ("inductor", compiled):
            notes.append(
                f"note: train.compile={compiled} (config) overrides accelerate launch's {backend} (mode {mode})"
            )
        backend = "no" if compiled == "none" else "inductor"
    elif backend != "no":
        if mode not in CHOICES["train.compile"]:
            raise ConfigError(
                f"accelerate launch's dynamo mode {mode} is not one of "
                f"{', '.join(CHOICES['train.compile'][1:])} — launch with another or set train.compile"
            )
        compiled, compile_from = mode, "accelerate launch"
    else:
        compiled, compile_from = "none", "default"
    return Launch(precision, compiled, backend, precision_from, compile_from, tuple(notes))


def _resolve_precision(precision: str | None, env: Mapping[str, str], notes: list[str]) -> tuple[str, str]:
    chosen = (env.get(LAUNCHER_PRECISION) or "no").lower()
    if precision is not None:
        if chosen not in ("no", precision):
            notes.append(f"note: train.mixed_precision={precision} (config) overrides accelerate launch's {chosen}")
        return precision, "config"
    if chosen == "no":
        return "no", "default"
    if chosen not in CHOICES["train.mixed_precision"]:
        raise ConfigError(
            f"accelerate launch's mixed precision {chosen} is not one of "
            f"{', '.join(CHOICES['train.mixed_precision'])} — launch with another or set train.mixed_precision"
        )
    return chosen, "accelerate launch"


def settle_launch(config: Config) -> tuple[Config, Launch]:
    """The config as the run will use it (config.yaml and wandb say what ran), and how it was settled."""
    launch = resolve_launch(config.train, os.environ)
    train = replace(config.train, mixed_precision=launch.mixed_precision, compile=launch.compile)
    return replace(config, train=train), launch


def compile_dynamic(config: Config) -> bool | None:
    """torch.compile's `dynamic` for this run. Progressive resizing: False, one static graph per
    train size, each compiled at the first step at that size and reused (torch's automatic dynamic
    shapes would recompile the second size as a graph of any size; with torch 2.14 on the CPU that
    graph failed a stride check at the third size). Otherwise None, torch's default."""
    if config.data.min_size is None:
        return None
    import torch._dynamo.config

    sizes = set(train_sizes(config))
    # train sizes, the eval batch and its last partial one, and the same again for EMA weights
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * (len(sizes) + 2))
    return False


def make_accelerator(config: Config, launch: Launch | None = None) -> Accelerator:
    """The Accelerator for train.device, precision and compile as settled; prints what it runs with."""
    if launch is None:
        config, launch = settle_launch(config)
    has_gpu = torch.cuda.is_available()
    if config.train.device == "cuda" and not has_gpu:
        raise UserError("train.device=cuda but no GPU is visible here — run on a GPU node or set train.device=cpu")
    use_cpu = config.train.device == "cpu" or not has_gpu
    if use_cpu and launch.mixed_precision == "fp16":
        asked = "train.mixed_precision=fp16" if launch.precision_from == "config" else "accelerate launch's fp16"
        raise UserError(f"{asked} needs a GPU — use bf16 or no on the CPU")
    # Always a plugin of our own: with none, Accelerate would compile whatever the launcher asked for.
    dynamo = TorchDynamoPlugin(backend="no")
    if launch.backend != "no":
        dynamo = TorchDynamoPlugin(backend=launch.backend, mode=launch.compile, dynamic=compile_dynamic(config))
        use_run_dir_compile_cache(Path(config.run.dir))
        # torch reminds whoever passes a checkpoint policy not to mutate tensors inside the region;
        # the efficient dense layer keeps its ReLUs out of place, so the reminder is only noise.
        logging.getLogger("torch._higher_order_ops.wrap").addFilter(
            lambda r: "context_fn is passed" not in r.getMessage()
        )
    # cpu=True makes Accelerate form a gloo group when launched with several processes.
    # A rank that stops answering (a frozen node, a stuck file system) fails the others' next
    # collective after this long, instead of NCCL's or gloo's default wait.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.train.collective_timeout_s))
    accelerator = Accelerator(
        cpu=use_cpu, mixed_precision=launch.mixed_precision, dynamo_plugin=dynamo, kwargs_handlers=[timeout]
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UserError(
            f"{launched} processes were launched but they formed a group of {accelerator.num_processes} — "
            "on machines without a GPU set ACCELERATE_USE_CPU=true (or train.device=cpu)"
        )
    console = Console(accelerator.is_main_process)
    for line in launch_lines(launch, accelerator):
        console.say(line)
    return accelerator


def launch_lines(launch: Launch, accelerator: Accelerator) -> list[str]:
    """The conflict notes, then what Accelerate itself will do (its state, not the config)."""
    backend = accelerator.state.dynamo_plugin.backend.value.lower()
    compiled = "none" if backend == "no" else launch.compile + ("" if backend == "inductor" else f" ({backend})")
    return [
        *launch.notes,
        f"precision {accelerator.mixed_precision} ({launch.precision_from}), compile {compiled} ({launch.compile_from})",
    ]


def use_run_dir_compile_cache(run_dir: Path) -> None:
    """Compiled kernels go beside the checkpoints, so that a job requeued onto another node
    reuses them instead of compiling for minutes again. Importing torch._dynamo already set
    the variable to inductor's default (the node's /tmp); a value of the user's own is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(run_dir.resolve() / COMPILE_CACHE)


class StopFlag:
    """SIGTERM/SIGUSR1 only set a flag; the loop checkpoints at the next step all ranks agree on.

    A second SIGTERM exits at once, but only a deliberate one: under Slurm each trainer gets the
    same SIGTERM twice within milliseconds (from slurmstepd and from torch's launcher).
    """

    REPEAT_AFTER_S = 1.0

    def __init__(self):
        self.requested = False
        self.first_term = None
        self.before_exit: Callable[[], None] | None = None  # says in status.json why the process is about to vanish
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if signum == signal.SIGTERM:
            if self.first_term is not None and now - self.first_term > self.REPEAT_AFTER_S:
                if self.before_exit is not None:
                    self.before_exit()
                os._exit(128 + signum)
            self.first_term = self.first_term or now
        self.requested = True


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_launcher() -> None:
    """SIGTERM to this process when the one that started it dies (a launcher SIGKILLed, the OOM
    killer): torch's launcher starts each trainer in a session of its own, so nothing else would
    stop it, and it would train on unwatched, holding the run dir's lock. SIGTERM is StopFlag's: a
    checkpoint at the next agreed step, then exit. Linux only; elsewhere a no-op."""
    launched = "LOCAL_RANK" in os.environ or LAUNCHER_PID in os.environ
    if not sys.platform.startswith("linux") or not launched:
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not allowed here (a seccomp profile): the run goes on as before
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def any_rank(flag: bool, accelerator: Accelerator) -> bool:
    """True on every rank when it is True on any: the ranks' barrier for a shared decision."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


@contextmanager
def said_once(accelerator: Accelerator) -> Iterator[None]:
    """A UserError on any rank inside stops every rank, and the job says it once: the main process
    says the first failing rank's line (its own when it failed), the others leave quietly (main.py
    turns an `agreed` error into PeerFailed on them). Every rank must enter: it ends in a collective."""
    failure = None
    try:
        yield
    except UserError as e:
        failure = e
    said = gather_to_main([None if failure is None else (failure.exit_code, first_line(failure))], accelerator)
    first = share_from_main(next((s for s in said if s is not None), None), accelerator)
    if first is None:
        return
    if failure is None or not accelerator.is_main_process:
        failure = UserError(first[1], first[0])  # every rank leaves with the code the job says
    failure.agreed = True
    raise failure


def agree(stop: bool, streak: torch.Tensor, accelerator: Accelerator) -> tuple[bool, int]:
    """The ranks' periodic agreement: whether any was asked to stop, and the non-finite streak
    (the same on every rank: it is judged on all-reduced gradients). One small all-reduce."""
    flags = torch.stack([torch.tensor(float(stop), device=accelerator.device), streak.float()])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")
    stop_now, streak_now = flags.tolist()
    return stop_now > 0, int(streak_now)


def sum_across(tensor: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    return tensor if accelerator.num_processes == 1 else accelerator.reduce(tensor, "sum")


def average_buffers(net: torch.nn.Module, accelerator: Accelerator) -> None:
    """Each rank's BN running stats saw only its own last batches: use their mean everywhere."""
    buffers = [b for b in net.buffers() if b.is_floating_point()]
    if accelerator.num_processes == 1 or not buffers:
        return
    flat = accelerator.reduce(torch.cat([b.detach().reshape(-1) for b in buffers]), "mean")
    for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.copy_(value.view_as(buffer))


def gather_to_main(items: list, accelerator: Accelerator) -> list:
    """Every rank's items, concatenated on the main process (the others get []): small objects only."""
    if accelerator.num_processes == 1:
        return items
    parts = [None] * accelerator.num_processes if accelerator.is_main_process else None
    torch.distributed.gather_object(items, parts, dst=0)
    return [item for part in parts or [] for item in part]


def share_from_main(value, accelerator: Accelerator):
    """The main process's value on every rank (a small picklable object)."""
    if accelerator.num_processes == 1:
        return value
    box = [value if accelerator.is_main_process else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def close_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def close_job() -> None:
    """What a command that may have formed a process group runs however it ends: its loader workers
    told they close, then the group destroyed while the interpreter is whole. Left to the
    interpreter's exit, gloo's worker threads can abort the process (SIGABRT, "terminate called
    without an active exception": pytorch#190489), turning a clean exit 2 into a crash."""
    close_loaders()
    close_process_group()


THREADS_HELP = (
    "torch threads for the model (default: OMP_NUM_THREADS if set, else the cores this process may use "
    "less its loader workers)"
)


def use_threads(asked: int | None, workers: int) -> str:
    """torch's intra-op threads for this process (toolbox.cores.torch_threads: --threads, else
    OMP_NUM_THREADS, else the usable cores less the loader workers) -> what the start-up says."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes sharing this node's cores
    if asked is not None and asked < 1:
        raise UserError(f"--threads {asked}: must be at least 1 — pass a count of threads, or leave it out")
    threads, source = torch_threads(asked, workers, processes)
    torch.set_num_threads(threads)
    return f"threads {threads} ({source})"
