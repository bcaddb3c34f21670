"""Checkpoint files: atomic writes, keep-last-N, newest-complete discovery. What goes into one is
the training state's business (trainer/state.py); this module only puts it on disk and back.

A checkpoint is a directory `ckpt-<step>`: rank 0's `state.pt` (model, optimizer, scheduler,
scaler, EMA, counters, config), one `rank<r>.pt` per rank (its RNG states), and a `COMPLETE`
marker written last. It is assembled as `ckpt-<step>.tmp` and renamed only once complete and
fsynced, so a crash at any moment leaves either the old set of checkpoints or the new one. Old
checkpoints are pruned only after the new one is in place.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from shards import failpoints
from shards.errors import UserError
from trainer.rundir import writing
from trainer.runtime import PeerFailed

COMPLETE = "COMPLETE"


class CheckpointError(UserError):
    """A checkpoint that cannot be used for this run."""


def save(
    root: Path, step: int, parts: tuple[dict, dict], rank: int, agree: Callable[[bool], bool], keep: int
) -> Path | None:
    """Every rank calls this together with (shared state, its own state); rank 0 writes the shared
    one. Returns the final path on rank 0.

    agree(failed) is the ranks' barrier: True when any rank failed. A write that fails anywhere (a
    full disk, a quota) leaves no partial checkpoint: rank 0 removes it, the failing rank raises
    its OSError, the others PeerFailed."""
    final = root / f"ckpt-{step:09d}"
    tmp = root / f"ckpt-{step:09d}.tmp"

    def stage(write: Callable[[], None]) -> None:
        error = None
        try:
            write()
        except OSError as e:
            error = e
        if agree(error is not None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            failure = error or PeerFailed()
            failure.agreed = True  # every rank raises here, together
            raise failure

    def begin() -> None:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a write that was killed
            tmp.mkdir()

    state, own = parts

    def write_parts() -> None:
        _write(tmp / f"rank{rank}.pt", own)
        if rank == 0:
            _write(tmp / "state.pt", state)

    def complete() -> None:
        if rank != 0:
            return
        if failpoints.ACTIVE and step >= failpoints.step("pause-checkpoint") > 0:
            failpoints.wait_for_release("paused", note=str(step))
        shutil.rmtree(final, ignore_errors=True)  # same step saved twice (end of epoch == every N)
        with writing(tmp / COMPLETE):
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "epoch": state["epoch"], "time": time.time()}))
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep)

    stage(begin)
    stage(write_parts)
    stage(complete)
    return final if rank == 0 else None


def _write(path: Path, obj: dict) -> None:
    # Serialised in memory first: torch.save's own writer turns a full disk into an opaque RuntimeError.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with writing(path), open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("ckpt-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_newest(root: Path, rank: int) -> tuple[Path, dict, dict | None] | None:
    """The newest checkpoint that loads: (path, shared state, this rank's RNG or None). Broken ones are skipped."""
    for path in reversed(complete_checkpoints(root)):
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
            rank_file = path / f"rank{rank}.pt"
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.exists() else None
            return path, state, rank_state
        except Exception as e:  # a torn or corrupted file: fall back to the one before
            warnings.warn(
                f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); trying the previous one", stacklevel=2
            )
    return None
