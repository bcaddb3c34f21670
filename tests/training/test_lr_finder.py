"""The learning-rate range test's pieces on synthetic curves: the smoothing, the divergence stop, the
suggestions, the exponential rates, and where the curve is written."""

import argparse
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from toolbox.errors import UserError
from trainer.training.config import load_config
from trainer.training.lr_finder import (
    CSV_NAME,
    PLOT_NAME,
    Curve,
    Plan,
    check_plan,
    output_dir,
    steepest,
    suggestions,
    valley,
    write_outputs,
)

LRS = list(np.logspace(-7, 1, 100))


def falling_curve(dip_at: int | None = None) -> list[float]:
    """A plateau at 2.3 up to 1e-4, a fall to 0.8 centred on 1e-3 (log-sigmoid), a climb after 1e-1,
    with a little noise (seeded); dip_at: one sharp noisy dip in the plateau."""
    noise = np.random.default_rng(0).uniform(-0.005, 0.005, len(LRS))
    losses = []
    for i, lr in enumerate(LRS):
        x = math.log10(lr)
        loss = 2.3 - 1.5 / (1 + math.exp(-(x + 3) / 0.3)) + (0 if x < -1 else 3 * (x + 1) ** 2)
        losses.append(loss + noise[i] - (0.5 if i == dip_at else 0))
    return losses


def curve_of(losses: list[float], beta: float = 0.98) -> Curve:
    curve = Curve(beta)
    for lr, loss in zip(LRS, losses):
        curve.add(lr, loss)
    return curve


def test_the_smoothing_is_a_bias_corrected_moving_average():
    curve = curve_of([1.0, 2.0, 4.0], beta=0.5)
    # averages 0.5, 1.25, 2.625 divided by 1 - 0.5^n: a first value is itself, not pulled towards 0
    assert curve.smoothed == pytest.approx([1.0, 1.25 / 0.75, 2.625 / 0.875])
    assert curve_of([2.3] * 50).smoothed == pytest.approx([2.3] * 50)


def test_the_test_stops_once_the_smoothed_loss_passes_four_times_its_best():
    curve, stopped = Curve(beta=0.5), None
    for step, loss in enumerate([2.0, 1.0, 0.5, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]):
        curve.add(LRS[step], loss)
        if curve.diverged():
            stopped = step
            break
    best = min(curve.smoothed)
    assert curve.smoothed[-1] > 4 * best and all(s <= 4 * best for s in curve.smoothed[:-1])
    assert stopped == 6 == len(curve.losses) - 1  # the first step past 4x, before the raw loss peaks


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_the_test(bad):
    curve = curve_of([2.3, 2.2, 2.1])
    assert not curve.diverged()
    curve.add(1.0, bad)
    assert curve.diverged()


def test_steepest_is_where_the_loss_falls_fastest_against_log_lr():
    losses = falling_curve()
    assert LRS[steepest(LRS, losses)] == pytest.approx(1e-3, rel=0.25)


def test_valley_lies_inside_the_fall_and_one_noisy_dip_does_not_move_it():
    clean, dipped = falling_curve(), falling_curve(dip_at=20)
    assert 1e-4 < LRS[valley(clean)] < 1e-2
    assert valley(dipped) == pytest.approx(valley(clean), abs=2)
    assert steepest(LRS, dipped) == 19  # the steepest descent falls for the dip: why valley is the suggestion


def test_suggestions_skip_the_first_tenth_and_the_last_points():
    curve = curve_of(falling_curve())
    found = suggestions(curve, 100)
    assert set(found) == {"valley", "steepest"}
    assert all(10 <= i < len(LRS) - 5 for i in found.values())
    assert 1e-4 < LRS[found["valley"]] < 1e-1
    assert suggestions(curve_of(falling_curve()[:17]), 100) == {}  # diverged too early: nothing to read


def test_the_rates_grow_exponentially_from_start_to_end_through_the_optimizers_groups():
    plan = Plan(1e-6, 1.0, 25)
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(
        [{"params": weights[:1]}, {"params": weights[1:], "lr": 10 * plan.start}], lr=plan.start
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.factor)
    seen = []
    for _ in range(plan.steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx([1e-6, 1e-5]) and seen[-1] == pytest.approx([1.0, 10.0])
    ratios = [b[0] / a[0] for a, b in zip(seen, seen[1:])]
    assert ratios == pytest.approx([ratios[0]] * len(ratios))


def test_the_output_folder_is_beside_the_run_and_never_inside_it(tmp_path):
    config = load_config(None, ["data.shards=shards", f"run.dir={tmp_path / 'run'}"])
    assert output_dir(None, config) == tmp_path / "run-find_lr"
    assert output_dir(str(tmp_path / "lr"), config) == tmp_path / "lr"
    for inside in ("run", "run/find_lr"):
        with pytest.raises(UserError, match="find_lr leaves runs alone"):
            output_dir(str(tmp_path / inside), config)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"steps": 5}, "--steps 5"),
        ({"start_lr": 1.0, "end_lr": 0.1}, "0 < start < end"),
        ({"start_lr": 0.0}, "0 < start < end"),
        ({"processes": 0}, "--processes 0"),
    ],
)
def test_a_bad_plan_is_one_line(flags, words):
    args = argparse.Namespace(**{"steps": 100, "start_lr": 1e-7, "end_lr": 10.0, "processes": None, **flags})
    with pytest.raises(UserError, match=words):
        check_plan(args)


def test_the_curve_is_written_whole(tmp_path):
    curve = curve_of(falling_curve()[:60])
    found = suggestions(curve, 100)
    csv_path, plot_path = write_outputs(curve, {f"{n}: optim.lr=1": i for n, i in found.items()}, tmp_path / "out")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["step"] for r in rows] == [str(i) for i in range(1, 61)]
    assert float(rows[0]["lr"]) == pytest.approx(1e-7) and float(rows[-1]["smoothed_loss"]) == pytest.approx(
        curve.smoothed[-1], rel=1e-5
    )
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in Path(tmp_path / "out").iterdir()) == sorted([CSV_NAME, PLOT_NAME])


def test_a_curve_that_diverged_at_once_is_still_written(tmp_path):
    curve = curve_of([2.3, float("nan")])
    assert curve.diverged() and suggestions(curve, 100) == {}
    csv_path, plot_path = write_outputs(curve, {}, tmp_path)
    assert csv_path.read_text().splitlines()[1:] == ["1,1e-07,2.3,2.3", "2,1.2045e-07,nan,nan"]
    assert plot_path.stat().st_size > 0
