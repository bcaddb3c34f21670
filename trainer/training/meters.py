"""What the loop measures: the train window between two records and the epoch's train loss, the
progress lines of an epoch, the start-up clock, throughput, each defined once."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from toolbox.progress import Clock, Pace, duration, per_second

PROCESS_START = time.perf_counter()  # at import (torch loaded): accelerate start-up, compilation and the
# first batches all count towards the time to the first step, logged once per process


class TrainWindow:
    """Loss, accuracy and counts since the last train record: summed on the device and read only
    when logged, since a .item() per step would stall the GPU queue."""

    def __init__(self, device: torch.device, fetched_bytes: int):
        self.device = device
        self.epoch_start = time.perf_counter()  # one window per epoch; restarted at each record
        self.epoch_sums = [0.0, 0.0]  # loss x samples, samples: every record's, all ranks (the records' all-reduce)
        self.restart(fetched_bytes)

    def restart(self, fetched_bytes: int) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss x samples, correct
        self.seen = 0
        self.bad = 0  # samples skipped as unreadable
        self.start = time.perf_counter()
        self.fetched_before = fetched_bytes  # shard bytes the node caches had downloaded

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, bad: int) -> None:
        self.sums += torch.stack([loss.detach() * len(labels), (logits.detach().argmax(1) == labels).sum()])
        self.seen += len(labels)
        self.bad += bad

    def counts(self, fetched_bytes: int) -> torch.Tensor:
        """[loss sum, correct, seen, bad, fetched]: the part of a record the ranks sum."""
        more = [self.seen, self.bad, fetched_bytes - self.fetched_before]
        return torch.cat([self.sums, torch.tensor(more, dtype=torch.float64, device=self.device)])

    def recorded(self, loss_sum: float, seen: float) -> None:
        """A record's all-reduced loss sum and samples, towards the epoch's mean train loss."""
        self.epoch_sums[0] += loss_sum
        self.epoch_sums[1] += seen

    def epoch_loss(self) -> float:
        """The mean train loss over the epoch's samples on all ranks (since the start, when resumed
        mid-epoch); the epoch's last step is always recorded, so every sample counts."""
        loss_sum, seen = self.epoch_sums
        return loss_sum / seen if seen else math.nan

    def local_loss(self) -> float:
        """This process's mean loss since the last record: a progress line between records (a sync)."""
        return (self.sums[0] / max(self.seen, 1)).item()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def epoch_seconds(self) -> float:
        return time.perf_counter() - self.epoch_start


class EpochLines:
    """A log file's progress through one epoch (toolbox.progress's pace; the boundaries are the train
    records): epoch, step of steps, loss, img/s since the last line, the epoch's elapsed time, and
    the ETA of the epoch and of the run at that rate (training steps only: evaluations not counted).
    The epoch's last step has none: the epoch's summary line follows."""

    def __init__(
        self,
        say: Callable[[str], None],
        epoch: int,  # 1-based
        epochs: int,
        steps: int,  # optimizer steps per epoch
        done: int,  # steps of the epoch done before this start (resumed mid-epoch)
        global_batch: int,
        enabled: bool,
        clock: Clock = time.monotonic,
    ):
        self.say, self.epoch, self.epochs, self.steps = say, epoch, epochs, steps
        self.global_batch, self.enabled, self.clock = global_batch, enabled, clock
        self.start = self.last_time = clock()
        self.last_step = done
        self.pace = Pace(clock, first_at_once=True)

    def step_done(self, step: int, recorded: bool, loss: Callable[[], float]) -> None:
        """step: the epoch's steps done; recorded: a train record was just made; loss: asked only
        when a line goes out (it may sync the device)."""
        if not self.enabled or step >= self.steps or not self.pace.due(recorded):
            return
        now = self.clock()
        per_step = (now - self.last_time) / max(step - self.last_step, 1)  # seconds, since the last line
        self.last_step, self.last_time = step, now
        left = self.steps - step
        run_left = left + (self.epochs - self.epoch) * self.steps
        self.say(
            f"epoch {self.epoch}/{self.epochs}  step {step}/{self.steps}  loss {loss():.4f}  "
            f"{per_second(images_per_second(self.global_batch, per_step))} img/s  elapsed {duration(now - self.start)}  "
            f"ETA epoch {duration(left * per_step)}, run {duration(run_left * per_step)}"
        )


class StartupClock:
    """Seconds from process start to the end of its first optimizer step (compile included),
    for the first train record the process logs."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.logged = False

    def step_done(self, device: torch.device) -> None:
        if self.seconds is None:
            if device.type == "cuda":
                torch.cuda.synchronize()  # once: the first step's kernels are part of it
            self.seconds = time.perf_counter() - PROCESS_START

    def take(self) -> float | None:
        if self.logged or self.seconds is None:
            return None
        self.logged = True
        return self.seconds


STARTUP = StartupClock()


def images_per_second(images: float, seconds: float) -> float:
    return images / max(seconds, 1e-9)
