"""Named failpoints: the one place where tests inject faults (as etcd's gofail and TiKV's fail-rs do).

Off unless the FAILPOINTS environment variable names them, `name=value` separated by `;`:

    FAILPOINTS="nan-loss=4,5;hold-after-step=3;release=/tmp/t/go" accelerate launch trainer/main.py ...

Read once at import, so a failpoint that is off costs a set or dict lookup, and no other production
module reads a test variable. Values may name environment variables ($SLURM_ARRAY_TASK_ID), so
each task of a job array gets its own release file. Every point there is:
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

ENV = "FAILPOINTS"
POINTS = {
    "nan-loss": "STEPS (1-based, comma-separated): the main process's loss is NaN at these optimizer steps",
    "hold-after-step": "STEP: the main process holds after this optimizer step until `release` exists or it is "
    "asked to stop (writes RELEASE.held), so a test signals or kills a run at a known step",
    "pause-checkpoint": "STEP: from this step on, a checkpoint stalls after its parts and before its COMPLETE "
    "marker (writes its step to RELEASE.paused); without `release` it sleeps 600 s",
    "release": "FILE: whose existence ends a hold or a pause",
    "make-shards-pause": "FILE: make_shards touches FILE after its first shard is written, then sleeps 600 s",
    "upload-pause": "FILE: make_shards touches FILE after its first object is uploaded to OUT, then sleeps 600 s",
    "pause-outputs": "FILE: evaluate and predict touch FILE while their output is still a .tmp file (predict: "
    "after its first batch's rows), then sleep 600 s, so a test interrupts them there",
}
WAIT_S = 600.0  # a test that forgets to release never hangs a process for longer


def parse(text: str) -> dict[str, str]:
    items = (item.split("=", 1) if "=" in item else (item, "") for item in text.split(";") if item.strip())
    points = {name: os.path.expandvars(value) for name, value in items}
    unknown = sorted(set(points) - set(POINTS))
    if unknown:  # a misspelt point would silently test nothing
        raise ValueError(f"unknown failpoint(s) {unknown} in {ENV}; known: {sorted(POINTS)}")
    return points


ACTIVE = parse(os.environ.get(ENV, ""))


def value(name: str) -> str | None:
    return ACTIVE.get(name)


def steps(name: str) -> set[int]:
    return {int(s) for s in (ACTIVE.get(name) or "").split(",") if s}


def step(name: str) -> int:
    return int(ACTIVE.get(name) or 0)


def pause(name: str) -> None:
    """A point whose value is a FILE: touch it, then sleep WAIT_S (the test signals the process meanwhile)."""
    flag = ACTIVE.get(name)
    if flag:
        Path(flag).touch()
        time.sleep(WAIT_S)


def wait_for_release(mark: str, give_up: Callable[[], bool] = lambda: False, note: str = "") -> None:
    """Writes `note` to RELEASE.<mark> and waits until RELEASE exists (or give_up(); or WAIT_S); without
    a release file it just sleeps WAIT_S."""
    release = ACTIVE.get("release")
    if not release:
        time.sleep(WAIT_S)
        return
    Path(f"{release}.{mark}").write_text(note)
    deadline = time.monotonic() + WAIT_S
    while not (Path(release).exists() or give_up()) and time.monotonic() < deadline:
        time.sleep(0.05)


def env(**points: object) -> dict[str, str]:
    """For tests: the environment that turns these points on (`hold_after_step=3` -> hold-after-step=3)."""
    text = ";".join(f"{name.replace('_', '-')}={value}" for name, value in points.items())
    parse(text)
    return {ENV: text}
