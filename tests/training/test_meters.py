"""A training epoch's progress lines for a log file, driven by a fake clock."""

from __future__ import annotations

import math

import torch

from tests.toolbox.test_progress import FakeClock
from trainer.training.meters import EpochLines, TrainWindow


def run_epoch(lines: EpochLines, clock: FakeClock, steps: range, seconds_per_step: float, log_every: int) -> None:
    for step in steps:
        clock.now += seconds_per_step
        lines.step_done(step, step % log_every == 0, lambda: 0.5)


def test_first_record_at_once_then_records_no_closer_than_the_floor_and_none_at_the_epochs_end():
    clock, said = FakeClock(), []
    lines = EpochLines(said.append, epoch=2, epochs=3, steps=100, done=0, global_batch=64, enabled=True, clock=clock)
    run_epoch(lines, clock, range(1, 101), seconds_per_step=0.5, log_every=5)  # a record every 2.5 s
    assert said[0] == "epoch 2/3  step 5/100  loss 0.5000  128 img/s  elapsed 2s  ETA epoch 48s, run 1m38s"
    assert [line.split()[3] for line in said] == ["5/100", "25/100", "45/100", "65/100", "85/100"]


def test_a_slow_epoch_gets_a_line_every_minute_between_records():
    clock, said = FakeClock(), []
    lines = EpochLines(said.append, epoch=1, epochs=1, steps=50, done=10, global_batch=8, enabled=True, clock=clock)
    run_epoch(lines, clock, range(11, 50), seconds_per_step=20, log_every=100)  # resumed at step 10; no record
    assert [line.split()[3] for line in said] == [f"{s}/50" for s in range(13, 50, 3)]
    assert said[0].endswith("0.4 img/s  elapsed 1m00s  ETA epoch 12m20s, run 12m20s")


def test_no_lines_when_disabled():
    clock, said = FakeClock(), []
    lines = EpochLines(said.append, epoch=1, epochs=1, steps=10, done=0, global_batch=8, enabled=False, clock=clock)
    run_epoch(lines, clock, range(1, 11), seconds_per_step=100, log_every=1)
    assert said == []


def test_the_epochs_train_loss_is_the_mean_over_every_recorded_sample():
    window = TrainWindow(torch.device("cpu"), 0)
    assert math.isnan(window.epoch_loss())
    window.recorded(loss_sum=10.0, seen=10)  # mean 1.0 over 10 samples
    window.recorded(loss_sum=30.0, seen=30)  # mean 1.0 ...
    window.recorded(loss_sum=0.0, seen=40)
    assert window.epoch_loss() == 0.5
    window.add(torch.tensor(2.0), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 0)
    assert window.local_loss() == 2.0
