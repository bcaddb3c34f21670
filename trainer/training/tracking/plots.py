"""Training curves, the confusion matrix, the learning-rate range test and contact sheets as PNG (class
names in any script render)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no GUI backend or global figure state

from toolbox.fonts import setup_fonts


def plot_curves(records: list[dict], out: Path) -> None:
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="train")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="val")
    axes[0].set(title="loss", xlabel="step")
    axes[1].plot(steps, [r["acc"] for r in train], label="train")
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["top1"] for r in evals], "o-", label="val top-1")
    axes[1].set(title="accuracy", xlabel="step")
    axes[2].plot(steps, [r["lr"] for r in train])
    axes[2].set(title="learning rate", xlabel="step")
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def plot_confusion(confusion: list[list[int]], classes: list[str], out: Path) -> None:
    setup_fonts(any(not name.isascii() for name in classes))
    n = len(classes)
    size = min(4 + 0.4 * n, 40)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    if n <= 30:  # beyond that the numbers are unreadable anyway
        peak = max(max(row) for row in confusion) or 1
        for t in range(n):
            for p in range(n):
                value = confusion[t][p]
                ax.text(
                    p,
                    t,
                    str(value),
                    ha="center",
                    va="center",
                    color="white" if value > peak / 2 else "black",
                    fontsize=8,
                )
    fig.tight_layout()
    fig.savefig(out, dpi=100)


SHEET_COLUMNS = 8
THUMB_INCHES = 1.6  # per image, caption included: three short lines stay legible at dpi 100


def contact_sheet(images: Sequence, captions: Sequence[str], out: Path, title: str = "") -> None:
    """Images in a grid, each over its caption (a few short lines: true -> predicted, probability, a
    name), as one PNG: the shape of every "look at these images" output (top losses, label issues).
    images: PIL images or HxW(x3) arrays, any sizes (each is drawn in its own square cell)."""
    setup_fonts(any(not c.isascii() for c in captions))
    n = len(images)
    columns = max(1, min(SHEET_COLUMNS, n))
    rows = max(1, math.ceil(n / columns))
    fig = Figure(figsize=(columns * THUMB_INCHES, rows * THUMB_INCHES * 1.25 + (0.4 if title else 0)))
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray" if getattr(images[i], "mode", "RGB") == "L" else None)
            ax.set_title(captions[i], fontsize=7, loc="center", wrap=True)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def plot_lr_finder(lrs: list[float], losses: list[float], smoothed: list[float], marks: dict, out: Path) -> None:
    """The learning-rate range test: loss against lr (log axis), raw and smoothed; marks: a label ->
    index of the curve, the first drawn as the suggestion."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(lrs, losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(lrs, smoothed, color="C0", label="smoothed loss")
    for n, (label, index) in enumerate(marks.items()):
        ax.plot(lrs[index], smoothed[index], "o" if n == 0 else "x", color=f"C{n + 1}", markersize=8, label=label)
    ax.set_xscale("log")
    finite = [v for v in losses + smoothed if math.isfinite(v)]
    top = [v for v in smoothed if math.isfinite(v)]  # the raw loss's last spike would flatten the rest
    if finite and top:
        ax.set_ylim(min(finite) * 0.95, max(top) * 1.05)
    ax.set(xlabel="learning rate (at this run's global batch)", ylabel="train loss", title="learning-rate range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def plot_top_losses(rows: Sequence[tuple], out: Path, title: str) -> None:
    """rows: (picture, true class, predicted class, its probability), as a contact sheet captioned
    "true -> predicted" and the probability; an empty sheet says there was nothing wrong."""
    if not rows:
        title += ": none, every prediction was right"
    captions = [
        f"{_short(true)} -> {_short(predicted)}\np {probability:.3f}" for _, true, predicted, probability in rows
    ]
    contact_sheet([row[0] for row in rows], captions, out, title)


def _short(name: str, width: int = 12) -> str:
    """A class name that fits under a thumbnail."""
    name = name.replace("\n", " ")
    return name if len(name) <= width else name[: width - 3] + "..."


def plot_reliability(curves: dict, out: Path, title: str) -> None:
    """Reliability diagrams side by side (label -> trainer.training.calibration.Reliability): each
    bin's accuracy against its mean confidence, the diagonal being perfect calibration."""
    fig = Figure(figsize=(4.5 * len(curves), 4.5))
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (label, found) in zip(axes, curves.items()):
        bins = len(found.counts)
        edges = [i / bins for i in range(bins)]
        ax.bar(edges, found.accuracy, width=1 / bins, align="edge", edgecolor="black", label="accuracy")
        gaps = [c - a if n else 0 for c, a, n in zip(found.confidence, found.accuracy, found.counts)]
        ax.bar(edges, gaps, bottom=found.accuracy, width=1 / bins, align="edge", color="red", alpha=0.3, label="gap")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{label}: ECE {found.ece:.4f}")
        ax.legend(loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
