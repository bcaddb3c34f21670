"""The run directory's one owner: the name of every file in it, reading and writing them, one trainer
per run dir, a truthful status.json, one-line disk errors.

The main process holds an exclusive `flock` on `run.dir/.lock` for the whole run. The kernel
drops it when the process dies, so a killed or requeued trainer leaves no stale lock; on NFSv4
the client turns flock into a lease-backed byte-range lock, and on Lustre it works when mounted
with `-o flock`. Where the file system has no locks at all the run goes on unprotected, with a
note saying so.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from toolbox import lock
from toolbox.errors import UserError

# Every file of a run directory, named once: training writes them, evaluate/predict/export, wandb
# and the report read them.
CONFIG = "config.yaml"  # the resolved config
CLASSES = "classes.json"
PREPROCESSING = "preprocessing.json"  # what evaluate/predict/export need to preprocess like training did
METRICS = "metrics.jsonl"  # train and eval records
SUMMARY = "summary.json"
REPORT = "report.md"
STATUS = "status.json"
CURVES = "curves.png"
CONFUSION = "confusion.png"
WEIGHTS = {"best": "best.safetensors", "final": "final.safetensors"}  # by wandb alias and --checkpoint name
CHECKPOINTS = "checkpoints"
COMPILE_CACHE = "compile_cache"
EVAL = "eval"  # evaluate's outputs
EXPORT = "export"
PREDICTIONS = "predictions.csv"
WANDB = "wandb"
# How each series of metrics.jsonl is best: wandb summarizes it so, and compare ranks by it.
SUMMARIES = {"eval/top1": "max", "eval/top5": "max", "eval/loss": "min", "train/loss": "min"}
RUN_FILES = (CONFIG, CLASSES, PREPROCESSING)  # what the after-training commands read besides weights
LOCK = ".lock"
STATUS_BYTES = 4096  # status.json is padded to one block, so that rewriting it in place needs no new one
MIN_FREE_MB = 256
DISK_ERRORS = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("no space left on the device", "free space"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or raise the quota"),
    errno.EROFS: ("the file system is read-only", "make run.dir writable"),
    errno.EACCES: ("permission denied", "make run.dir writable"),
}


class RunDirError(UserError):
    """The run directory cannot be created, written or locked, or another trainer holds it."""


def is_disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_ERRORS


def disk_error_line(e: OSError, run_dir: Path | None, then: str) -> str:
    """then: what the same command does next, e.g. 'it resumes from ckpt-000000007'."""
    what, fix = DISK_ERRORS[e.errno]
    return f"cannot write {e.filename or run_dir}: {what} — {fix}, then start the same command: {then}"


@contextmanager
def writing(path: Path):
    """Names the file in an OSError raised by a write to an open file (which carries no name)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


class RunDir:
    """Held by the main process only; on other ranks `owned` stays False and status writes are no-ops."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.owned = False
        self.started = False  # status.json says running: from here on it says how the run ended

    def lock(self) -> str | None:
        """Takes the lock before anything is written; returns a note when the file system has no locks."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot write to run.dir {self.path} ({e.strerror}) — choose a writable run.dir") from e
        try:
            who = lock.flock(fd)
        except OSError as e:
            if e.errno not in lock.NO_LOCKS:
                raise
            who, note = (
                None,
                (
                    f"note: the file system of {self.path} does not support locks ({e.strerror}), so nothing stops "
                    "a second trainer from using this run.dir at the same time"
                ),
            )
        else:
            note = None
        if who is not None:
            os.close(fd)
            raise RunDirError(
                f"run.dir {self.path} is in use by another trainer ({lock.describe(who)}) — wait for it to end, "
                "stop it, or choose another run.dir"
            )
        lock.hold(fd)
        self.fd, self.owned = fd, True
        return note

    def file(self, name: str) -> Path:
        return self.path / name

    def prepare(self, config_yaml: str, classes: list[str], preprocessing: dict, resume: bool) -> None:
        """The files a run starts with. Fails now, not after an epoch, when the run dir cannot take
        checkpoints; starting over (resume false) sets the old checkpoints aside, never deletes them."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-probe"
            probe.write_bytes(b"\0" * 1024)
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"cannot write to run.dir {self.path} ({e.strerror}) — choose a writable run.dir") from e
        free_mb = shutil.disk_usage(self.path).free / 2**20
        if free_mb < MIN_FREE_MB:
            raise RunDirError(
                f"run.dir {self.path} has only {free_mb:.0f} MB free — free space or choose another run.dir"
            )
        old = self.path / CHECKPOINTS
        if not resume and old.exists():
            os.replace(old, self.path / f"{CHECKPOINTS}-replaced-{int(time.time())}")
        (self.path / CONFIG).write_text(config_yaml)
        (self.path / CLASSES).write_text(json.dumps(classes, ensure_ascii=False, indent=1))
        (self.path / PREPROCESSING).write_text(json.dumps(preprocessing, indent=1))

    def records(self) -> list[dict]:
        """metrics.jsonl: the train and eval records, in order."""
        return read_records(self.path / METRICS)

    def append_record(self, record: dict) -> None:
        path = self.path / METRICS
        with writing(path), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def keep_records(self, step: int | None) -> None:
        """A fresh run starts a new metrics.jsonl (None); a resumed one drops the records past its
        checkpoint's step: the killed run logged them, and they are about to be redone."""
        path = self.path / METRICS
        if step is None or not path.exists():
            path.unlink(missing_ok=True)
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def write_json(self, name: str, value: dict) -> None:
        (self.path / name).write_text(json.dumps(value, indent=2))

    def write_weights(self, alias: str, data: bytes) -> Path:
        """best/final weights, atomically: a full disk leaves the previous file, never a partial one."""
        path = self.path / WEIGHTS[alias]
        tmp = path.with_suffix(".tmp")
        try:
            with writing(path), open(tmp, "wb") as f:  # safetensors' own writer hides a full disk's errno
                f.write(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def set_status(self, state: str, reason: str | None = None) -> None:
        """completed | preempted | failed (with the one-line reason) | running. Best effort when the
        disk is full: the padded file is then rewritten in place, which needs no new block."""
        if not self.owned or (state != "running" and not self.started):
            return  # a run that never started leaves the status of the one before (a finished run stays so)
        self.started = True
        status = {"state": state, "time": time.time(), **({"reason": reason[:1000]} if reason else {})}
        if state == "running":
            status.update(host=socket.gethostname(), pid=os.getpid())
        data = (json.dumps(status, ensure_ascii=False) + "\n").encode().ljust(STATUS_BYTES)
        path = self.path / STATUS
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            path.with_suffix(".tmp").unlink(missing_ok=True)
            try:
                with open(path, "r+b") as f:
                    f.write(data)
            except OSError:
                pass  # nothing more can be done: the one-line error still reaches the log


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_throughput(records: list[dict]) -> float | None:
    """The run's images/s: the mean over its train records but the first, which holds start-up."""
    rates = [r["img_per_s"] for r in records if r["kind"] == "train"][1:]
    return sum(rates) / len(rates) if rates else None


def best_eval(records: list[dict]) -> dict:
    """The best evaluation so far: the first with the highest top-1, whose weights are best.safetensors."""
    evals = [r for r in records if r["kind"] == "eval"]
    return max(evals, key=lambda r: r["top1"]) if evals else {}  # max keeps the first of equals
