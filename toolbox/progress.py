"""Progress a log file can show: plain lines where a terminal shows a tqdm bar.

A bar redraws itself in place and clears at the end, so a Slurm log or a redirected file keeps
nothing of it. Unless both stdout and stderr are terminals, commands also print plain lines,
paced by one rule (Pace): a line at a boundary (every train.log_every steps in training, every
tenth of the input in evaluate and predict), but no sooner than MIN_GAP_S after the last line,
so a fast run does not flood its log; and a line at the first step that ends MAX_GAP_S or more
after the last one, boundary or not, so a slow run is never silent for longer than a step past a
minute. The clock is an argument: tests drive the pace with fake times.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

MIN_GAP_S = 10.0  # boundaries closer than this after the last line are passed over
MAX_GAP_S = 60.0  # the longest a log waits for a line while work completes

Clock = Callable[[], float]


def lines_wanted() -> bool:
    """Plain lines unless both streams are terminals: stdout to a file keeps them while a terminal on
    stderr keeps its bar; stderr to a file (no bar) gets them on the terminal instead."""
    return not (sys.stdout.isatty() and sys.stderr.isatty())


class Pace:
    """When the next line is due. first_at_once: the first boundary is shown whatever the gap (a
    training epoch's rate and ETA early in the log)."""

    def __init__(self, clock: Clock = time.monotonic, first_at_once: bool = False):
        self.clock = clock
        self.last = clock()
        self.first_at_once = first_at_once

    def due(self, boundary: bool) -> bool:
        """Called after each unit of work; boundary: the work just done crossed one."""
        now = self.clock()
        gap = now - self.last
        if gap >= MAX_GAP_S or (boundary and (self.first_at_once or gap >= MIN_GAP_S)):
            self.last, self.first_at_once = now, False
            return True
        return False


def duration(seconds: float) -> str:
    """12s, 4m05s, 2h03m; ? when unknown (no rate yet)."""
    if not math.isfinite(seconds):
        return "?"
    s = round(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def per_second(rate: float) -> str:
    """An images/s figure: whole numbers, a decimal below 10 (a slow CPU run is not '0 img/s')."""
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.1f}"


class CountLines:
    """Lines for one pass over `total` images (evaluate, predict): done of total, the rate since the
    start, elapsed and ETA. Silent when disabled, and at the end (the command's own line follows)."""

    def __init__(self, desc: str, total: int, say: Callable[[str], None], enabled: bool, clock: Clock = time.monotonic):
        self.desc, self.total, self.say, self.clock = desc, total, say, clock
        self.enabled = enabled and total > 0
        self.start = clock()
        self.pace = Pace(clock)
        self.done = 0
        self.tenth = max(1, math.ceil(total / 10))

    def update(self, done: int) -> None:
        """done: the images finished so far, all processes together."""
        crossed = done // self.tenth > self.done // self.tenth
        self.done = min(done, self.total)
        if not self.enabled or self.done >= self.total or not self.pace.due(crossed):
            return
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        self.say(
            f"{self.desc} {self.done:,}/{self.total:,} images  {per_second(rate)} img/s  "
            f"elapsed {duration(elapsed)}  ETA {duration(eta)}"
        )
