"""The configured model: config -> SE-DenseNet, initialised from model.pretrained when given (a
weights file, or torchvision's ImageNet weights: trainer/training/imagenet.py), the features frozen
and the memory format set as the config says. Training and the after-training commands both build
their model here."""

from __future__ import annotations

import pickle

import torch

from toolbox.cli import Console
from toolbox.errors import UserError, first_line
from trainer.training.config import IMAGENET, Config
from trainer.training.imagenet import imagenet_state_dict
from trainer.training.model import load_weights, se_densenet


def build_model(config: Config, num_classes: int, console: Console | None = None) -> torch.nn.Module:
    """The configured SE-DenseNet, initialised from model.pretrained when given (console says how)."""
    m = config.model
    model = se_densenet(
        m.depth,
        num_classes,
        growth_rate=m.growth_rate,
        num_init_features=m.num_init_features,
        bn_size=m.bn_size,
        compression=m.compression,
        drop_rate=m.drop_rate,
        se=m.se,
        se_reduction=m.se_reduction,
        efficient=m.efficient,
        small_inputs=m.small_inputs,
        block_config=tuple(m.block_config) if m.block_config else None,
        shared_bn=m.shared_bn,
    )
    if m.pretrained == IMAGENET:
        _load_imagenet(model, config, console or Console())
    elif m.pretrained:
        _load_pretrained(model, m.pretrained, console or Console())
    if m.freeze_features:
        model.features.requires_grad_(False)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _load_imagenet(model: torch.nn.Module, config: Config, console: Console) -> None:
    """torchvision's ImageNet weights for model.depth (config validation checked that their shapes
    fit). The head starts fresh even for 1000 classes (they are the user's, not ImageNet's), and
    so does the small stem's 3x3 conv0, which has no ImageNet counterpart."""
    depth, small = config.model.depth, bool(model.arch["small_inputs"])
    fresh = ("classifier.",) + (("features.conv0.", "features.norm0.") if small else ())
    state = {k: v for k, v in imagenet_state_dict(depth, console).items() if not k.startswith(fresh)}
    what = "new head" + (", SE" if config.model.se else "") + (", small stem" if small else "")
    _load_pretrained(model, f"torchvision's densenet{depth} ImageNet weights", console, state, what)
    if config.data.normalize != "imagenet":
        console.say(
            "note: the ImageNet weights saw inputs normalised with ImageNet's mean and std; "
            f"data.normalize={config.data.normalize} uses your train split's — data.normalize=imagenet matches them"
        )


def _load_pretrained(
    model: torch.nn.Module,
    path: str,
    console: Console,
    state: dict[str, torch.Tensor] | None = None,
    fresh: str = "new head or SE",
) -> None:
    """Loads `path` (or `state`, read from what `path` names) where it fits; `fresh`: what stays at init."""
    try:
        report = load_weights(model, path if state is None else state, strict=False)
    except Exception as e:  # missing, torn, another format, or a pickle holding more than tensors
        unpickling = isinstance(e, pickle.UnpicklingError)  # torch's advice is to trust the file: no
        reason = "not a weights file, or one holding more than tensors" if unpickling else first_line(e)
        raise UserError(
            f"model.pretrained {path} cannot be used ({reason}) — give a .pth or .safetensors DenseNet weights file"
        ) from e
    expected = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    loaded = len(expected) - len(report.missing)
    if loaded == 0:  # nothing matched: a wrong file, not a starting point
        raise UserError(f"model.pretrained {path} shares no weights with this model — give a DenseNet weights file")
    console.say(
        f"initialised from {path}: {loaded} tensors loaded, {len(report.missing)} left at init "
        f"({fresh}), {len(report.unexpected)} ignored"
    )
