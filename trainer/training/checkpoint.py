"""Checkpoint files: atomic writes, keep-last-N, newest-complete discovery. What goes into one is
the training state's business (trainer/state.py); this module only puts it on disk and back.

A checkpoint is a directory `ckpt-<step>`: rank 0's `state.pt` (model, optimizer, scheduler,
scaler, EMA, counters, config), one `rank<r>.pt` per rank (its RNG states), and a `COMPLETE`
marker written last, which records every file's size and sha256. It is assembled as
`ckpt-<step>.tmp` and renamed only once complete and fsynced, so a crash at any moment leaves
either the old set of checkpoints or the new one. Old checkpoints are pruned only after the new
one is in place.

A checkpoint folder is data, never code: its files are read only when their size and sha256 are
the ones recorded, and then with `torch.load(weights_only=True)` (tensors and plain containers),
so a pickle placed in a run dir cannot run, and a file changed after it was written is refused.
Only folders named `ckpt-<digits>` count (a `ckpt-...50.bak` copy is ignored).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from toolbox import failpoints
from toolbox.errors import UserError, first_line
from trainer.rundir import CHECKPOINTS, writing
from trainer.training.runtime import PeerFailed

COMPLETE = "COMPLETE"
STATE = "state.pt"
NAME = re.compile(r"ckpt-(\d+)")  # the whole folder name
MAX_MARKER_BYTES = 1 << 20


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
    files: dict[str, dict] = {}

    def write_parts() -> None:
        _write(tmp / f"rank{rank}.pt", own)
        if rank == 0:
            files[STATE] = _write(tmp / STATE, state)

    def complete() -> None:
        if rank != 0:
            return
        if failpoints.ACTIVE and step >= failpoints.step("pause-checkpoint") > 0:
            failpoints.wait_for_release("paused", note=str(step))
        for part in sorted(tmp.glob("rank*.pt")):  # every rank's, written before the barrier
            files[part.name] = _digest(part.read_bytes())
        shutil.rmtree(final, ignore_errors=True)  # same step saved twice (end of epoch == every N)
        marker = {"step": step, "epoch": state["epoch"], "time": time.time(), "files": files}
        with writing(tmp / COMPLETE):
            (tmp / COMPLETE).write_text(json.dumps(marker))
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep)

    stage(begin)
    stage(write_parts)
    stage(complete)
    return final if rank == 0 else None


def _write(path: Path, obj: dict) -> dict:
    """-> the file's size and sha256, as COMPLETE records them."""
    # Serialised in memory first: torch.save's own writer turns a full disk into an opaque RuntimeError.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with writing(path), open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    return _digest(buffer.getbuffer())


def _digest(data) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (`ckpt-<digits>` with their marker), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.fullmatch(p.name) and p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def resume_hint(run_dir: Path | None) -> str:
    """Where the same command would start again: its newest complete checkpoint, or the beginning."""
    done = complete_checkpoints(run_dir / CHECKPOINTS) if run_dir else []
    return f"it resumes from {done[-1].name}" if done else "it starts again (no checkpoint was complete yet)"


def interrupted_line(run_dir: Path | None) -> str:
    return f"interrupted — start the same command again: {resume_hint(run_dir)}"


def prune(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def newest_usable(
    paths: list[Path],
    read: Callable[[Path], object],
    agree: Callable[[Path, str | None], str | None] = lambda _, why: why,
) -> tuple[Path | None, object, list[str]]:
    """The first of `paths` (newest first) that read() takes: (its path, what read returned, why each
    one before it was skipped). agree(path, reason or None) is the processes' verdict on a candidate:
    a reason when any of them could not read it, None when all could."""
    skipped = []
    for path in paths:
        try:
            value, why = read(path), None
        except CheckpointError as e:
            value, why = None, first_line(e)
        why = agree(path, why)
        if why is None:
            return path, value, skipped
        skipped.append(why)
    return None, None, skipped


def read(path: Path, rank: int | None = None) -> tuple[dict, dict | None]:
    """(shared state, this rank's own state or None) of one checkpoint, each file checked against
    the size and sha256 its marker recorded before it is loaded. CheckpointError says why not."""
    files = _recorded(path)
    state = _load(path, STATE, files)
    own = f"rank{rank}.pt"
    # A rank the checkpoint's job did not have (the world grew) starts its RNG from the seed.
    return state, _load(path, own, files) if rank is not None and own in files else None


def _recorded(path: Path) -> dict[str, dict]:
    try:
        with open(path / COMPLETE, "rb") as f:
            marker = json.loads(f.read(MAX_MARKER_BYTES))
        files = marker["files"]
        if not isinstance(files, dict) or STATE not in files:
            raise ValueError("no state.pt recorded")
        return files
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = (
            "it records no checksums (written by an older version)"
            if isinstance(e, KeyError)
            else "its COMPLETE marker is unreadable"
        )
        raise CheckpointError(f"{path.name}: {reason}") from e


def _load(path: Path, name: str, files: dict[str, dict]):
    expected = files.get(name)
    if not isinstance(expected, dict) or not isinstance(expected.get("size"), int):
        raise CheckpointError(f"{path.name}: {name} is not recorded in its COMPLETE marker")
    try:
        with open(path / name, "rb") as f:
            data = f.read(expected["size"] + 1)  # never more than was written, whatever is there now
    except OSError as e:
        raise CheckpointError(f"{path.name}: {name} cannot be read ({e.strerror})") from e
    if len(data) < expected["size"]:
        raise CheckpointError(f"{path.name}: {name} is truncated ({len(data)} of {expected['size']} bytes)")
    if len(data) > expected["size"] or _digest(data)["sha256"] != expected.get("sha256"):
        raise CheckpointError(f"{path.name}: {name} changed after it was written (its sha256 differs)")
    try:
        with warnings.catch_warnings():  # torch's advice is about pickles; our line says what happened
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a file that matches its checksum but holds more than tensors and containers
        raise CheckpointError(f"{path.name}: {name} cannot be loaded as data ({first_line(e)[:160]})") from e
