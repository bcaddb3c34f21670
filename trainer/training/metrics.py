"""Classification metrics from sums that add up across ranks: a confusion matrix, top-k hits, loss.

Ranks accumulate `EvalSums` over their own samples and all-reduce them; the per-class numbers
are then derived once from the confusion matrix, so N processes give exactly 1 process's result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TTA = ("none", "flip")  # test-time augmentation: none, or each image with its mirror


def predict_logits(model: torch.nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's float32 logits for a batch. tta=flip: log of the mean of the image's and its
    mirror's softmax, so the softmax, the argmax and the loss of the averaged prediction all
    follow from it as from plain logits."""
    logits = model(images).float()
    if tta == "none":
        return logits
    mirrored = model(images.flip(-1)).float()
    return torch.logaddexp(logits.log_softmax(1), mirrored.log_softmax(1)) - math.log(2)


@dataclass
class EvalSums:
    confusion: torch.Tensor  # [true, predicted] counts, int64
    top5: torch.Tensor  # samples whose label is among the top-5 (top-k for k = min(5, classes))
    loss: torch.Tensor  # summed per-sample loss, float64
    skipped: torch.Tensor  # unreadable samples left out (data.skip_bad_samples), int64

    @classmethod
    def zeros(cls, num_classes: int, device: torch.device | str) -> EvalSums:
        return cls(
            torch.zeros(num_classes, num_classes, dtype=torch.long, device=device),
            torch.zeros((), dtype=torch.long, device=device),
            torch.zeros((), dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.long, device=device),
        )

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        num_classes = self.confusion.shape[0]
        predicted = logits.argmax(dim=1)
        self.confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(
            num_classes, num_classes
        )
        k = min(5, num_classes)
        self.top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()
        # Per-sample losses summed in float64: the total must not depend on how samples were batched.
        self.loss += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none").double().sum()

    def tensors(self) -> list[torch.Tensor]:
        return [self.confusion, self.top5, self.loss, self.skipped]


def summarize(sums: EvalSums, classes: list[str]) -> dict:
    """The eval record: num_samples, top1, top5, loss, per-class P/R/specificity/F1, macro, confusion."""
    confusion = sums.confusion.cpu().double()
    total = confusion.sum()
    n = int(total.item())
    true_pos = confusion.diag()
    predicted = confusion.sum(dim=0)
    actual = confusion.sum(dim=1)
    false_pos, false_neg = predicted - true_pos, actual - true_pos
    true_neg = total - true_pos - false_pos - false_neg
    precision = _ratio(true_pos, predicted)
    recall = _ratio(true_pos, actual)
    specificity = _ratio(true_neg, true_neg + false_pos)
    f1 = _ratio(2 * precision * recall, precision + recall)
    per_class = {
        name: {
            "precision": precision[i].item(),
            "recall": recall[i].item(),
            "specificity": specificity[i].item(),
            "f1": f1[i].item(),
            "support": int(actual[i].item()),
        }
        for i, name in enumerate(classes)
    }
    skipped = {"skipped_bad_samples": int(sums.skipped.item())} if sums.skipped.item() else {}
    return {
        "num_samples": n,
        **skipped,
        "top1": true_pos.sum().item() / max(n, 1),
        "top5": sums.top5.item() / max(n, 1),
        "loss": sums.loss.item() / max(n, 1),
        "per_class": per_class,
        "macro": {
            "precision": precision.mean().item(),
            "recall": recall.mean().item(),
            "specificity": specificity.mean().item(),
            "f1": f1.mean().item(),
        },
        "confusion": sums.confusion.cpu().tolist(),
    }


class ShownSamples:
    """The `limit` samples most worth a look, kept on the device as batches go by: the wrong
    ones, most confident first, then the right ones, least confident first. Each process keeps
    its own; their union is ordered by the same keys (`rank`)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.keys = self.images = self.probs = self.labels = None

    def add(self, images: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> None:
        if self.limit == 0 or not len(labels):
            return
        keys = self.rank(probs, labels)
        if self.keys is not None:
            keys, images, probs, labels = (
                torch.cat(pair)
                for pair in zip((self.keys, self.images, self.probs, self.labels), (keys, images, probs, labels))
            )
        top = keys.topk(min(self.limit, len(keys))).indices
        self.keys, self.images, self.probs, self.labels = keys[top], images[top], probs[top], labels[top]

    @staticmethod
    def rank(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Higher first: 1 + confidence for a wrong prediction, 1 - confidence for a right one."""
        confidence, predicted = probs.max(dim=1)
        return torch.where(predicted != labels, 1 + confidence, 1 - confidence)


class TopLosses(ShownSamples):
    """The `limit` wrong predictions with the highest loss (the least probability for the true class),
    highest first: the images a user should look at first (mislabelled, ambiguous, or hard)."""

    SHOWN = 24  # three rows of a contact sheet: top_losses.png and evaluate's <name>-top-losses.png

    def __init__(self, limit: int = SHOWN):
        super().__init__(limit)

    def add(self, images: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> None:
        wrong = probs.argmax(dim=1) != labels
        super().add(images[wrong], probs[wrong], labels[wrong])

    @staticmethod
    def rank(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return -probs.gather(1, labels[:, None]).squeeze(1).log()


def pictures(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalised NCHW images back to what a person sees: NHWC uint8 on the CPU."""
    mean_, std_ = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    return ((images.cpu().float() * std_ + mean_).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    # A class never predicted (or absent) scores 0, as scikit-learn's zero_division=0 does.
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), torch.zeros_like(numerator))


def table_rows(record: dict) -> list[tuple[str, float, float, float, float, int]]:
    """(name, precision, recall, specificity, F1, support) per class, then the macro means over all samples."""
    rows = [
        (name, m["precision"], m["recall"], m["specificity"], m["f1"], m["support"])
        for name, m in record["per_class"].items()
    ]
    macro = record["macro"]
    rows.append(
        ("macro", macro["precision"], macro["recall"], macro["specificity"], macro["f1"], record["num_samples"])
    )
    return rows


def format_table(record: dict) -> str:
    """The eval record as a readable text table (per class, then macro and totals)."""
    rows = [(one_line(name), *scores) for name, *scores in table_rows(record)]
    width = max([len(row[0]) for row in rows] + [5])
    lines = [f"{'class':<{width}}  precision  recall  specificity     f1  support"]
    for name, p, r, s, f1, n in rows:
        lines.append(f"{name:<{width}}  {p:9.4f}  {r:6.4f}  {s:11.4f}  {f1:5.4f}  {n:7d}")
    lines.append(
        f"top-1 {record['top1']:.4f}  top-5 {record['top5']:.4f}  loss {record['loss']:.4f}  samples {record['num_samples']}"
    )
    return "\n".join(lines)


def one_line(name: str) -> str:
    """A class name as one line of a table: a folder name may hold a newline or a tab."""
    return name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
