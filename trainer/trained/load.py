"""A trained model back from its run directory, for evaluate, predict and export.

The run directory says what to build (config.yaml, classes.json); `--checkpoint` says which
weights: best | final (the safetensors the trainer exports), last (the newest complete training
checkpoint) or a PATH (.safetensors, a ckpt-<step> folder, state.pt, .pt/.pth). Weights whose
fingerprint or classes are not this run's are refused, never half-loaded. Images are
preprocessed exactly as validation did during training: the saved data config's size and crop,
and the training normalisation (the shards' mean/std or ImageNet's).
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset

from shards.format import SOURCE_EXTS, decode_rgb
from toolbox.errors import DataError, UserError, first_line
from trainer.rundir import CHECKPOINTS, CLASSES, CONFIG, PREPROCESSING, WEIGHTS
from trainer.training import checkpoint
from trainer.training.config import Config, config_from_dict, eval_size
from trainer.training.model import load_weights
from trainer.training.samples import Sample
from trainer.training.state import build_model
from trainer.training.transforms import EvalPreset


@dataclass
class Trained:
    model: torch.nn.Module  # in eval mode, on the CPU
    config: Config
    classes: list[str]
    weights: Path  # the file the weights came from
    name: str  # best | final | last | the file's stem: names the outputs
    mean: list[float]
    std: list[float]

    def preset(self, letterbox: bool = False) -> EvalPreset:
        data = self.config.data
        return EvalPreset(eval_size(data), data.crop_pct, self.mean, self.std, letterbox)

    def preprocessing(self, letterbox: bool = False) -> dict:
        """What a deployment must do to an image before the model (export writes it next to the model)."""
        data, size = self.config.data, eval_size(self.config.data)
        return {
            "image_size": size,
            "resize_short_side": None if letterbox else round(size / data.crop_pct),
            "crop_pct": data.crop_pct,
            "letterbox": letterbox,
            "steps": (
                "pad to a square with black, resize to image_size"
                if letterbox
                else "resize the short side to resize_short_side (bilinear, antialias), centre-crop image_size"
            )
            + "; RGB scaled to [0, 1]; subtract mean, divide by std; NCHW float32",
            "mean": self.mean,
            "std": self.std,
        }


def load_trained(run_dir: str | Path, which: str = "best") -> Trained:
    run_dir = Path(run_dir)
    config, classes = read_run(run_dir)
    path, name = resolve_weights(run_dir, which)
    state, fingerprint, weight_classes = read_weights(path)
    model = build_model(config, len(classes))
    if fingerprint is not None and fingerprint != model.fingerprint():
        raise UserError(
            f"{path} holds another model ({fingerprint}; {run_dir} is {model.fingerprint()}) — "
            "pass weights of this run, or the run directory they belong to"
        )
    if weight_classes is not None and weight_classes != classes:
        raise UserError(
            f"{path} was trained on other classes than {run_dir}/classes.json — pass the run directory it belongs to"
        )
    try:
        load_weights(model, state, strict=True)
    except ValueError as e:  # a file without a fingerprint (a plain .pth) that does not fit
        raise UserError(
            f"{path} does not fit the model of {run_dir} ({first_line(e)}) — pass weights of this run"
        ) from e
    mean, std = run_normalization(config, run_dir)
    return Trained(model.eval(), config, classes, path, name, mean, std)


def read_run(run_dir: Path) -> tuple[Config, list[str]]:
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found — pass the run.dir of a training run")
    config_path, classes_path = run_dir / CONFIG, run_dir / CLASSES
    if not config_path.is_file() or not classes_path.is_file():
        raise UserError(
            f"{run_dir} is not a run directory (no config.yaml or classes.json) — pass the run.dir of a training run"
        )
    try:
        values = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        classes = json.loads(classes_path.read_text(encoding="utf-8"))
        # Inference needs neither the starting weights nor the freezing, and the file may be gone by now.
        values.setdefault("model", {}).update(pretrained=None, freeze_features=False)
    except (OSError, ValueError, yaml.YAMLError, AttributeError) as e:
        raise UserError(
            f"{run_dir}/config.yaml or classes.json is damaged ({type(e).__name__}) — restore it from a copy of the run"
        ) from e
    return config_from_dict(values), classes


def resolve_weights(run_dir: Path, which: str) -> tuple[Path, str]:
    if which in WEIGHTS:
        path = run_dir / WEIGHTS[which]
        if not path.is_file():
            hint = "no evaluation has finished yet" if which == "best" else "training has not finished"
            raise UserError(f"{run_dir} has no {WEIGHTS[which]} ({hint}) — train further, or pass --checkpoint last")
        return path, which
    if which == "last":
        return newest_usable(run_dir) / checkpoint.STATE, "last"
    path = Path(which)
    if path.is_dir() and (path / checkpoint.STATE).is_file():
        path = path / checkpoint.STATE
    if not path.is_file():
        raise UserError(f"checkpoint {which} not found — pass best, last, final or the path of a weights file")
    return path, path.parent.name if path.name == checkpoint.STATE else path.stem


def newest_usable(run_dir: Path) -> Path:
    """The newest checkpoint whose files match their checksums; each damaged one is a note line."""
    found = checkpoint.complete_checkpoints(run_dir / CHECKPOINTS)
    if not found:
        raise UserError(
            f"{run_dir} has no complete checkpoint in checkpoints/ — train first, or pass --checkpoint best|final"
        )
    path, _, skipped = checkpoint.newest_usable(list(reversed(found)), checkpoint.read)
    if path is not None:
        for why in skipped:
            print(f"note: checkpoint {why} — skipped; using {path.name} instead", file=sys.stderr)
        return path
    raise UserError(
        f"no checkpoint in {run_dir / CHECKPOINTS} can be used ({'; '.join(skipped)}) — pass --checkpoint best|final"
    )


def read_weights(path: Path) -> tuple[dict, str | None, list[str] | None]:
    """(state dict, fingerprint, classes); the last two None when the file does not record them."""
    if path.name == checkpoint.STATE and (path.parent / checkpoint.COMPLETE).is_file():
        return checkpoint_weights(checkpoint.read(path.parent)[0])  # checked against its checksums
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            state = load_file(str(path))
            classes = json.loads(metadata["classes"]) if "classes" in metadata else None
            return state, metadata.get("fingerprint"), classes
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn, truncated or foreign files fail in many ways; all mean "not usable weights"
        if isinstance(e, pickle.UnpicklingError):  # torch's message is advice about weights_only, not news
            reason = "not a PyTorch weights file, or one holding more than tensors"
        else:
            reason = first_line(e)
        raise UserError(f"{path} cannot be read as weights ({reason}) — pass another checkpoint") from e
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a state dict — pass a .safetensors, .pt or checkpoint folder")
    if "fingerprint" not in state:
        return state, None, None
    return checkpoint_weights(state)


def checkpoint_weights(state: dict) -> tuple[dict, str | None, list[str] | None]:
    """A training checkpoint's weights: with EMA on, the averaged ones, which the trainer evaluated."""
    weights = state.get("ema") or state["model"]
    weights = {k: v for k, v in weights.items() if k != "n_averaged"}
    return weights, state["fingerprint"], state.get("classes")


def run_normalization(config: Config, run_dir: Path) -> tuple[list[float], list[float]]:
    """The mean/std training normalised with, saved in the run (no need for the training shards)."""
    path = run_dir / PREPROCESSING
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is missing or unreadable — is {run_dir} a training run directory?") from e
    return saved["mean"], saved["std"]


MAX_FILE_BYTES = 256 * 10**6  # an image larger than this is refused unread (predict: --max-file-size)
KINDS = {  # what a path is when it is not a regular file, as a row's error says it
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def read_image(path: Path, max_bytes: int = MAX_FILE_BYTES):
    """An 8-bit RGB image, or DataError naming the file and why it cannot be read."""
    data = read_file(path, max_bytes)
    try:
        return decode_rgb(data)
    except Exception as e:  # any decoder failure means the same to the user: this file is not usable
        if not data:
            reason = "empty file"
        elif isinstance(e, UnidentifiedImageError):  # its message holds a BytesIO repr, not news
            reason = "not an image, or a damaged header"
        else:
            reason = first_line(e)[:120]
        raise DataError(f"{path} cannot be read as an image ({reason})") from e


def read_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file (a symlink is followed) of at most ``max_bytes``. A FIFO, a
    device or a socket is refused before it is opened: reading one would hang or never end."""
    try:
        kind = special(os.stat(path).st_mode)
        if kind is None:  # a regular file, as far as stat saw; opened without blocking should it have changed since
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                info = os.fstat(f.fileno())
                kind = special(info.st_mode)
                data = f.read(max_bytes + 1) if kind is None and info.st_size <= max_bytes else b""
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e})") from e
    if kind is not None:
        raise DataError(f"{path} is {kind}, not a regular file: not read")
    if info.st_size > max_bytes or len(data) > max_bytes:
        raise DataError(f"{path} is larger than the file size limit of {max_bytes:,} bytes: not read")
    return data


def special(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    return None if stat.S_ISREG(mode) else KINDS.get(stat.S_IFMT(mode), "a special file")


def image_files(root: Path) -> list[Path]:
    """Image files under `root` by extension (any case), symlinks followed (each folder once, so
    a link to a parent is no endless walk), in a stable order."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            info = os.stat(folder)
        except OSError:  # gone since it was listed: as os.walk skips what it cannot list
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in sorted(files) if f.rsplit(".", 1)[-1].lower() in SOURCE_EXTS]
    return found


def labelled_images(root: Path, classes: list[str], split: str) -> list[tuple[Path, int]]:
    """ROOT/<class>/**/<image> (or ROOT/<split>/<class>/...), labelled by the run's class list."""
    if not root.is_dir():
        raise UserError(f"image folder {root} not found — pass a make_shards output or a folder of class folders")
    folders = subfolders(root)
    if {"train", "val"} <= set(folders) and not {"train", "val"} <= set(classes):  # a pre-split SRC
        root = root / split
        folders = subfolders(root)
    if not folders:
        raise UserError(f"{root} has no class folders — lay it out as {root}/<class>/<image>")
    if folders != sorted(classes):
        extra, missing = sorted(set(folders) - set(classes)), sorted(set(classes) - set(folders))
        raise UserError(
            f"the class folders of {root} differ from the run's classes (not in the run: {extra or 'none'}; "
            f"missing: {missing or 'none'}) — evaluate on a folder with exactly the run's {len(classes)} class folders"
        )
    items = []
    for label, name in enumerate(classes):
        files = image_files(root / name)
        if not files:
            raise UserError(
                f"class folder {root / name} has no images — add images of that class (every class of the run needs some)"
            )
        items += [(path, label) for path in files]
    return items


def subfolders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


class LabelledImages(Dataset):
    """Image files as ShardDataset's samples: (index, seed, size) -> (tensor, label, index), for EvalOrder."""

    def __init__(self, items: list[tuple[Path, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: tuple[int, int, None]):
        index = item[0]
        path, label = self.items[index]
        try:
            image = read_image(path)
        except DataError as e:
            raise DataError(f"{e} — remove or replace it (make_shards drops such files for you)") from e
        return Sample(self.transform(image), label, index)
