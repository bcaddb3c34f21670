"""Parameter groups, the optimizer, warmup + cosine schedule and the weight EMA."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer.training.config import OptimConfig, ScheduleConfig


def resolved_scale(optim: OptimConfig) -> str:
    """linear or sqrt: `auto` is sqrt for the adaptive optimizers (adam, adamw), linear for sgd (as timm)."""
    if optim.lr_base_scale != "auto":
        return optim.lr_base_scale
    return "linear" if optim.name == "sgd" else "sqrt"


def lr_scale(optim: OptimConfig, global_batch: int) -> float:
    """What optim.lr is multiplied by for `global_batch` images per optimizer step (batch_size x
    processes x grad_accum): 1 with optim.lr_base_size None; with N, global_batch / N (linear) or
    its square root (sqrt)."""
    if optim.lr_base_size is None or global_batch == optim.lr_base_size:
        return 1.0
    ratio = global_batch / optim.lr_base_size
    return math.sqrt(ratio) if resolved_scale(optim) == "sqrt" else ratio


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """The lr for `global_batch` images per optimizer step: optim.lr per optim.lr_base_size images, if set."""
    return optim.lr * lr_scale(optim, global_batch)


def config_lr(optim: OptimConfig, global_batch: int, rate: float) -> float:
    """The optim.lr that gives `rate` at `global_batch` under the config's scaling rule (scaled_lr's inverse)."""
    return rate / lr_scale(optim, global_batch)


def describe_lr(optim: OptimConfig, global_batch: int) -> str:
    """For the start-up line: 'lr 0.05 (0.1 per 256 images, linear)', or 'lr 0.1' when used as given."""
    text = f"lr {scaled_lr(optim, global_batch):.6g}"
    if optim.lr_base_size is None:
        return text
    return f"{text} ({optim.lr:.6g} per {optim.lr_base_size} images, {resolved_scale(optim)})"


def param_groups(
    model: nn.Module, optim: OptimConfig, head: nn.Module | None = None, lr: float | None = None
) -> list[dict]:
    """Decay only conv/linear weights (never BN or biases); the head gets lr x head_lr_mult.

    lr: the resolved rate (`scaled_lr`); None: optim.lr as given."""
    lr = optim.lr if lr is None else lr
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    groups: dict[tuple[bool, bool], list] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1  # BN weights and all biases are 1-D
        groups.setdefault((decay, id(param) in head_ids), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": optim.weight_decay if decay else 0.0,
            "lr": lr * (optim.head_lr_mult if is_head else 1.0),
        }
        for (decay, is_head), params in sorted(groups.items())
    ]


def make_optimizer(groups: list[dict], optim: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """lr: the resolved rate, the default for groups without their own (param_groups sets each)."""
    lr = optim.lr if lr is None else lr
    # Fused: one kernel per step, and it can skip a non-finite step on the device (found_inf, see nonfinite.py).
    if optim.name == "sgd":
        sgd = torch.optim.SGD(
            groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov and optim.momentum > 0, fused=True
        )
        if optim.momentum > 0:  # fused SGD leaves a momentum buffer uninitialised when its first step is skipped;
            for group in sgd.param_groups:  # a zero buffer gives the same first step (0 x momentum + grad)
                for param in group["params"]:
                    sgd.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return sgd
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=tuple(optim.betas), fused=True)


def lr_factor(step: int, warmup_steps: int, total_steps: int, final_factor: float) -> float:
    """Linear warmup from 0 to 1, then cosine from 1 down to final_factor at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step; the factor multiplies each group's own base lr."""
    total = steps_per_epoch * epochs
    warmup = min(total, round(schedule.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, schedule.final_lr_factor)
    )


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of the weights (and BN buffers), evaluated in place of the model."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
