"""The one typed training config: dataclass defaults <- YAML file <- `section.key=value` overrides
(also written `--section.key=value` or `--section.key value`, as a wandb sweep agent passes them).

OmegaConf does the merging and type checking (unknown keys and wrong types are its errors);
`validate` adds the value ranges. Every problem becomes a `ConfigError` whose message is one line
naming the key and the fix, raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from toolbox.errors import UserError, first_line
from toolbox.redact import redact
from toolbox.sizes import parse_size

RUNS_ROOT = "RUNS_ROOT"  # the environment variable slurm/train.sh and sweep.sh also read (default: runs)


class ConfigError(UserError):
    """A config problem, phrased for the user in one line."""


IMAGENET = "imagenet"  # model.pretrained's reserved value: torchvision's ImageNet weights for model.depth
# The DenseNets torchvision has ImageNet weights for: depth -> (block_config, growth_rate,
# num_init_features), all with bn_size 4 and compression 0.5 (model.IMAGENET_DEPTHS, a test checks).
TORCHVISION_DENSENETS = {
    121: ([6, 12, 24, 16], 32, 64),
    161: ([6, 12, 36, 24], 48, 96),
    169: ([6, 12, 32, 32], 32, 64),
    201: ([6, 12, 48, 32], 32, 64),
}


@dataclass
class ModelConfig:
    depth: int = 121
    growth_rate: int | None = None  # None: the depth's default (32; 48 for 161)
    num_init_features: int | None = None
    block_config: list[int] | None = None  # overrides depth
    bn_size: int = 4
    compression: float = 0.5
    drop_rate: float = 0.0
    se: bool = True
    se_reduction: int = 16
    efficient: bool = False  # recompute each dense layer's concat-BN-ReLU in backward (about half the memory)
    shared_bn: bool = False  # compiled training: normalise each feature map once for all later layers
    # (the same function with less memory traffic; its GPU speed-up is not measured yet)
    small_inputs: bool | str = False  # CIFAR-style stem: conv3x3 stride 1, no maxpool; auto: by image size
    pretrained: str | None = None  # local weights file (torchvision's or ours) to start from, or imagenet:
    # torchvision's ImageNet weights for model.depth (trainer/training/imagenet.py; the head and SE start fresh)
    freeze_features: bool = False  # train only the classifier (with `pretrained`)


@dataclass
class DataConfig:
    shards: str = MISSING  # make_shards OUT: a folder, or s3://bucket/prefix, gs://..., http(s)://..., pipe:CMD
    cache_dir: str | None = None  # node-local folder for fetched shards (default: $SLURM_TMPDIR, else $TMPDIR,
    # else the system's temp dir); set it for a local OUT too to stage shards off a slow NFS
    cache_limit: str | None = None  # e.g. 500MB, 40GB; None: no limit (at least 4x the largest shard)
    fetch_retries: int = 5  # attempts after a transient store error, with backoff (1 s, 2 s, 4 s, ... 30 s)
    allow_pipe: bool = False  # data.shards=pipe:CMD runs a shell command per file; off unless set
    image_size: int | str = 224  # train crop side (the val crop's too, unless val_size is set); auto: from
    # the shards (their images' median shorter side, rounded to data.size_step; trainer/training/sizing.py)
    val_size: int | None = None  # val crop side: evaluations, evaluate, predict, export; None: image_size
    crop_pct: float = 0.875  # val: resize to val_size / crop_pct, then centre crop
    # Progressive resizing (FFCV's ramp): the train crop grows from min_size to image_size between
    # epochs ramp_epochs[0] and ramp_epochs[1] (0-based), in steps of size_step; None: off.
    min_size: int | None = None
    ramp_epochs: list[int] | None = None  # [start, end]; None: [0, 80% of train.epochs]
    size_step: int = 32
    aug_repeats: int = 1  # each epoch shows every sample this many times, differently augmented (DeiT)
    normalize: str = "manifest"  # manifest (the train split's mean/std) | imagenet
    workers: int = 4  # loader processes per rank
    decode: str = "workers"  # workers (PIL, in the loader processes) | device (JPEGs in batches on the GPU)
    jpeg_draft: bool = True  # workers: decode big JPEGs at 1/2-1/8 scale when the random crop still fits
    scale_min: float = 0.08  # random resized crop area range [scale_min, 1]
    hflip: float = 0.5
    color_jitter: float = 0.0
    rotation: float = 0.0  # degrees
    auto_augment: str = "none"  # none | randaugment | trivialaugment
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    balance: str = "none"  # none | sampler (class-balanced draws) | loss (class-weighted loss)
    skip_bad_samples: bool = False  # count and skip undecodable samples instead of stopping
    verify: str = "size"  # size | sha256: local shards against the manifest before training (BENCHMARKS.md: cost)
    # k-fold (trainer/training/folds.py): folds=K >= 2 trains on the train split minus fold `fold`
    # (0..K-1) and validates on that fold, not on the val split; 0: off. fold_seed shuffles the
    # folds: keep it the same for the K runs of one set (train.seed may differ between them).
    folds: int = 0
    fold: int = 0
    fold_seed: int = 0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3  # with lr_base_size None: the lr for whatever global batch results
    lr_base_size: int | None = None  # N: lr is the rate for N images per optimizer step, scaled to the
    # global batch (train.batch_size x processes x grad_accum); None: lr is used as given
    lr_base_scale: str = "auto"  # auto (sqrt for adam/adamw, linear for sgd) | linear | sqrt
    weight_decay: float = 0.05  # never applied to BN weights and biases
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw
    head_lr_mult: float = 1.0  # classifier lr = lr x this (10 is common when fine-tuning)
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off


@dataclass
class ScheduleConfig:
    warmup_epochs: float = 0.0  # linear warmup from 0, stepped per optimizer step
    final_lr_factor: float = 0.01  # cosine decays to lr x this


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # per process
    grad_accum: int = 1
    # None: what `accelerate launch` chose (its --mixed_precision / --dynamo_backend, or `accelerate
    # config`), else no / none; a value set here wins over the launcher. config.yaml keeps what ran.
    mixed_precision: str | None = None  # no | bf16 | fp16
    device: str = "auto"  # auto (GPU if there is one) | cpu | cuda (fail if there is none)
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms (bitwise resume on CPU)
    ema: bool = False
    ema_decay: float = 0.9998
    channels_last: bool = False
    compile: str | None = None  # none | default | reduce-overhead | max-autotune (inductor); None: as above
    eval_every: int = 1  # epochs
    eval_tta: str = "none"  # none | flip (each val image and its mirror, softmax averaged)
    # Early stopping (trainer/training/early_stop.py): end the run once early_stop_metric has not
    # improved by more than early_stop_min_delta for early_stop_patience evaluations; 0 = off.
    early_stop_patience: int = 0  # evaluations (one every eval_every epochs), not epochs
    early_stop_metric: str = "top1"  # top1 (val top-1, higher is better) | loss (val loss, lower is better)
    early_stop_min_delta: float = 0.0  # an improvement must exceed this (top-1 as a fraction: 0.001 = 0.1%)
    log_every: int = 50  # optimizer steps between train records
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at epoch end only
    keep_checkpoints: int = 3
    resume: bool = True  # continue from the newest complete checkpoint in run.dir
    resume_on_new_data: bool = False  # resume although the shards' manifest changed (recorded in metrics.jsonl)
    max_bad_steps: int = 20  # non-finite steps in a row (each skipped) before the run stops as failed
    collective_timeout_s: int = 600  # a rank that does not answer for this long stops the job (a frozen node)


@dataclass
class RunConfig:
    dir: str = MISSING  # everything the run writes goes here
    name: str | None = None  # defaults to the run dir's name
    share_dir: bool = False  # run in a folder that holds files of something other than a run (never by default)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (sync later with `wandb sync`) | online | disabled
    project: str = "se-densenet"
    entity: str | None = None
    name: str | None = None  # defaults to run.name
    group: str | None = None
    id: str | None = None  # defaults to one derived from run.dir, so a resume is one run (config.yaml has it)
    tags: list[str] = field(default_factory=list)
    sample_predictions: int = 32  # rows of the validation predictions table
    log_model: bool = True  # best and final weights (and the export) as wandb model artifacts


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES = {
    "data.normalize": ("manifest", "imagenet"),
    "data.decode": ("workers", "device"),
    "data.verify": ("size", "sha256"),
    "data.auto_augment": ("none", "randaugment", "trivialaugment"),
    "data.balance": ("none", "sampler", "loss"),
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.lr_base_scale": ("auto", "linear", "sqrt"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.compile": ("none", "default", "reduce-overhead", "max-autotune"),
    "train.eval_tta": ("none", "flip"),
    "train.early_stop_metric": ("top1", "loss"),
    "wandb.mode": ("offline", "online", "disabled"),
}
LAUNCHER_DEFERRED = ("train.mixed_precision", "train.compile")  # None: `accelerate launch` decides (resolve_launch)
AUTO = "auto"
# Keys that may say `auto`: trainer/training/sizing.py settles them from the shards before the run starts.
FROM_THE_DATA = {"data.image_size": "a side in pixels, e.g. 224", "model.small_inputs": "true or false"}

MAX_SIDE = 4096  # pixels: a typo's 100000 would allocate gigabytes per image
# key -> (lowest, highest, whether the lowest itself is allowed). Sizes and counts have a ceiling, so
# that no typo allocates in proportion to itself; every float must be finite besides (validate).
RANGES = {
    "model.depth": (1, 1000, True),
    "model.growth_rate": (1, 1024, True),
    "model.num_init_features": (1, 4096, True),
    "model.bn_size": (1, 64, True),
    "model.compression": (0.0, 1.0, False),
    "model.drop_rate": (0.0, 1.0, True),
    "model.se_reduction": (1, 1024, True),
    "data.image_size": (8, MAX_SIDE, True),
    "data.val_size": (8, MAX_SIDE, True),
    "data.min_size": (8, MAX_SIDE, True),
    "data.size_step": (1, MAX_SIDE, True),
    "data.aug_repeats": (1, 64, True),
    "data.crop_pct": (0.0, 1.0, False),
    "data.workers": (0, 256, True),
    "data.fetch_retries": (0, 100, True),
    "data.scale_min": (0.0, 1.0, False),
    "data.hflip": (0.0, 1.0, True),
    "data.color_jitter": (0.0, math.inf, True),
    "data.rotation": (0.0, 180.0, True),
    "data.mixup_alpha": (0.0, math.inf, True),
    "data.cutmix_alpha": (0.0, math.inf, True),
    "optim.lr": (0.0, math.inf, False),
    "optim.lr_base_size": (1, 2**24, True),
    "optim.weight_decay": (0.0, math.inf, True),
    "optim.momentum": (0.0, 1.0, True),
    "optim.head_lr_mult": (0.0, math.inf, False),
    "optim.label_smoothing": (0.0, 1.0, True),
    "optim.grad_clip": (0.0, math.inf, True),
    "schedule.warmup_epochs": (0.0, math.inf, True),
    "schedule.final_lr_factor": (0.0, 1.0, True),
    "train.epochs": (1, 100_000, True),
    "train.batch_size": (1, 2**16, True),
    "train.grad_accum": (1, 2**12, True),
    "train.ema_decay": (0.0, 1.0, False),
    "train.eval_every": (1, 100_000, True),
    "train.early_stop_patience": (0, 100_000, True),
    "train.early_stop_min_delta": (0.0, math.inf, True),
    "train.log_every": (1, math.inf, True),
    "train.checkpoint_every": (0, math.inf, True),
    "train.keep_checkpoints": (1, 1000, True),
    "train.max_bad_steps": (1, 10**6, True),
    "train.collective_timeout_s": (1, 7 * 24 * 3600, True),
    "wandb.sample_predictions": (0, 10_000, True),
}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides (any form `normalize_overrides` takes), validated.
    Raises ConfigError (one line)."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if path is not None:
        layers.append(_load_yaml(Path(path)))
    layers.append(_parse_overrides(overrides))
    try:
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None
    validate(config)
    if config.wandb.id is None:  # resolved and saved, so trainer.export and a fetched model find the run
        config.wandb.id = wandb_id(config.run.dir)
    return config


def wandb_id(run_dir: str | Path) -> str:
    """Stable per run directory, so a resumed or requeued run continues the same wandb run."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def config_from_dict(values: dict) -> Config:
    """A resolved config saved with a run (config.yaml, checkpoints, safetensors metadata)."""
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), values))
    except OmegaConfBaseException as e:
        raise ConfigError(f"saved config does not fit this version's schema: {_explain(e)}") from None
    validate(config)
    return config


def _load_yaml(path: Path):
    if not path.is_file():
        raise ConfigError(f"config file {path} not found — pass an existing YAML file, e.g. configs/demo.yaml")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml's scanner errors span several lines
        raise ConfigError(f"config file {path} is not valid YAML ({first_line(e)}) — fix the file") from e
    if not isinstance(loaded, type(OmegaConf.create({}))):
        raise ConfigError(f"config file {path} must be a mapping of sections (model:, data:, ...)")
    return loaded


# wandb's own config key: a requeued sweep run is started with `--_wandb={...}` (wandb#4237)
WANDB_OWN_KEY = "_wandb"


def normalize_overrides(args: Sequence[str]) -> list[str]:
    """`section.key=value`, `--section.key=value` and `--section.key value` -> `section.key=value`,
    in order, so a wandb sweep's `${args}`, `${args_no_hyphens}` and `${args_no_equals}` all work;
    wandb's own `_wandb` key is dropped, and its `None` (a sweep value of null) read as null.
    Anything else is left for `_parse_overrides` to reject."""
    args, out = list(args), []
    while args:
        item = args.pop(0)
        if item.startswith("--"):
            key, sep, _ = item[2:].partition("=")
            if sep:
                item = item[2:]
            # the next word is the value even if it starts with "-" (-0.1), unless it is a flag itself
            elif ("." in key or key == WANDB_OWN_KEY) and args and not args[0].startswith("--"):
                item = f"{key}={args.pop(0)}"
        key, sep, value = item.partition("=")
        if sep and value == "None":  # wandb writes a sweep's YAML null as Python's None
            item = f"{key}=null"
        if key.lstrip("-").split(".")[0] != WANDB_OWN_KEY:
            out.append(item)
    return out


def _parse_overrides(overrides: Sequence[str]):
    overrides = normalize_overrides(overrides)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(
                f"override '{item}' must look like section.key=value (or --section.key=value, --section.key value), "
                "e.g. optim.lr=0.1"
            )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides: {first_line(e)}") from e


def _explain(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = first_line(e)
    if isinstance(e, MissingMandatoryValue):
        return f"{key} is required — set it in the YAML file or pass {key}=VALUE"
    if "Key" in type(e).__name__ or "not in" in msg:
        return _unknown_key(key)
    if key:
        expected = _field_type(key)
        return f"{key}: {msg} — give a value of type {expected}"
    return msg


def _unknown_key(key: str) -> str:
    known = all_keys() if "." in key else [f.name for f in fields(Config)]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close and "." in key:  # a misspelt section: compare the leaf name across sections
        leaf = key.rsplit(".", 1)[1]
        close = [k for k in known if k.endswith("." + leaf)][:1]
    hint = f"did you mean '{close[0]}'?" if close else "see configs/ or trainer/training/config.py for the keys"
    return f"unknown config key '{key}' — {hint}"


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        if is_dataclass(f.default_factory):
            keys += all_keys(f.default_factory, name + ".")
        else:
            keys.append(name)
    return keys


def _field_type(key: str) -> str:
    section, _, leaf = key.partition(".")
    section_cls = {f.name: f.default_factory for f in fields(Config)}.get(section)
    for f in fields(section_cls) if section_cls else ():
        if f.name == leaf:
            return str(f.type)
    return "the documented type"


def validate(config: Config) -> None:
    if config.train.mixed_precision in ("False", "false"):  # YAML reads a bare `no` as false
        config.train.mixed_precision = "no"
    for key in ("data.shards", "run.dir"):
        if _get(config, key) in (None, ""):
            raise ConfigError(f"{key} is required — set it in the YAML file or pass {key}=PATH")
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value is None and key in LAUNCHER_DEFERRED:
            continue
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key in all_keys():
        value = _get(config, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"{key}={value} is not a finite number — give a number, e.g. the default in trainer/training/config.py"
            )
    for key, expected in FROM_THE_DATA.items():
        value = _get(config, key)
        if isinstance(value, str) and value != AUTO:
            raise ConfigError(f"{key}={value!r} is neither {expected} nor auto (chosen from the shards)")
    for key, (low, high, low_ok) in RANGES.items():
        value = _get(config, key)
        if value is None or value == AUTO:
            continue
        if value < low or (value == low and not low_ok) or value > high:
            bound = f"{'>=' if low_ok else '>'} {low}" + ("" if high == math.inf else f" and <= {high}")
            raise ConfigError(f"{key}={value} is out of range — it must be {bound}")
    blocks = config.model.block_config
    if blocks is not None and not (0 < len(blocks) <= 8 and all(1 <= n <= 1000 for n in blocks)):
        raise ConfigError("model.block_config must list 1 to 8 layer counts from 1 to 1000, e.g. [6,12,24,16]")
    if len(config.optim.betas) != 2 or not all(0 <= b < 1 for b in config.optim.betas):
        raise ConfigError("optim.betas must be two numbers in [0, 1), e.g. [0.9,0.999]")
    _validate_ramp(config)
    _validate_folds(config.data)
    if config.data.cache_limit is not None:
        try:
            parse_size(config.data.cache_limit)
        except ValueError as e:
            raise ConfigError(f"data.cache_limit: {e}") from None
    _validate_pretrained(config.model)


def _validate_folds(data: DataConfig) -> None:
    if data.folds == 0:
        if data.fold != 0:
            raise ConfigError(f"data.fold={data.fold} needs data.folds=K (the number of folds, at least 2)")
        return
    if data.folds < 2:
        raise ConfigError(
            f"data.folds={data.folds}: k-fold needs at least 2 folds — set data.folds=K >= 2, or 0 for off"
        )
    if not 0 <= data.fold < data.folds:
        raise ConfigError(
            f"data.fold={data.fold} is not a fold of data.folds={data.folds} — pick 0 to {data.folds - 1}"
        )


def _validate_pretrained(model: ModelConfig) -> None:
    if model.freeze_features and not model.pretrained:
        raise ConfigError("model.freeze_features needs model.pretrained=imagenet or =PATH (weights to start from)")
    if model.pretrained == IMAGENET:
        _validate_imagenet(model)
    elif model.pretrained and not Path(model.pretrained).is_file():
        raise ConfigError(
            f"model.pretrained file {model.pretrained} not found — give a local weights file, or imagenet "
            "(torchvision's ImageNet weights)"
        )


def _validate_imagenet(model: ModelConfig) -> None:
    """torchvision ships the depth, and every setting that shapes the loaded tensors is torchvision's
    (the small stem is allowed: its conv0 starts fresh, as the head and SE do)."""
    shipped = TORCHVISION_DENSENETS.get(model.depth)
    if shipped is None:
        depths = ", ".join(map(str, TORCHVISION_DENSENETS))
        raise ConfigError(
            f"model.pretrained=imagenet: torchvision has ImageNet weights for model.depth {depths}, not "
            f"{model.depth} — set one of those depths, or give model.pretrained a weights file for this model"
        )
    blocks, growth, init = shipped
    for key, theirs, ours in (
        ("block_config", blocks, model.block_config),
        ("growth_rate", growth, model.growth_rate),
        ("num_init_features", init, model.num_init_features),
        ("bn_size", 4, model.bn_size),
        ("compression", 0.5, model.compression),
    ):
        if ours is not None and ours != theirs:
            raise ConfigError(
                f"model.pretrained=imagenet loads torchvision's densenet{model.depth}, whose model.{key} is {theirs}, "
                f"not {ours} — leave model.{key} at its default, or drop model.pretrained"
            )


def _validate_ramp(config: Config) -> None:
    data, epochs = config.data, config.train.epochs
    if data.min_size is None or data.image_size == AUTO:  # checked again once the size is settled
        return
    if data.min_size > data.image_size:
        raise ConfigError(
            f"data.min_size={data.min_size} is above data.image_size={data.image_size} — the ramp grows to image_size"
        )
    ramp = ramp_epochs(data, epochs)
    if len(ramp) != 2 or not 0 <= ramp[0] <= ramp[1]:
        raise ConfigError(f"data.ramp_epochs must be [start, end] with 0 <= start <= end (epochs, 0-based), not {ramp}")
    if ramp[1] > epochs:
        raise ConfigError(
            f"data.ramp_epochs ends at epoch {ramp[1]}, after the run's {epochs} epochs — end it by train.epochs"
        )


def ramp_epochs(data: DataConfig, epochs: int) -> list[int]:
    """data.ramp_epochs, or its default: from the first epoch to 80% of the run (the rest at full size)."""
    return list(data.ramp_epochs) if data.ramp_epochs is not None else [0, int(0.8 * epochs)]


def train_size(data: DataConfig, epoch: int, epochs: int) -> int:
    """The train crop side in epoch `epoch` (0-based), a function of the epoch alone: min_size up to
    the ramp's start, image_size from its end, between them linear, rounded to a multiple of
    size_step (FFCV's get_resolution)."""
    if data.min_size is None:
        return data.image_size
    start, end = ramp_epochs(data, epochs)
    if epoch <= start:
        return data.min_size
    if epoch >= end:
        return data.image_size
    size = data.min_size + (data.image_size - data.min_size) * (epoch - start) / (end - start)
    return min(max(round(size / data.size_step) * data.size_step, data.min_size), data.image_size)


def train_sizes(config: Config) -> list[int]:
    """The train crop side of every epoch of the run, in order."""
    return [train_size(config.data, epoch, config.train.epochs) for epoch in range(config.train.epochs)]


def eval_size(data: DataConfig) -> int:
    """The val crop side: data.val_size, else data.image_size."""
    return data.val_size or data.image_size


def _get(config: Config, key: str) -> Any:
    section, leaf = key.split(".")
    return getattr(getattr(config, section), leaf)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(config)))


def to_dict(config: Config) -> dict:
    """The config as saved with the run (config.yaml, checkpoints, weights, wandb): a data
    location's secrets (a URL's query string or user info) are left out."""
    values = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    values["data"]["shards"] = redact(values["data"]["shards"])
    return values


def join_agent_sweep(config: Config, environ=os.environ) -> tuple[Config, str | None]:
    """The config of a run `wandb agent` started (WANDB_SWEEP_ID and WANDB_RUN_ID set), with a
    note to print; the config as it is otherwise. The agent's run id wins over the one derived
    from run.dir, and the run gets RUNS_ROOT/<sweep id>/<run id> as its dir: every run the agent
    starts has the same command line, so the config's run.dir would be shared by all of them."""
    sweep_id, run_id = environ.get("WANDB_SWEEP_ID"), environ.get("WANDB_RUN_ID")
    if not sweep_id or not run_id:
        return config, None
    if config.wandb.mode == "offline":
        raise UserError(
            f"wandb.mode=offline cannot join wandb sweep {sweep_id}: an offline run reaches no sweep — use "
            "wandb.mode=online under `wandb agent`, or run the sweep without a server as a Slurm array (slurm/sweep.sh)"
        )
    run_dir = Path(environ.get(RUNS_ROOT) or "runs").resolve() / sweep_id / run_id
    wandb = dataclasses.replace(config.wandb, id=run_id)
    run = dataclasses.replace(config.run, dir=str(run_dir))
    note = f"wandb sweep {sweep_id}, run {run_id}: run.dir {run_dir}"
    if config.wandb.mode == "disabled":
        note += " (wandb.mode=disabled: the results go to the run dir only, not to the sweep)"
    return dataclasses.replace(config, wandb=wandb, run=run), note
