"""trainer/training/loop.py's start-up lines for a run started again: a completed run is said to be
complete and left alone; a resumed one says where it goes on, and never from an epoch past the last."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from toolbox.cli import Console
from trainer.rundir import RunDir
from trainer.training.config import load_config
from trainer.training.loop import completed_before, resuming_line
from trainer.training.state import Progress

CKPT = Path("runs/x/checkpoints/ckpt-000000014")


def progress(epoch: int, step: int) -> Progress:
    return Progress(epoch=epoch, step=step, best_top1=0.98, best_epoch=2)


def job_on(tmp_path: Path, epochs: int, status: str | None) -> SimpleNamespace:
    config = load_config(None, ["data.shards=s", f"run.dir={tmp_path / 'x'}", f"train.epochs={epochs}"])
    run = RunDir(tmp_path / "x")
    if status is not None:
        run.path.mkdir()
        run.owned = True  # RunDir writes status.json only for the lock holder; none is needed here
        run.set_status("running")
        run.set_status(status)
    return SimpleNamespace(config=config, run=run, console=Console(True))


@pytest.mark.parametrize("epochs", [2, 1])  # the same command, or one with fewer epochs than were trained
def test_a_completed_run_started_again_is_said_complete(tmp_path, capsys, epochs):
    job = job_on(tmp_path, epochs, "completed")
    assert completed_before(job, SimpleNamespace(progress=progress(2, 14)))
    (line,) = capsys.readouterr().out.splitlines()
    assert line == (
        f"run {tmp_path / 'x'} is complete: 2 epochs, best val top-1 0.9800 (epoch 2); nothing was changed — "
        "to train further raise train.epochs above 2, to start over choose another run.dir"
    )


@pytest.mark.parametrize("status", ["failed", "running", None])
def test_a_run_that_did_not_end_completed_goes_on_to_its_ending(tmp_path, capsys, status):
    """Stopped while writing its final weights (a full disk, SIGKILL): the resume writes them."""
    assert not completed_before(job_on(tmp_path, 2, status), SimpleNamespace(progress=progress(2, 14)))
    assert capsys.readouterr().out == ""
    assert resuming_line(CKPT, progress(2, 14), epochs=2) == (
        f"resuming from {CKPT}: all 2 epochs were trained, but the run stopped before it ended — "
        "writing its final weights and report"
    )  # not "(epoch 3, ...)" of a 2-epoch run


def test_a_resume_mid_run_says_the_epoch_and_step_it_goes_on_from(tmp_path):
    assert resuming_line(CKPT, progress(1, 7), epochs=2) == f"resuming from {CKPT} (epoch 2, step 7)"
    assert resuming_line(CKPT, progress(2, 14), epochs=3) == f"resuming from {CKPT} (epoch 3, step 14)"
