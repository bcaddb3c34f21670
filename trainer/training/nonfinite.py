"""Non-finite steps: found on the device, skipped without a host sync, fatal when they persist.

A step whose gradients hold a NaN or an inf changes nothing, as the fp16 loss scaler does it:
the fused optimizer skips the update through its `found_inf` input, the BN running statistics
that the step's forward passes moved are put back, and the EMA stands still. The verdict is
taken on the all-reduced gradients, so every rank reaches the same one. The count of such steps
in a row is read only where the loop already stops to agree with the other ranks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from toolbox.errors import EXIT_FAILURE, UserError


class NonFiniteError(UserError):
    """The run cannot go on, or would write a non-finite value: a failure (exit 1), not a usage error."""

    exit_code = EXIT_FAILURE


ADVICE = "lower optim.lr, set optim.grad_clip (e.g. 1.0), or train in bf16 rather than fp16"


class StepGuard:
    """Wraps each optimizer step of the loop: start() before its first forward pass, check() before
    optimizer.step(); the verdict goes to the fused optimizer and comes back for the EMA."""

    def __init__(self, model: nn.Module, optimizer, accelerator, grad_clip: float, streak: int = 0):
        self.optimizer, self.accelerator, self.grad_clip = optimizer, accelerator, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers: dict[torch.dtype, list[torch.Tensor]] = {}  # BN statistics and batch counters, by dtype
        for buffer in model.buffers():
            self.buffers.setdefault(buffer.dtype, []).append(buffer.detach())
        device = accelerator.device
        self.streak = torch.tensor(float(streak), device=device)  # non-finite steps in a row
        self.skipped = torch.zeros((), device=device)  # since the last train record
        self.loss = torch.zeros((), device=device)  # the step's last micro-batch loss, for the error line
        self.saved: dict[torch.dtype, torch.Tensor] = {}

    def start(self) -> None:
        """Before the step's first forward pass: keep the BN statistics it is about to move."""
        self.saved = {dtype: _flat(buffers) for dtype, buffers in self.buffers.items()}

    def check(self, loss: torch.Tensor) -> torch.Tensor:
        """After the step's backward passes and before optimizer.step(): clips the gradients
        (optim.grad_clip) and returns the 0-dim verdict `good`, on the device."""
        if self.grad_clip > 0:  # unscales fp16 gradients first
            norm = self.accelerator.clip_grad_norm_(self.params, self.grad_clip)
        else:
            self.accelerator.unscale_gradients()
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        bad = ~torch.isfinite(norm)
        for dtype, buffers in self.buffers.items():  # a few kernels, however many BN layers
            kept = torch.where(bad, self.saved[dtype], _flat(buffers)).split([b.numel() for b in buffers])
            torch._foreach_copy_(buffers, [k.view_as(b) for k, b in zip(kept, buffers)])
        if self.accelerator.scaler is None:  # under fp16 the loss scaler passes its own found_inf
            self.optimizer.optimizer.found_inf = bad.float()
        self.streak = (self.streak + 1) * bad
        self.skipped += bad
        self.loss = loss.detach().float()
        return ~bad

    def take_skipped(self) -> torch.Tensor:
        skipped, self.skipped = self.skipped, torch.zeros_like(self.skipped)
        return skipped

    def fail_if_stuck(self, streak: int, limit: int, step: int) -> None:
        """streak: as agreed by the ranks (the same on all of them)."""
        if streak >= limit:
            raise NonFiniteError(
                f"{streak} optimizer steps in a row had a non-finite loss or gradient (step {step}, loss "
                f"{self.loss.item():g}) — {ADVICE}"
            )


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def update_ema(ema: AveragedModel, model: nn.Module, decay: float, good: torch.Tensor) -> None:
    """ema += w (model - ema): w = 1 on the first update (a copy), 1 - decay after, 0 for a skipped
    step. On the device, unlike AveragedModel.update_parameters, which reads n_averaged on the host.
    Integer buffers (BN's batch counters) are not averaged: nothing reads them."""
    pairs = [
        (a, m)
        for a, m in zip([*ema.module.parameters(), *ema.module.buffers()], [*model.parameters(), *model.buffers()])
        if a.is_floating_point()
    ]
    averaged, current = [a.detach() for a, _ in pairs], [m.detach() for _, m in pairs]
    weight = torch.where(ema.n_averaged == 0, 1.0, 1.0 - decay).to(averaged[0].dtype) * good
    deltas = torch._foreach_sub(current, averaged)
    torch._foreach_mul_(deltas, weight)
    torch._foreach_add_(averaged, deltas)
    ema.n_averaged += good.long()


def nonfinite_names(tensors: dict, prefix: str = "") -> list[str]:
    """The names of the floating tensors in a (nested) state dict that hold a NaN or an inf: one host sync."""
    found = list(_floats(tensors, prefix))
    if not found:
        return []
    flags = torch.stack([torch.isfinite(t).all() for _, t in found]).cpu()
    return [name for (name, _), ok in zip(found, flags.tolist()) if not ok]


def _floats(value, name: str):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield name, value.detach()
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _floats(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _floats(item, f"{name}.{i}")
    elif isinstance(value, float) and not math.isfinite(value):
        yield name, torch.tensor(value)


def assert_finite(tensors: dict, what: str, step: int) -> None:
    """Nothing non-finite is ever written: a checkpoint or weights file that would hold one is not."""
    bad = nonfinite_names(tensors)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteError(
            f"the {what} at step {step} hold non-finite values ({bad[0]}{more}), so they were not written — {ADVICE}"
        )
