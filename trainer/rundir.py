"""The run directory's one owner: the name of every file in it, reading and writing them (the config
and classes, the preprocessing, the weights and their metadata, metrics, status, summary, eval
outputs), one trainer per run dir, a truthful status.json. Training writes through here, the
after-training commands, wandb, the report and `trainer.compare` read through here. Imports no
torch until weights are read or written, so run management stays light.

The main process holds an exclusive `flock` on `run.dir/.lock` for the whole run. The kernel
drops it when the process dies, so a killed or requeued trainer leaves no stale lock; on NFSv4
the client turns flock into a lease-backed byte-range lock, and on Lustre it works when mounted
with `-o flock`. Where the file system has no locks at all the run goes on unprotected, with a
note saying so.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

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
TOP_LOSSES = "top_losses.png"  # the final evaluation's highest-loss wrong predictions
WEIGHTS = {"best": "best.safetensors", "final": "final.safetensors"}  # by wandb alias and --checkpoint name
CHECKPOINTS = "checkpoints"
COMPILE_CACHE = "compile_cache"
EVAL = "eval"  # evaluate's outputs: <name>.json, <name>.png and these beside them
EVAL_FIGURES = {"top_losses": "-top-losses.png", "reliability": "-reliability.png"}  # <name> + suffix
EXPORT = "export"
HELDOUT = "heldout.npz"  # the best weights' probabilities on each val (held-out) sample: trainer/training/heldout.py
AUDIT = "audit"  # trainer.audit's outputs
PREDICTIONS = "predictions.csv"  # predict's first default CSV; then predictions-2.csv, ... (predictions_name)
LATER_PREDICTIONS = re.compile(r"predictions-([0-9]+)\.csv")
WANDB = "wandb"
# How each series of metrics.jsonl is best: wandb summarizes it so, and compare ranks by it.
SUMMARIES = {"eval/top1": "max", "eval/top5": "max", "eval/loss": "min", "train/loss": "min"}
# What train.resume=false sets aside: an earlier run's files (wandb's folder and the compile cache stay).
EARLIER_RUN = (
    CHECKPOINTS, CONFIG, CLASSES, PREPROCESSING, METRICS, SUMMARY, REPORT, STATUS, CURVES, CONFUSION,
    TOP_LOSSES, *WEIGHTS.values(), EVAL, EXPORT, PREDICTIONS, HELDOUT,
)  # fmt: skip
RUN_FILES = (CONFIG, CLASSES, PREPROCESSING)  # what the after-training commands read besides weights
LOCK = ".lock"
MIN_FREE_MB = 256
DISK_ERRORS = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("no space left on the device", "free space"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or raise the quota"),
    errno.EROFS: ("the file system is read-only", "make run.dir writable"),
    errno.EACCES: ("permission denied", "make run.dir writable"),
}


class RunDirError(UserError):
    """The run directory cannot be created, written or locked, or another trainer holds it."""


@dataclass(frozen=True)
class Preprocessing:
    """What an image goes through before the model, as validation did in training: resize the short
    side to image_size / crop_pct, centre-crop image_size, normalise with mean and std. Written to
    preprocessing.json and into every weights file's metadata, so weights carry it wherever they go."""

    mean: list[float]
    std: list[float]
    image_size: int  # what evaluate, predict and export resize to
    crop_pct: float
    train_image_size: int  # the train crop (the last one, with progressive resizing)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> Preprocessing:
        try:
            values = json.loads(text)
            found = cls(
                mean=[float(x) for x in values["mean"]],
                std=[float(x) for x in values["std"]],
                image_size=int(values["image_size"]),
                crop_pct=float(values["crop_pct"]),
                train_image_size=int(values.get("train_image_size", values["image_size"])),  # older runs lack it
            )
            usable = len(found.mean) == len(found.std) == 3 and all(
                map(math.isfinite, [*found.mean, *found.std, found.crop_pct])
            )
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise RunDirError(f"{where} is damaged ({type(e).__name__}) — restore it from a copy of the run") from e
        if not usable or min(found.std) <= 0 or found.image_size <= 0 or not 0 < found.crop_pct <= 1:
            raise RunDirError(
                f"{where} holds no usable preprocessing (mean {found.mean}, std {found.std}, image_size "
                f"{found.image_size}, crop_pct {found.crop_pct}) — restore it from a copy of the run"
            )
        return found

    def deployment(self, letterbox: bool = False) -> dict:
        """What a deployment must do to an image before the model (export writes it next to the model)."""
        steps = (
            "pad to a square with black, resize to image_size"
            if letterbox
            else "resize the short side to resize_short_side (bilinear, antialias), centre-crop image_size"
        )
        return {
            "image_size": self.image_size,
            "resize_short_side": None if letterbox else round(self.image_size / self.crop_pct),
            "crop_pct": self.crop_pct,
            "letterbox": letterbox,
            "steps": steps + "; RGB scaled to [0, 1]; subtract mean, divide by std; NCHW float32",
            "mean": self.mean,
            "std": self.std,
        }


@dataclass
class WeightsInfo:
    """What a weights file says of itself (its safetensors metadata): how to build the model
    (config, classes, fingerprint), how to preprocess for it, and the evaluation it scored. Each
    part is None in a file that does not record it (a plain .pth, an older run's file)."""

    config: dict | None = None
    classes: list[str] | None = None
    fingerprint: str | None = None
    preprocessing: Preprocessing | None = None
    evaluation: dict | None = None  # epoch, step, top1, top5, num_samples
    # Calibration fitted on the val logits of these very weights: probabilities = softmax(logits / T).
    temperature: float | None = None

    def metadata(self) -> dict[str, str]:
        parts = {
            "config": self.config,
            "classes": self.classes,
            "fingerprint": self.fingerprint,
            "eval": self.evaluation,
            "temperature": self.temperature,
        }
        found = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in parts.items() if v}
        if self.preprocessing is not None:
            found["preprocessing"] = self.preprocessing.to_json()
        return found

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], where: str) -> WeightsInfo:
        def part(key: str):
            return json.loads(metadata[key]) if key in metadata else None

        preprocessing = metadata.get("preprocessing")
        return cls(
            config=part("config"),
            classes=part("classes"),
            fingerprint=metadata.get("fingerprint"),
            preprocessing=Preprocessing.from_json(preprocessing, f"the preprocessing in {where}")
            if preprocessing
            else None,
            evaluation=part("eval"),
            temperature=read_temperature(part("temperature"), where),
        )


def read_temperature(value, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RunDirError(f"{where} records a temperature of {value!r}, not a positive number — restore it from a copy")
    return float(value)


def weights_bytes(tensors: dict, info: WeightsInfo) -> bytes:
    """A safetensors file: plain weights that load with the model API alone, and what they are."""
    import safetensors.torch  # here: reading the run dir's other files needs no torch

    return safetensors.torch.save(tensors, metadata=info.metadata())


def read_weights_file(path: Path) -> tuple[dict, WeightsInfo]:
    """A .safetensors file's tensors and what it says of itself; safetensors' own errors pass on."""
    import safetensors
    import safetensors.torch

    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return safetensors.torch.load_file(str(path)), WeightsInfo.from_metadata(metadata, str(path))


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

    def lock(self, share: bool = False) -> str | None:
        """Takes the lock before anything is written; returns a note when the file system has no locks.
        A folder that holds files but no run of ours (someone's own config.yaml, report.md, ...) is
        refused unless ``share``: nothing of theirs is overwritten by accident."""
        foreign = [] if share else self.foreign_files()
        if foreign:
            shown = ", ".join(foreign[:4])
            raise RunDirError(
                f"run.dir {self.path} already holds files that are not a training run's ({shown}, ...) — choose "
                "another run.dir, or pass run.share_dir=true to use it anyway (files named as a run's are overwritten)"
            )
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

    def foreign_files(self) -> list[str]:
        """The names in a non-empty folder that no run of ours started in (no .lock, no status.json)."""
        if not self.path.is_dir() or (self.path / LOCK).exists() or (self.path / STATUS).exists():
            return []
        return sorted(p.name for p in self.path.iterdir())

    def file(self, name: str) -> Path:
        return self.path / name

    def prepare(self, config_yaml: str, classes: list[str], preprocessing: Preprocessing, resume: bool) -> Path | None:
        """The files a run starts with. Fails now, not after an epoch, when the run dir cannot take
        checkpoints; starting over (resume false) sets an earlier run's files aside, never deletes
        them. -> where they went (None: nothing was set aside)."""
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
        aside = None if resume else self.set_aside()
        (self.path / CONFIG).write_text(config_yaml)
        (self.path / CLASSES).write_text(json.dumps(classes, ensure_ascii=False, indent=1))
        (self.path / PREPROCESSING).write_text(preprocessing.to_json())
        return aside

    def set_aside(self) -> Path | None:
        """Starting over (train.resume=false): everything an earlier run wrote moves to
        replaced-<time>/ in the run dir, never deleted. -> that folder (None: there was nothing)."""
        found = [name for name in EARLIER_RUN if (self.path / name).exists()] + self.numbered_predictions()
        if not found:
            return None
        aside = self.path / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for name in found:
            os.replace(self.path / name, aside / name)
        return aside

    def numbered_predictions(self) -> list[str]:
        """predict's default CSVs after the first (predictions-2.csv, ...) that are here."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if LATER_PREDICTIONS.fullmatch(p.name))

    def keep_predictions(self, done: Path) -> Path:
        """A complete CSV moved to predict's default place: predictions.csv, then predictions-2.csv, ...,
        one past the highest there, so the newest has the highest number; an earlier one is never
        replaced. -> where it went."""
        taken = [1] if (self.path / PREDICTIONS).exists() else []
        taken += [int(LATER_PREDICTIONS.fullmatch(name)[1]) for name in self.numbered_predictions()]
        n = max(taken, default=0) + 1
        while not move_if_free(done, self.path / predictions_name(n)):
            n += 1
        return self.path / predictions_name(n)

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

    def read_json(self, name: str) -> dict | None:
        """A JSON object the run wrote (summary.json), or None when it is not there or not readable."""
        try:
            found = json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    def replace_text(self, name: str, text: str) -> None:
        """A file written whole and renamed into place: two writers (training's end and an evaluate)
        each leave a complete file, never a mix of both."""
        self.replace_bytes(name, text.encode("utf-8"))

    def replace_bytes(self, name: str, data: bytes) -> None:
        """A file written whole and renamed into place (see replace_text)."""
        path = self.path / name
        tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
        try:
            with writing(path):
                tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write_weights(self, alias: str, tensors: dict, info: WeightsInfo) -> Path:
        """best/final weights, atomically: a full disk leaves the previous file, never a partial one."""
        data = weights_bytes(tensors, info)
        path = self.path / WEIGHTS[alias]
        tmp = path.with_suffix(".tmp")
        try:
            with writing(path), open(tmp, "wb") as f:  # safetensors' own writer hides a full disk's errno
                f.write(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def read_config(self) -> tuple[dict, list[str]]:
        """config.yaml's values and classes.json: what the after-training commands build the model from."""
        if not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} not found — pass the run.dir of a training run")
        config_path, classes_path = self.path / CONFIG, self.path / CLASSES
        if not config_path.is_file() or not classes_path.is_file():
            raise RunDirError(
                f"{self.path} is not a run directory (no config.yaml or classes.json) — pass the run.dir of a training run"
            )
        try:
            values = yaml.safe_load(config_path.read_text(encoding="utf-8"))
            classes = json.loads(classes_path.read_text(encoding="utf-8"))
            if not isinstance(values, dict) or not isinstance(classes, list):
                raise ValueError("not a mapping and a list")
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise RunDirError(
                f"{self.path}/config.yaml or classes.json is damaged ({type(e).__name__}) — restore it from a copy of the run"
            ) from e
        return values, classes

    def preprocessing(self) -> Preprocessing:
        """preprocessing.json: for weights that do not carry their own (a training checkpoint, a .pth)."""
        path = self.path / PREPROCESSING
        try:
            text = path.read_text()
        except OSError as e:
            raise RunDirError(f"{path} is missing or unreadable — is {self.path} a training run directory?") from e
        return Preprocessing.from_json(text, str(path))

    def write_eval(
        self,
        name: str,
        record: dict,
        draw: Callable[[Path], None],
        figures: dict[str, Callable[[Path], None]] | None = None,
    ) -> tuple[Path, Path]:
        """eval/<name>.json and <name>.png (drawn by ``draw``), and <name><EVAL_FIGURES[key]> drawn by
        figures[key], each written as a .tmp and renamed, the record last: an interrupted evaluation
        leaves neither a .tmp nor a half file behind."""
        out = self.path / EVAL
        out.mkdir(parents=True, exist_ok=True)
        json_path, png_path = out / f"{name}.json", out / f"{name}.png"
        own = f"{os.getpid()}.tmp"  # a second evaluate of the same name writes its own
        json_tmp = out / f"{name}.json.{own}"
        pngs = {png_path: draw} | {out / f"{name}{EVAL_FIGURES[key]}": f for key, f in (figures or {}).items()}
        tmps = {path: path.with_name(f"{path.stem}.{own}.png") for path in pngs}  # savefig goes by the suffix
        try:
            json_tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            for path, drawing in pngs.items():
                drawing(tmps[path])
            for path, tmp in tmps.items():
                os.replace(tmp, path)
            os.replace(json_tmp, json_path)
        finally:
            json_tmp.unlink(missing_ok=True)
            for tmp in tmps.values():
                tmp.unlink(missing_ok=True)
        return json_path, png_path

    def evals(self) -> dict[str, dict]:
        """evaluate's records by output name (eval/<name>.json, sorted); one unreadable is left out."""
        found = {}
        for path in sorted((self.path / EVAL).glob("*.json")):
            record = self.read_json(f"{EVAL}/{path.name}")
            if record is not None and record.get("kind") == "eval":
                found[path.stem] = record
        return found

    def status(self) -> dict:
        """status.json as the last run left it ({} when there is none or it cannot be read)."""
        try:
            found = json.loads((self.path / STATUS).read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def set_status(self, state: str, reason: str | None = None) -> None:
        """completed (with the reason when it stopped early) | preempted | failed (with the one-line
        reason) | running, as indented JSON that `cat` shows whole. Replaced atomically; when the disk is
        full, rewritten in place instead: a status (its reason cut at 1000 characters) fits in the block
        the file already has, so needs no new one."""
        if not self.owned or (state != "running" and not self.started):
            return  # a run that never started leaves the status of the one before (a finished run stays so)
        self.started = True
        status = {"state": state, "time": time.time(), **({"reason": reason[:1000]} if reason else {})}
        if state == "running":
            status.update(host=socket.gethostname(), pid=os.getpid())
        data = (json.dumps(status, ensure_ascii=False, indent=1) + "\n").encode()
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
                    f.truncate()  # the end of a longer status written before
            except OSError:
                pass  # nothing more can be done: the one-line error still reaches the log


def move_if_free(done: Path, path: Path) -> bool:
    """done renamed to path unless a file is there (False: that one stays as it was). A hard link
    fails where the name is taken, where a rename would replace it: of two commands placing a file
    there at the same moment, one gets the name and the other learns it did not."""
    try:
        os.link(done, path)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):  # EPERM: a file system without hard links
            raise
        if path.exists():  # there, a look before the rename is the best one can do
            return False
        os.replace(done, path)
        return True
    done.unlink()
    return True


def predictions_name(n: int) -> str:
    """predict's n-th default CSV: predictions.csv, predictions-2.csv, ..."""
    return PREDICTIONS if n == 1 else PREDICTIONS.replace(".csv", f"-{n}.csv")


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
