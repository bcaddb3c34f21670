"""One pass of a model over a split, as training's evaluations and `trainer.evaluate` both make it:
each rank sums over its share of the samples and the sums are all-reduced, so every sample is
counted exactly once and N processes give exactly one process's numbers."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator

from toolbox.cli import Console, progress_bar
from toolbox.progress import Clock, CountLines, lines_wanted
from trainer.training.metrics import EvalSums, ShownSamples, predict_logits
from trainer.training.runtime import sum_across


@torch.no_grad()
def evaluate(
    model,
    loader,
    num_classes: int,
    accelerator: Accelerator,
    sample_rows: int = 0,
    tta: str = "none",
    clock: Clock = time.monotonic,
):
    """Sums over this rank's share of the split, all-reduced: every sample counted exactly once, or
    counted as skipped when it cannot be read and data.skip_bad_samples is on. tta=flip: each
    image's softmax averaged with its mirror's. A log file gets progress lines over a long split."""
    model.eval()
    sums = EvalSums.zeros(num_classes, accelerator.device)
    shown = ShownSamples(sample_rows)
    main = accelerator.is_main_process
    total = len(getattr(loader, "dataset", ()))  # 0 (no lines) for a plain list of batches
    lines = CountLines("eval", total, Console(main).say, main and lines_wanted(), clock)
    done = 0
    for images, labels, _, bad in progress_bar(loader, len(loader), "eval", main):
        lines.update(done * accelerator.num_processes)  # the batches before this one; the ranks read equal shares
        done += len(labels) + bad
        sums.skipped += bad
        if not len(labels):  # every sample of the batch was unreadable and skipped
            continue
        images = images.to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = predict_logits(model, images, tta)
        sums.add(logits, labels)
        shown.add(images, logits.softmax(1), labels)
    return EvalSums(*[sum_across(t, accelerator) for t in sums.tensors()]), shown
