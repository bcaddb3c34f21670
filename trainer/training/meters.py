"""What the loop measures: the train window between two records, the start-up clock, throughput,
and the best evaluation, each defined once."""

from __future__ import annotations

import time

import torch

PROCESS_START = time.perf_counter()  # at import (torch loaded): accelerate start-up, compilation and the
# first batches all count towards the time to the first step, logged once per process


class TrainWindow:
    """Loss, accuracy and counts since the last train record: summed on the device and read only
    when logged, since a .item() per step would stall the GPU queue."""

    def __init__(self, device: torch.device, fetched_bytes: int):
        self.device = device
        self.epoch_start = time.perf_counter()  # one window per epoch; restarted at each record
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

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def epoch_seconds(self) -> float:
        return time.perf_counter() - self.epoch_start


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
