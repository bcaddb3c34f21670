"""A trained model back from its run directory, for evaluate, predict and export.

The run directory says what to build (config.yaml, classes.json); `--checkpoint` says which
weights: best | final (the safetensors the trainer exports), last (the newest complete training
checkpoint) or a PATH (.safetensors, a ckpt-<step> folder, state.pt, .pt/.pth). Weights whose
fingerprint or classes are not this run's are refused, never half-loaded. Images are
preprocessed exactly as validation did during training: the preprocessing the weights file
carries (size, crop, the training normalisation), or the run's preprocessing.json for weights
that carry none (a training checkpoint, a .pth).
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from toolbox.errors import UserError, first_line
from trainer.rundir import CHECKPOINTS, WEIGHTS, Preprocessing, RunDir, WeightsInfo, read_weights_file
from trainer.training import checkpoint
from trainer.training.build import build_model
from trainer.training.config import Config, ConfigError, config_from_dict
from trainer.training.model import load_weights
from trainer.training.transforms import EvalPreset


@dataclass
class Trained:
    model: torch.nn.Module  # in eval mode, on the CPU
    config: Config
    classes: list[str]
    weights: Path  # the file the weights came from
    name: str  # best | final | last | the file's stem: names the outputs
    preprocessing: Preprocessing
    temperature: float | None = None  # fitted on val for these weights; None: the file records none

    def preset(self, letterbox: bool = False) -> EvalPreset:
        p = self.preprocessing
        return EvalPreset(p.image_size, p.crop_pct, p.mean, p.std, letterbox)


def load_trained(run_dir: str | Path, which: str = "best") -> Trained:
    run = RunDir(Path(run_dir))
    config, classes = read_run(run)
    path, name = resolve_weights(run.path, which)
    state, info = read_weights(path)
    model = build_model(config, len(classes))
    if info.fingerprint is not None and info.fingerprint != model.fingerprint():
        raise UserError(
            f"{path} holds another model ({info.fingerprint}; {run.path} is {model.fingerprint()}) — "
            "pass weights of this run, or the run directory they belong to"
        )
    if info.classes is not None and info.classes != classes:
        raise UserError(
            f"{path} was trained on other classes than {run.path}/classes.json — pass the run directory it belongs to"
        )
    try:
        load_weights(model, state, strict=True)
    except ValueError as e:  # a file without a fingerprint (a plain .pth) that does not fit
        raise UserError(
            f"{path} does not fit the model of {run.path} ({first_line(e)}) — pass weights of this run"
        ) from e
    preprocessing = info.preprocessing or run.preprocessing()
    return Trained(model.eval(), config, classes, path, name, preprocessing, info.temperature)


def read_run(run: RunDir) -> tuple[Config, list[str]]:
    values, classes = run.read_config()
    # Inference needs neither the starting weights nor the freezing, and the file may be gone by now.
    values.setdefault("model", {}).update(pretrained=None, freeze_features=False)
    try:
        config = config_from_dict(values)
    except ConfigError as e:
        raise UserError(f"{run.path}/config.yaml: {e} — restore the file from a copy of the run") from e
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise UserError(
            f"{run.path}/classes.json does not list 2 or more class names — restore it from a copy of the run"
        )
    return config, classes


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


def read_weights(path: Path) -> tuple[dict, WeightsInfo]:
    """(state dict, what the file says of itself: all None for a file that records nothing)."""
    if path.name == checkpoint.STATE and (path.parent / checkpoint.COMPLETE).is_file():
        return checkpoint_weights(checkpoint.read(path.parent)[0])  # checked against its checksums
    try:
        if path.suffix == ".safetensors":
            return read_weights_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:  # torn, truncated or foreign files fail in many ways; all mean "not usable weights"
        if isinstance(e, pickle.UnpicklingError):  # torch's message is advice about weights_only, not news
            reason = "not a PyTorch weights file, or one holding more than tensors"
        else:
            reason = first_line(e)
        raise UserError(f"{path} cannot be read as weights ({reason}) — pass another checkpoint") from e
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a state dict — pass a .safetensors, .pt or checkpoint folder")
    if "fingerprint" not in state:
        return state, WeightsInfo()
    return checkpoint_weights(state)


def checkpoint_weights(state: dict) -> tuple[dict, WeightsInfo]:
    """A training checkpoint's weights: with EMA on, the averaged ones, which the trainer evaluated."""
    weights = state.get("ema") or state["model"]
    weights = {k: v for k, v in weights.items() if k != "n_averaged"}
    return weights, WeightsInfo(classes=state.get("classes"), fingerprint=state["fingerprint"])
