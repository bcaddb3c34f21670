"""trainer/training/runtime.py: precision and compile as settled between the config and `accelerate launch`,
the accelerator it makes, and the ranks' collectives on one process."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from toolbox.errors import UserError
from trainer.training import runtime
from trainer.training.config import ConfigError, load_config
from trainer.training.runtime import StopFlag, any_rank, gather_to_main, make_accelerator, resolve_launch, settle_launch

REQUIRED = ["data.shards=s", "run.dir=r"]


def launcher_env(precision: str | None = None, backend: str | None = None, mode: str | None = None) -> dict:
    """What `accelerate launch` puts in the processes' environment (it always sets all three)."""
    env = {
        "ACCELERATE_MIXED_PRECISION": precision,
        "ACCELERATE_DYNAMO_BACKEND": backend,
        "ACCELERATE_DYNAMO_MODE": mode,
    }
    return {k: v for k, v in env.items() if v is not None}


def test_precision_and_compile_default_to_the_launcher():
    config = load_config(None, REQUIRED)
    assert config.train.mixed_precision is None and config.train.compile is None
    path = Path("configs/densenet121-imagenet.yaml")
    assert load_config(path, REQUIRED).train.mixed_precision == "bf16"  # a shipped config's own choice stays
    assert load_config(path, REQUIRED + ["train.mixed_precision=null"]).train.mixed_precision is None


@pytest.mark.parametrize("config_value", [None, "no", "bf16", "fp16"])
@pytest.mark.parametrize("launcher", [None, "no", "bf16", "fp16"])
def test_precision_resolution(config_value, launcher):
    train = load_config(None, REQUIRED + [f"train.mixed_precision={config_value or 'null'}"]).train
    got = resolve_launch(train, launcher_env(launcher, "NO", "default"))
    chose = launcher not in (None, "no")  # the launcher fills in "no" for "not chosen"
    if config_value is not None:
        assert (got.mixed_precision, got.precision_from) == (config_value, "config")
    elif chose:
        assert (got.mixed_precision, got.precision_from) == (launcher, "accelerate launch")
    else:
        assert (got.mixed_precision, got.precision_from) == ("no", "default")
    conflict = config_value is not None and chose and launcher != config_value
    expected = [f"note: train.mixed_precision={config_value} (config) overrides accelerate launch's {launcher}"]
    assert list(got.notes) == (expected if conflict else [])
    assert (got.compile, got.backend) == ("none", "no")


LAUNCHED_COMPILE = [
    None,
    ("NO", "default"),
    ("INDUCTOR", "default"),
    ("INDUCTOR", "max-autotune"),
    ("EAGER", "default"),
]


@pytest.mark.parametrize("config_value", [None, "none", "default", "max-autotune"])
@pytest.mark.parametrize("launcher", LAUNCHED_COMPILE)
def test_compile_resolution(config_value, launcher):
    train = load_config(None, REQUIRED + [f"train.compile={config_value or 'null'}"]).train
    backend, mode = launcher or (None, None)
    got = resolve_launch(train, launcher_env("no", backend, mode))
    chose = backend not in (None, "NO")
    if config_value is not None:  # the config's modes are inductor's
        assert (got.compile, got.compile_from) == (config_value, "config")
        assert got.backend == ("no" if config_value == "none" else "inductor")
    elif chose:  # the launcher's backend with its mode
        assert (got.compile, got.backend, got.compile_from) == (mode, backend.lower(), "accelerate launch")
    else:
        assert (got.compile, got.backend, got.compile_from) == ("none", "no", "default")
    conflict = config_value is not None and chose and (backend, mode) != ("INDUCTOR", config_value)
    expected = [
        f"note: train.compile={config_value} (config) overrides accelerate launch's {str(backend).lower()} (mode {mode})"
    ]
    assert list(got.notes) == (expected if conflict else [])
    assert got.mixed_precision == "no"


def test_both_conflicts_give_one_line_each():
    train = load_config(None, REQUIRED + ["train.mixed_precision=no", "train.compile=none"]).train
    got = resolve_launch(train, launcher_env("bf16", "INDUCTOR", "reduce-overhead"))
    assert (got.mixed_precision, got.compile, got.backend) == ("no", "none", "no")
    assert got.notes == (
        "note: train.mixed_precision=no (config) overrides accelerate launch's bf16",
        "note: train.compile=none (config) overrides accelerate launch's inductor (mode reduce-overhead)",
    )


def test_outside_accelerate_launch_means_no_and_none():
    got = resolve_launch(load_config(None, REQUIRED).train, {})
    assert (got.mixed_precision, got.compile, got.backend, got.notes) == ("no", "none", "no", ())


def test_a_launcher_choice_the_trainer_lacks_is_a_one_line_error_unless_the_config_decides():
    train = load_config(None, REQUIRED).train
    with pytest.raises(ConfigError, match=r"^accelerate launch's mixed precision fp8 is not one of no, bf16, fp16 — "):
        resolve_launch(train, launcher_env("fp8"))
    with pytest.raises(ConfigError, match="dynamo mode max-autotune-no-cudagraphs is not one of default, "):
        resolve_launch(train, launcher_env(backend="INDUCTOR", mode="max-autotune-no-cudagraphs"))
    decided = load_config(None, REQUIRED + ["train.mixed_precision=bf16"]).train
    assert resolve_launch(decided, launcher_env("fp8")).notes == (
        "note: train.mixed_precision=bf16 (config) overrides accelerate launch's fp8",
    )


def test_fp16_on_the_cpu_is_a_setup_error_wherever_it_was_chosen(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    config = load_config(None, REQUIRED + ["train.device=cpu", "train.mixed_precision=fp16"])
    with pytest.raises(UserError, match=r"^train.mixed_precision=fp16 needs a GPU — use bf16 or no on the CPU$"):
        make_accelerator(config)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UserError, match=r"^accelerate launch's fp16 needs a GPU — use bf16 or no on the CPU$"):
        make_accelerator(load_config(None, REQUIRED + ["train.device=cpu"]))


def test_settling_the_launch_returns_a_new_config_and_leaves_the_given_one_alone(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = load_config(None, REQUIRED)
    settled, launch = settle_launch(config)
    assert (settled.train.mixed_precision, launch.precision_from) == ("bf16", "accelerate launch")
    assert config.train.mixed_precision is None  # what the user wrote is still what it was


def test_collectives_on_one_process_are_the_identity():
    class One:
        num_processes, is_main_process, device = 1, True, torch.device("cpu")

    assert any_rank(True, One()) and not any_rank(False, One())
    assert gather_to_main([1, 2], One()) == [1, 2]


class Exited(Exception):
    pass


def test_a_sigterm_echo_is_not_a_second_sigterm(monkeypatch):
    """StopFlag's handler, called directly on a fake clock: a repeat within REPEAT_AFTER_S (Slurm's
    and the launcher's copies of one SIGTERM) only asks to stop; a later one exits at once."""
    now, said = [100.0], []
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the test process keeps its own handlers

    def exit_(code):
        raise Exited(code)

    monkeypatch.setattr(runtime, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    monkeypatch.setattr(runtime, "os", type("Os", (), {"_exit": staticmethod(exit_)}))
    stop = StopFlag()
    stop.before_exit = lambda: said.append("status written")
    stop._handle(signal.SIGUSR1, None)  # USR1: a request, never an exit
    assert stop.requested and stop.first_term is None
    stop._handle(signal.SIGTERM, None)
    assert stop.requested and stop.first_term == 100.0
    now[0] += StopFlag.REPEAT_AFTER_S * 0.9
    stop._handle(signal.SIGTERM, None)  # the echo
    assert stop.first_term == 100.0 and not said
    now[0] = 100.0 + StopFlag.REPEAT_AFTER_S + 0.1
    with pytest.raises(Exited) as exited:
        stop._handle(signal.SIGTERM, None)  # deliberate
    assert exited.value.args == (128 + signal.SIGTERM,) and said == ["status written"]


def test_a_ramped_run_compiles_one_static_graph_per_size(monkeypatch):
    import torch._dynamo.config

    assert runtime.compile_dynamic(load_config(None, REQUIRED)) is None  # torch's default otherwise
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    ramped = load_config(None, [*REQUIRED, "data.min_size=96", "data.image_size=224", "data.size_step=16"])
    assert runtime.compile_dynamic(ramped) is False
    # 96 -> 224 in steps of 16 over 10 epochs: 9 train sizes; they and the eval shapes fit the limit
    assert torch._dynamo.config.recompile_limit >= 2 * (9 + 2)


def test_after_training_commands_take_the_usable_cores_less_their_loader_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # whatever this machine has: Slurm gave the task one core
    before = torch.get_num_threads()
    try:
        assert runtime.use_threads(None, 0) == "threads 1 (1 usable core)"
        assert torch.get_num_threads() == 1
        assert runtime.use_threads(2, 0) == "threads 2 (--threads)"
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert runtime.use_threads(None, 5) == "threads 3 (OMP_NUM_THREADS)"
    finally:
        torch.set_num_threads(before)


# A command that formed a gloo group and failed: run_command's cleanup must destroy the group while
# the interpreter is whole (left to its exit, gloo's threads can SIGABRT a clean exit 2).
FAILS_IN_A_GROUP = """
import torch.distributed as dist
from toolbox.cli import run_command
from tests.conftest import REPO
from toolbox.errors import UserError
from trainer.training.runtime import close_job

def body():
    dist.init_process_group("gloo", store=dist.FileStore(STORE, 1), rank=0, world_size=1)
    dist.all_reduce(__import__("torch").ones(1))
    raise UserError("the run dir is someone else's")

code = run_command(body, cleanup=close_job)
print("group left:", dist.is_initialized())
raise SystemExit(code)
"""


def test_a_command_failing_in_a_process_group_destroys_it_and_exits_with_its_code(tmp_path):
    script = FAILS_IN_A_GROUP.replace("STORE", repr(str(tmp_path / "store")))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["group left: False"]
    assert result.stderr.strip().splitlines()[-1] == "error: the run dir is someone else's"
