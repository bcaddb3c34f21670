"""`python -m trainer`'s choices: the layout, Accelerate's command line, and exit codes."""

import logging

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from toolbox.errors import UserError
from toolbox.testing import accelerate_launch
from trainer.training.config import load_config
from trainer.training.launcher import MAX_CPU_PROCESSES, Layout, accelerate_args, choose_layout, exit_code


def config(*overrides: str):
    return load_config("configs/demo.yaml", list(overrides))


@pytest.mark.parametrize(
    "device, processes, workers, gpus, cores, expected",
    [
        ("auto", None, 4, 4, 32, Layout(4, "cuda", 1, "one per GPU")),
        ("auto", 2, 4, 4, 32, Layout(2, "cuda", 1, "one per GPU")),
        ("cpu", None, 1, 4, 2, Layout(2, "cpu", 1, "2 usable cores, 2 processes, 1 loader worker")),
        ("auto", None, 0, 0, 2, Layout(2, "cpu", 1, "2 usable cores, 2 processes")),
        ("auto", 1, 0, 0, 2, Layout(1, "cpu", 2, "2 usable cores")),
        ("auto", 1, 1, 0, 2, Layout(1, "cpu", 1, "2 usable cores, 1 loader worker")),  # a core for the worker
        ("auto", None, 4, 0, 64, Layout(MAX_CPU_PROCESSES, "cpu", 4, "64 usable cores, 8 processes, 4 loader workers")),
        ("auto", 3, 0, 0, 2, Layout(3, "cpu", 1, "2 usable cores, 3 processes")),
    ],
)
def test_one_process_per_gpu_else_cpu_processes_sharing_the_cores(device, processes, workers, gpus, cores, expected):
    chosen = choose_layout(config(f"train.device={device}", f"data.workers={workers}"), processes, gpus, cores, env={})
    assert chosen == expected


def test_omp_num_threads_wins_on_the_cpu():
    assert choose_layout(config(), None, 0, 16, env={"OMP_NUM_THREADS": "3"}) == Layout(8, "cpu", 3, "OMP_NUM_THREADS")


def test_cuda_asked_without_a_gpu_is_one_line_before_anything_starts():
    with pytest.raises(UserError, match="train.device=cuda but no GPU is visible here"):
        choose_layout(config("train.device=cuda"), None, 0, 8)


ALONE = Layout(1, "cpu", 2, "2 usable cores")


@pytest.mark.parametrize("layout", [ALONE, Layout(2, "cpu", 1, "x"), Layout(8, "cuda", 1, "one per GPU")])
def test_accelerate_is_given_every_value_it_would_warn_about(layout, caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no `accelerate config` file of this machine's
    args = accelerate_args(layout, "configs/demo.yaml", ["optim.lr=0.1"], debug=False)
    parsed = launch_command_parser().parse_args(args)
    with caplog.at_level(logging.WARNING):
        _validate_launch_command(parsed)
    assert not [r for r in caplog.records if "were not passed" in r.getMessage()]
    assert parsed.num_processes == layout.processes
    assert parsed.training_script.endswith("trainer/main.py")
    assert parsed.training_script_args == ["--config", "configs/demo.yaml", "optim.lr=0.1"]
    assert parsed.multi_gpu == (layout.processes > 1) and parsed.cpu == (layout == ALONE)


def test_exit_codes_read_as_a_shell_reports_them():
    assert [exit_code(2), exit_code(75), exit_code(-9), exit_code(0)] == [2, 75, 137, 1]


def test_launches_started_together_rendezvous_on_ports_of_their_own():
    """Two 2-process launches at once (the after-training tests start several) never share torch's 29500."""
    ports = [
        launch_command_parser().parse_args(accelerate_launch("trainer/main.py", processes=2)[3:]).main_process_port
        for _ in range(2)
    ] + [
        launch_command_parser().parse_args(accelerate_args(Layout(2, "cpu", 1, "x"), None, [], False)).main_process_port
    ]
    assert len(set(ports)) == 3 and 29500 not in ports
