"""Whether a predicted probability of 0.9 means 90%: the expected calibration error over equal-width
confidence bins, and the one temperature T that makes softmax(logits / T) fit held-out labels best
(temperature scaling, Guo et al. 2017, "On Calibration of Modern Neural Networks").

Pure functions of a split's logits and labels. Callers hand them every sample of the split in one
order (the split's), so the numbers do not depend on how many processes evaluated it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BINS = 15  # equal-width bins of top-1 confidence, as in Guo et al.
TEMPERATURES = (0.05, 20.0)  # the fit's bounds: a val split the model gets all right pulls T towards 0
NEWTON_STEPS = 100  # far more than a convex 1-D fit needs (it converges in ~10)


@dataclass(frozen=True)
class Reliability:
    """Per bin ((m-1)/M, m/M] of top-1 confidence: its samples, their mean confidence, their accuracy."""

    counts: list[int]
    confidence: list[float]
    accuracy: list[float]

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of |B|/n * |accuracy(B) - confidence(B)|."""
        n = sum(self.counts)
        gaps = (c * abs(a - p) for c, a, p in zip(self.counts, self.accuracy, self.confidence))
        return sum(gaps) / n if n else 0.0


def reliability(logits: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> Reliability:
    """The reliability diagram's numbers for softmax(logits); an empty bin has confidence and accuracy 0."""
    confidence, predicted = logits.double().softmax(1).max(1)
    correct = (predicted == labels).double()
    which = ((confidence * bins).ceil().long() - 1).clamp(0, bins - 1)  # right-closed bins: 1.0 is in the last
    counts = torch.bincount(which, minlength=bins)
    sums = torch.zeros(2, bins, dtype=torch.float64)
    sums[0].index_add_(0, which, confidence)
    sums[1].index_add_(0, which, correct)
    means = sums / counts.clamp(min=1)
    return Reliability(counts.tolist(), means[0].tolist(), means[1].tolist())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in TEMPERATURES with the least mean NLL of softmax(logits / T). The NLL is convex in
    b = 1/T (a log-sum-exp of a linear function, less a linear one), so its slope rises with b:
    Newton steps on b, kept inside a bracket of the slope's sign change, find the one minimum
    deterministically (the same rows in the same order give the same T, bit for bit)."""
    z = logits.double()
    true = z.gather(1, labels[:, None]).squeeze(1)

    def slope(b: float) -> tuple[float, float]:
        """d NLL / db and d2 NLL / db2: E_p[z] - z_true and Var_p[z], averaged over the samples."""
        p = (b * z).softmax(1)
        mean = (p * z).sum(1)
        return (mean - true).mean().item(), ((p * z * z).sum(1) - mean**2).mean().item()

    low, high = 1 / TEMPERATURES[1], 1 / TEMPERATURES[0]
    if slope(low)[0] >= 0:  # the NLL only rises with b: the flattest probabilities fit best
        return TEMPERATURES[1]
    if slope(high)[0] <= 0:  # it only falls: every sample right, the peakiest allowed
        return TEMPERATURES[0]
    b = 1.0
    for _ in range(NEWTON_STEPS):
        g, h = slope(b)
        if g == 0:
            break
        low, high = (b, high) if g < 0 else (low, b)
        newton = b - g / h if h > 0 else float("nan")
        step = newton if low < newton < high else (low + high) / 2  # outside the bracket: bisect
        if abs(step - b) <= 1e-12 * b:
            b = step
            break
        b = step
    return 1 / b


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T)."""
    return torch.nn.functional.cross_entropy(logits.double() / temperature, labels).item()


def calibration(logits: torch.Tensor, labels: torch.Tensor, temperature: float | None = None) -> dict:
    """An eval record's calibration fields: ece (plain softmax) and, with a temperature (given, or
    fitted here when None), temperature and ece_calibrated. {} for an empty split."""
    if not len(labels):
        return {}
    if temperature is None:
        temperature = fit_temperature(logits, labels)
    return {
        "ece": reliability(logits, labels).ece,
        "temperature": temperature,
        "ece_calibrated": reliability(logits / temperature, labels).ece,
    }
