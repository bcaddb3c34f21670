"""Calibration: the expected calibration error, the temperature fit, and their inputs gathered in the
split's order; the highest-loss wrong predictions."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from trainer.rundir import RunDirError, WeightsInfo
from trainer.training.calibration import BINS, TEMPERATURES, calibration, fit_temperature, nll, reliability
from trainer.training.evaluation import SplitLogits, evaluate, shown_rows
from trainer.training.metrics import TopLosses
from trainer.training.samples import Batch


def two_class(confidences: list[float], predicted: list[int]) -> torch.Tensor:
    """Logits whose softmax gives `predicted` the probability `confidence` out of two classes."""
    rows = [[c, 1 - c] if p == 0 else [1 - c, c] for c, p in zip(confidences, predicted)]
    return torch.tensor(rows, dtype=torch.float64).log()


def test_ece_on_known_inputs():
    # Bin 15 (0.9333, 1]: confidence 0.95, one of two right -> gap 0.45; bin 9 (0.5333, 0.6]: 0.55, both right -> 0.45.
    logits = two_class([0.95, 0.95, 0.55, 0.55], [0, 0, 1, 1])
    found = reliability(logits, torch.tensor([0, 1, 1, 1]))
    assert found.counts[14] == 2 and found.counts[8] == 2 and sum(found.counts) == 4
    assert found.accuracy[14] == 0.5 and found.confidence[8] == pytest.approx(0.55)
    assert found.ece == pytest.approx(0.45)
    perfect = reliability(two_class([1.0, 1.0], [0, 1]), torch.tensor([0, 1]))  # confidence 1 is in the last bin
    assert perfect.counts[BINS - 1] == 2 and perfect.ece == 0


def test_ece_matches_the_definition_on_random_logits():
    torch.manual_seed(0)
    logits, labels = torch.randn(500, 7) * 3, torch.randint(0, 7, (500,))
    confidence, predicted = logits.double().softmax(1).max(1)
    expected = 0.0
    for m in range(BINS):
        inside = (confidence > m / BINS) & (confidence <= (m + 1) / BINS)
        if inside.any():
            accuracy = (predicted[inside] == labels[inside]).double().mean()
            expected += inside.sum().item() / 500 * abs(accuracy - confidence[inside].mean()).item()
    assert reliability(logits, labels).ece == pytest.approx(expected, abs=1e-12)


def sampled(scale: float, n: int = 20000, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z); the model's logits are scale * z (scale > 1: over-confident)."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(n, classes, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(z.softmax(1), 1, generator=generator).squeeze(1)
    return z * scale, labels


def test_the_fit_finds_the_temperature_of_over_confident_logits_and_lowers_nll_and_ece():
    logits, labels = sampled(3.0)
    t = fit_temperature(logits, labels)
    assert 2.7 < t < 3.3  # the scale the logits were inflated by
    grid = [0.5 + i / 100 for i in range(500)]
    assert nll(logits, labels, t) <= min(nll(logits, labels, g) for g in grid) + 1e-9  # the minimum
    assert nll(logits, labels, t) < nll(logits, labels)
    found = calibration(logits, labels)
    assert found["temperature"] == t and found["ece_calibrated"] < found["ece"] / 3


def test_under_confident_logits_get_a_temperature_below_one_and_extremes_stop_at_the_bounds():
    logits, labels = sampled(0.5)
    assert 0.45 < fit_temperature(logits, labels) < 0.55
    right = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert fit_temperature(right, torch.tensor([0, 1])) == TEMPERATURES[0]  # all right: as peaky as allowed
    assert fit_temperature(right, torch.tensor([1, 0])) == TEMPERATURES[1]  # all wrong: as flat as allowed


def test_the_fit_sees_the_split_in_its_order_however_the_batches_came():
    """What 2 processes hand over (interleaved indices, in any batch order) gathers to what 1 does, so
    the temperature is the same bit for bit."""
    logits, labels = sampled(2.0, n=300)
    one, two = SplitLogits(), SplitLogits()
    one.add(logits, labels, torch.arange(300))
    for rank in (1, 0):  # rank r holds samples r, r + 2, ...; batches of 7
        for start in range(rank, 300, 14):
            indices = torch.arange(start, min(start + 14, 300), 2)
            two.add(logits[indices], labels[indices], indices)
    accelerator = Accelerator(cpu=True)
    a, b = one.gathered(accelerator), two.gathered(accelerator)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert fit_temperature(*a) == fit_temperature(*b)


def test_top_losses_keep_the_wrong_predictions_with_the_least_probability_for_the_true_class():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3], [0.55, 0.45]])
    labels = torch.tensor([1, 1, 1, 0, 1])  # wrong: 0 (p_true 0.1), 1 (0.4), 4 (0.45)
    worst = TopLosses(2)
    images = torch.arange(5.0)[:, None, None, None].expand(5, 3, 1, 1) / 10
    worst.add(images[:3], probs[:3], labels[:3])
    worst.add(images[3:], probs[3:], labels[3:])
    rows = shown_rows(worst, ["a", "b"], [0, 0, 0], [1, 1, 1], Accelerator(cpu=True))
    assert [(row[1], row[2], row[3]) for row in rows] == [
        ("b", "a", pytest.approx(0.9)),
        ("b", "a", pytest.approx(0.6)),
    ]
    assert rows[0][0].shape == (1, 1, 3) and rows[1][0][0, 0, 0] == int(0.1 * 255)  # sample 1's picture


def test_evaluate_hands_every_logit_and_the_worst_to_its_collectors():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 3))
    batches = [
        Batch(torch.randn(4, 3, 1, 1), torch.tensor([0, 1, 2, 0]), torch.tensor([4, 0, 2, 6]), 0),
        Batch(torch.randn(3, 3, 1, 1), torch.tensor([1, 2, 0]), torch.tensor([1, 5, 3]), 0),
    ]
    logits, worst = SplitLogits(), TopLosses()
    evaluate(model, batches, 3, Accelerator(cpu=True), logits_out=logits, worst=worst)
    gathered, labels = logits.gathered(Accelerator(cpu=True))
    assert labels.tolist() == [1, 1, 2, 0, 0, 2, 0]  # by index in the split
    with torch.no_grad():
        expected = model(torch.cat([b.images for b in batches]))[torch.tensor([1, 4, 2, 6, 0, 5, 3])]
    assert torch.allclose(gathered, expected)
    wrong = (expected.argmax(1) != labels).sum().item()
    assert len(worst.labels) == wrong


def test_weights_carry_their_temperature_and_a_damaged_one_is_refused():
    info = WeightsInfo(classes=["a", "b"], temperature=1.25)
    assert WeightsInfo.from_metadata(info.metadata(), "w").temperature == 1.25
    assert WeightsInfo.from_metadata(WeightsInfo(classes=["a"]).metadata(), "w").temperature is None
    for bad in ("-1", "0", '"x"', "NaN"):
        with pytest.raises(RunDirError, match="not a positive number"):
            WeightsInfo.from_metadata({"temperature": bad}, "w")
    assert math.isfinite(calibration(torch.zeros(2, 2), torch.tensor([0, 1]))["temperature"])
