"""Parameter groups, the optimizer, warmup + cosine schedule and the weight EMA."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, optim: OptimConfig, head: nn.Module | None = None) -> list[dict]:
    """Decay only conv/linear weights (never BN or biases); the head gets lr x head_lr_mult."""
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
            "lr": optim.lr * (optim.head_lr_mult if is_head else 1.0),
        }
        for (decay, is_head), params in sorted(groups.items())
    ]


def make_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov and optim.momentum > 0)
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=optim.lr, betas=tuple(optim.betas))


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
