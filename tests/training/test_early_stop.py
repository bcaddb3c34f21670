"""trainer/training/early_stop.py: what counts as an improvement, when a run stops, the count saved
and restored with the progress (an old checkpoint without it too), the settings' validation, and
the lines of a run that stopped early and is started again."""

from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from toolbox.cli import Console
from trainer.rundir import RunDir
from trainer.training.config import ConfigError, load_config
from trainer.training.early_stop import EarlyStop, Plateau
from trainer.training.loop import completed_before, resuming_line, stopped_early, training_left
from trainer.training.state import Progress

REQUIRED = ["data.shards=s", "run.dir=r"]


def count(early: EarlyStop, values: list[float]) -> tuple[Plateau, list[bool]]:
    """The plateau after one evaluation per value (epochs 1, 2, ...), and which improved."""
    plateau = Plateau()
    return plateau, [early.update(plateau, value, epoch) for epoch, value in enumerate(values, 1)]


def test_top1_must_rise_and_loss_must_fall():
    _, improved = count(EarlyStop("top1", 2, 0.0), [0.5, 0.6, 0.6, 0.55, 0.7])
    assert improved == [True, True, False, False, True]  # an equal value is no improvement
    _, improved = count(EarlyStop("loss", 2, 0.0), [1.0, 0.8, 0.8, 0.9, 0.7])
    assert improved == [True, True, False, False, True]


def test_an_improvement_must_exceed_min_delta_and_small_gains_add_up():
    early = EarlyStop("top1", 5, 0.01)
    plateau, improved = count(early, [0.5, 0.505, 0.509, 0.5101])
    # 0.505 is not more than 0.01 above 0.5; the best stays 0.5 (Keras, Lightning), so 0.5101 counts
    assert improved == [True, False, False, True]
    assert (plateau.best, plateau.best_epoch, plateau.waited) == (0.5101, 4, 0)
    plateau, improved = count(EarlyStop("loss", 5, 0.1), [1.0, 0.95, 0.91, 0.89])
    assert improved == [True, False, False, True] and plateau.best == 0.89


def test_the_run_stops_after_patience_evaluations_without_improvement():
    early = EarlyStop("loss", 3, 0.0)
    plateau, _ = count(early, [1.0, 0.9, 0.95, 0.92])
    assert plateau.waited == 2 and not early.stops(plateau)
    early.update(plateau, 0.91, 5)
    assert plateau.waited == 3 and early.stops(plateau)
    assert early.verdict(plateau) == "val loss has not improved for 3 evaluations (last improvement 0.9000 at epoch 2)"
    assert early.reason(plateau, 5, 20) == f"stopped early at epoch 5 of 20: {early.verdict(plateau)}"
    assert early.reason(plateau, 20, 20) is None  # a stop at the last epoch is no early one


def test_the_start_up_line_says_what_is_watched():
    assert EarlyStop("top1", 3, 0.0).describe(1) == (
        "early stopping: the run ends once val top-1 has not improved for 3 evaluations (evaluated every epoch)"
    )
    assert EarlyStop("loss", 1, 0.05).describe(2) == (
        "early stopping: the run ends once val loss has not improved by more than 0.05 for 1 evaluation "
        "(evaluated every 2 epochs); best.safetensors stays the best val top-1"
    )


def test_patience_zero_never_stops():
    early = EarlyStop("top1", 0, 0.0)
    plateau, _ = count(early, [0.5] * 10)
    assert not early.on and not early.stops(plateau)


def test_a_non_finite_value_never_improves():
    plateau, improved = count(EarlyStop("loss", 2, 0.0), [float("nan"), 1.0, float("inf"), float("nan")])
    assert improved == [False, True, False, False] and plateau.best == 1.0 and plateau.waited == 2


def test_another_metric_starts_the_count_afresh():
    plateau, _ = count(EarlyStop("top1", 2, 0.0), [0.9, 0.8, 0.8])
    assert plateau.waited == 2 and EarlyStop("top1", 2, 0.0).stops(plateau)
    loss = EarlyStop("loss", 2, 0.0)
    assert not loss.stops(plateau)  # a count of top-1 says nothing about the loss
    assert loss.update(plateau, 0.4, 4) and (plateau.metric, plateau.best, plateau.waited) == ("loss", 0.4, 0)


def test_the_count_goes_through_a_checkpoint_and_an_old_one_loads_without_it(tmp_path):
    progress = Progress(epoch=6, step=42)
    EarlyStop("top1", 3, 0.001).update(progress.plateau, 0.97, 4)
    progress.plateau.waited = 2
    torch.save({"progress": asdict(progress)}, tmp_path / "state.pt")  # as TrainState.state_dict saves it
    loaded = Progress.from_dict(torch.load(tmp_path / "state.pt")["progress"])
    assert loaded == progress and loaded.plateau == Plateau("top1", 0.97, 4, 2)
    old = {k: v for k, v in asdict(progress).items() if k != "plateau"}  # a checkpoint from before
    assert Progress.from_dict(old).plateau == Plateau()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.early_stop_patience=-1", "train.early_stop_patience=-1 is out of range — it must be >= 0"),
        ("train.early_stop_patience=1000000", "train.early_stop_patience=1000000 is out of range"),
        ("train.early_stop_metric=acc", "train.early_stop_metric='acc' is not one of top1, loss"),
        ("train.early_stop_min_delta=-0.1", "train.early_stop_min_delta=-0.1 is out of range — it must be >= 0.0"),
        ("train.early_stop_min_delta=nan", "train.early_stop_min_delta=nan is not a finite number"),
    ],
)
def test_bad_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*REQUIRED, override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_off_by_default():
    assert not EarlyStop.of(load_config(None, REQUIRED).train).on


def stopped_run(tmp_path: Path, status: str | None, *overrides: str) -> tuple[SimpleNamespace, SimpleNamespace]:
    """A job and state after 7 of 20 epochs, val top-1 last improved at epoch 4 (3 evaluations ago)."""
    config = load_config(
        None,
        ["data.shards=s", f"run.dir={tmp_path / 'x'}", "train.epochs=20", "train.early_stop_patience=3", *overrides],
    )
    progress = Progress(epoch=7, step=49, best_top1=0.9812, best_epoch=4)
    progress.plateau = Plateau("top1", 0.9812, 4, 3)
    run = RunDir(tmp_path / "x")
    if status is not None:
        run.path.mkdir(parents=True)
        run.owned = True  # RunDir writes status.json only for the lock holder; none is needed here
        run.set_status("running")
        run.set_status(status, stopped_early(config, progress))
    return SimpleNamespace(config=config, run=run, console=Console(True)), SimpleNamespace(progress=progress)


def test_a_run_that_stopped_early_started_again_is_said_complete(tmp_path, capsys):
    job, state = stopped_run(tmp_path, "completed", "train.early_stop_min_delta=0.001")
    reason = (
        "stopped early at epoch 7 of 20: val top-1 has not improved by more than 0.001 for 3 evaluations "
        "(last improvement 0.9812 at epoch 4)"
    )
    assert job.run.status()["reason"] == reason
    assert not training_left(job.config, state.progress)
    assert completed_before(job, state)
    (line,) = capsys.readouterr().out.splitlines()
    assert line == (
        f"run {tmp_path / 'x'} is complete: {reason}; best val top-1 0.9812 (epoch 4); nothing was changed — "
        "to train further raise train.early_stop_patience above 3 (0 turns early stopping off), "
        "to start over choose another run.dir"
    )


def test_a_run_that_stopped_early_but_did_not_end_writes_its_ending(tmp_path, capsys):
    """Killed after the stopping evaluation's checkpoint, before its final weights: no epoch more."""
    job, state = stopped_run(tmp_path, "running")
    assert not completed_before(job, state) and capsys.readouterr().out == ""
    ckpt = Path("runs/x/checkpoints/ckpt-000000049")
    line = resuming_line(ckpt, state.progress, 20, stopped_early(job.config, state.progress))
    assert line == (
        f"resuming from {ckpt}: training had ended (stopped early at epoch 7 of 20: val top-1 has not improved "
        "for 3 evaluations (last improvement 0.9812 at epoch 4)), but the run stopped before it ended — writing its final "
        "weights and report"
    )


def test_more_patience_on_a_stopped_run_trains_on(tmp_path, capsys):
    job, state = stopped_run(tmp_path, "completed", "train.early_stop_patience=5")
    assert training_left(job.config, state.progress) and not completed_before(job, state)
    job, state = stopped_run(tmp_path / "off", "completed", "train.early_stop_patience=0")
    assert training_left(job.config, state.progress) and stopped_early(job.config, state.progress) is None
