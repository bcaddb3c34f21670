"""Early stopping (Keras' EarlyStopping, Lightning's callback): the run ends once the monitored
validation metric has not improved by more than train.early_stop_min_delta for
train.early_stop_patience evaluations in a row.

`Plateau` is the count, a part of the training progress saved in every checkpoint, so a resumed
run counts on exactly where the killed one was; `EarlyStop` holds the settings and judges it.
Both are pure: the loop feeds them a value every rank shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.training.config import TrainConfig

NAMES = {"top1": "val top-1", "loss": "val loss"}  # train.early_stop_metric -> what the lines call it


@dataclass
class Plateau:
    """The monitored metric's best counted value and the evaluations since it."""

    metric: str = ""  # the metric counted ("" before the first evaluation)
    best: float | None = None  # the last value that counted as an improvement
    best_epoch: int = -1
    waited: int = 0  # evaluations since best without an improvement


@dataclass(frozen=True)
class EarlyStop:
    metric: str  # top1 (higher is better) | loss (lower is better)
    patience: int  # evaluations without an improvement before the run stops; 0: off
    min_delta: float  # an improvement must exceed this

    @classmethod
    def of(cls, train: TrainConfig) -> EarlyStop:
        return cls(train.early_stop_metric, train.early_stop_patience, train.early_stop_min_delta)

    @property
    def on(self) -> bool:
        return self.patience > 0

    def improves(self, value: float, best: float | None) -> bool:
        """Beats best by more than min_delta; a non-finite value never does."""
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best + self.min_delta if self.metric == "top1" else value < best - self.min_delta

    def update(self, plateau: Plateau, value: float, epoch: int) -> bool:
        """Counts one evaluation's value; True when it improved. The best moves only on an
        improvement (as Keras and Lightning do), so small gains add up until one counts. A resume
        that changed the metric starts the count afresh: the old best is of another quantity."""
        if plateau.metric != self.metric:
            plateau.metric, plateau.best, plateau.best_epoch, plateau.waited = self.metric, None, -1, 0
        if self.improves(value, plateau.best):
            plateau.best, plateau.best_epoch, plateau.waited = value, epoch, 0
            return True
        plateau.waited += 1
        return False

    def stops(self, plateau: Plateau) -> bool:
        return self.on and plateau.metric == self.metric and plateau.waited >= self.patience

    def reason(self, plateau: Plateau, epoch: int, epochs: int) -> str | None:
        """Why a run ended after `epoch` of `epochs`; None when it did not stop early (a stop at the
        last epoch is no early one)."""
        if epoch >= epochs or not self.stops(plateau):
            return None
        return f"stopped early at epoch {epoch} of {epochs}: {self.verdict(plateau)}"

    def verdict(self, plateau: Plateau) -> str:
        """Why a run stopped: the metric, the margin, the evaluations, and the last value that counted as
        an improvement (the best, unless later gains were all within min_delta)."""
        margin = f" by more than {self.min_delta:g}" if self.min_delta else ""
        last = (
            "no finite value"
            if plateau.best is None
            else f"last improvement {plateau.best:.4f} at epoch {plateau.best_epoch}"
        )
        return (
            f"{NAMES[self.metric]} has not improved{margin} for {plateau.waited} evaluation"
            f"{'s' if plateau.waited != 1 else ''} ({last})"
        )

    def describe(self, eval_every: int) -> str:
        """The start-up line."""
        margin = f" by more than {self.min_delta:g}" if self.min_delta else ""
        every = "every epoch" if eval_every == 1 else f"every {eval_every} epochs"
        line = (
            f"early stopping: the run ends once {NAMES[self.metric]} has not improved{margin} for "
            f"{self.patience} evaluation{'s' if self.patience != 1 else ''} (evaluated {every})"
        )
        # best.safetensors is chosen by val top-1 in every run, so a sweep's "best" means one thing
        return line + ("; best.safetensors stays the best val top-1" if self.metric != "top1" else "")
