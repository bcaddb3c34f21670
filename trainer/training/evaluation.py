"""One pass of a model over a split, as training's evaluations and `trainer.evaluate` both make it:
each rank sums over its share of the samples and the sums are all-reduced, so every sample is
counted exactly once and N processes give exactly one process's numbers."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from toolbox.cli import Console, progress_bar
from toolbox.progress import CountLines, lines_wanted
from trainer.training.metrics import EvalSums, ShownSamples, TopLosses, pictures, predict_logits
from trainer.training.runtime import gather_to_main, sum_across


class SplitLogits:
    """This rank's logits and labels, kept on the CPU with each sample's index in the split, for
    the calibration: gathered to the main process in the split's order, so what is computed from
    them is the same whatever the number of processes."""

    def __init__(self):
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        self.parts.append((indices.cpu(), logits.detach().float().cpu(), labels.cpu()))

    def gathered(self, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits [n, C], labels [n]) of the whole split by index on the main process; None on the others."""
        parts = gather_to_main(self.parts, accelerator)
        if not accelerator.is_main_process:
            return None
        if not parts:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        indices, logits, labels = (torch.cat(column) for column in zip(*parts))
        order = indices.argsort()
        return logits[order], labels[order]


@torch.no_grad()
def evaluate(
    model,
    loader,
    num_classes: int,
    accelerator: Accelerator,
    sample_rows: int = 0,
    tta: str = "none",
    logits_out: SplitLogits | None = None,
    worst: TopLosses | None = None,
):
    """Sums over this rank's share of the split, all-reduced: every sample counted exactly once, or
    counted as skipped when it cannot be read and data.skip_bad_samples is on. tta=flip: each
    image's softmax averaged with its mirror's. A log file gets progress lines over a long split.
    logits_out keeps every logit for the calibration; worst the highest-loss wrong predictions."""
    model.eval()
    sums = EvalSums.zeros(num_classes, accelerator.device)
    shown = ShownSamples(sample_rows)
    main = accelerator.is_main_process
    total = len(getattr(loader, "dataset", ()))  # 0 (no lines) for a plain list of batches
    lines = CountLines("eval", total, Console(main).say, main and lines_wanted())
    done = 0
    for images, labels, indices, bad in progress_bar(loader, len(loader), "eval", main):
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
        probs = logits.softmax(1)
        shown.add(images, probs, labels)
        if logits_out is not None:
            logits_out.add(logits, labels, indices)
        if worst is not None:
            worst.add(images, probs, labels)
    return EvalSums(*[sum_across(t, accelerator) for t in sums.tensors()]), shown


def shown_rows(shown: ShownSamples, classes: list[str], mean, std, accelerator: Accelerator) -> list[tuple]:
    """Every rank's shown samples, ranked together on the main process (the others get []):
    (picture HWC uint8, true class, predicted class, probability), first in the samples' order."""
    if shown.limit == 0:
        return []
    rows = []
    if shown.keys is not None:
        shown_pictures = pictures(shown.images, mean, std).numpy()
        for key, picture, p, label in zip(
            shown.keys.tolist(), shown_pictures, shown.probs.cpu(), shown.labels.tolist()
        ):
            rows.append((key, picture, classes[label], classes[int(p.argmax())], float(p.max())))
    rows = gather_to_main(rows, accelerator)  # a few small pictures per rank
    rows.sort(key=lambda row: -row[0])
    return [row[1:] for row in rows[: shown.limit]]
