"""What the user reads after sharding: RGB mean/std, two plots, and a short text summary."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shards.format import CLASS_PLOT, MANIFEST, SIZE_PLOT, SUMMARY
from shards.manifest import MIN_STD, Manifest
from toolbox.fonts import setup_fonts

MAX_SCATTER = 20000  # points in the size plot; more only blots it out and slows it down
MAX_LABELLED = 60  # classes beyond this get no tick labels (ImageNet's 1000 would be a black smear)
COLORS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}
MAX_NAMED = 5  # near-duplicate groups named in the summary; the manifest lists them all


def mean_std(stats: np.ndarray) -> tuple[list[float], list[float]]:
    """RGB mean and std in [0, 1] from rows of (sum x3, sum of squares x3, pixel count)."""
    if len(stats) == 0:
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    totals = [sum(int(v) for v in stats[:, c]) for c in range(7)]  # Python ints: exact at any scale
    n = totals[6]
    mean = [totals[c] / n for c in range(3)]
    var = [max(totals[3 + c] / n - mean[c] ** 2, 0.0) for c in range(3)]
    return [round(m / 255, 6) for m in mean], [max(round(math.sqrt(v) / 255, 6), MIN_STD) for v in var]


def image_sizes(width: np.ndarray, height: np.ndarray, resize_short: int | None) -> dict[str, int]:
    """The sizes the trainer will read (``data.image_size: auto`` trains at the median shorter side):
    the split's images as written, so --resize-short's re-encoded ones at their new size."""
    if len(width) == 0:
        return {}
    width, height = width.astype(np.float64), height.astype(np.float64)
    if resize_short is not None:
        scale = np.minimum(resize_short / np.maximum(np.minimum(width, height), 1), 1.0)
        width, height = np.maximum(np.round(width * scale), 1), np.maximum(np.round(height * scale), 1)
    short = np.minimum(width, height)
    sizes = {
        "median_width": np.median(width),
        "median_height": np.median(height),
        "short_p10": np.percentile(short, 10),
        "short_median": np.median(short),
        "short_p90": np.percentile(short, 90),
    }
    return {key: max(int(round(value)), 1) for key, value in sizes.items()}


def flat_channels_note(std: list[float]) -> str | None:
    """A note for channels without variance in the train split, whose std is set to MIN_STD."""
    flat = [name for name, s in zip(("red", "green", "blue"), std) if s <= MIN_STD]
    if not flat:
        return None
    return (
        f"the {' and '.join(flat)} channel{'s' if len(flat) > 1 else ''} of the train images do not vary: "
        f"std set to {MIN_STD} (one grey level) so that normalising is defined"
    )


def plot_classes(manifest: Manifest, path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no GUI backend machinery, half the import time

    names = manifest.classes
    counts = {s: np.array([info.class_counts.get(c, 0) for c in names]) for s, info in manifest.splits.items()}
    total = sum(counts.values())
    order = np.arange(len(names)) if len(names) <= MAX_LABELLED else np.argsort(-total, kind="stable")
    x = np.arange(len(names))
    fig = Figure(figsize=(min(max(6.0, 0.35 * len(names) + 2), 24), 4.5))
    ax = fig.subplots()
    width = 0.8 if len(names) <= MAX_LABELLED else 1.0
    bottom = np.zeros(len(names), np.int64)
    for split, n in counts.items():  # stacked: train, val, then test when there is one
        ax.bar(x, n[order], width, bottom=bottom, label=split, color=COLORS.get(split))
        bottom += n[order]
    mean = float(total.mean()) if len(names) else 0.0
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.1f}")
    if len(names) <= MAX_LABELLED:
        ax.set_xticks(
            x,
            [names[i] for i in order],
            rotation=45 if len(names) > 8 else 0,
            ha="right" if len(names) > 8 else "center",
        )
    else:
        ax.set_xticks([])
        ax.set_xlabel(
            f"{len(names)} classes, sorted by count (largest: {names[order[0]]}, smallest: {names[order[-1]]})"
        )
    ax.set_ylabel("images")
    ax.set_title("Images per class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})


def plot_sizes(width: np.ndarray, height: np.ndarray, path: Path, min_side: int | None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    if len(width):
        pick = np.linspace(0, len(width) - 1, min(len(width), MAX_SCATTER)).astype(np.int64)
        ax.scatter(width[pick], height[pick], s=8, alpha=0.4, edgecolors="none")
        lo, top = float(max(min(width.min(), height.min()), 1)), float(max(width.max(), height.max()))
        if top / lo >= 20:  # tiny and huge images together: only log axes show both
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.plot([lo, top], [lo, top], color="grey", linewidth=0.8, linestyle=":", label="square")
        if min_side:
            ax.axvline(min_side, color="red", linewidth=0.8, label=f"--min-side {min_side}")
            ax.axhline(min_side, color="red", linewidth=0.8)
        ax.set_title(f"Image sizes (median {int(np.median(width))} x {int(np.median(height))}, n={len(width)})")
        ax.legend(loc="upper left")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})


def write_plots(manifest: Manifest, out: Path, width: np.ndarray, height: np.ndarray) -> str | None:
    """-> a warning line if class names need glyphs that no installed font has, else None."""
    non_ascii = any(not c.isascii() for c in manifest.classes)
    cjk = setup_fonts(non_ascii)
    plot_classes(manifest, out / CLASS_PLOT)
    plot_sizes(width, height, out / SIZE_PLOT, manifest.options.get("min_side"))
    if cjk is None and non_ascii:
        return "no CJK-capable font found, class names may show as boxes in the plot — pip install mplfonts"
    return None


def split_sources(folders: dict[str, str], val_fraction: float | None) -> str:
    """Where each split of a pre-split SRC came from, e.g. 'train/ -> train and val (...), test/ -> test'."""
    parts = []
    for split, folder in folders.items():
        if split == "train" and "val" not in folders:
            parts.append(
                f"{folder}/ -> train and val (val carved from it: --val-fraction {val_fraction} of each class, "
                "identical files kept together)"
            )
        else:
            parts.append(f"{folder}/ -> {split}")
    return ", ".join(parts)


def leakage(duplicates: Sequence[dict]) -> str:
    """'2 groups test with train/val, 1 group train with val' for the groups of identical files
    written to more than one split; '' when there are none."""
    train_val = test = 0
    for group in duplicates:
        written = set(group["splits"]) - {"skipped"}
        test += "test" in written and bool(written & {"train", "val"})
        train_val += {"train", "val"} <= written
    parts = [(test, "test with train/val"), (train_val, "train with val")]
    return ", ".join(f"{n} group{'s' if n > 1 else ''} {what}" for n, what in parts if n)


def is_near(group: dict) -> bool:
    """A manifest duplicates entry of near-duplicates (an entry without "kind" is of identical files)."""
    return group.get("kind", "identical") == "near"


def near_lines(near: Sequence[dict], options: dict, kept: int) -> list[str]:
    """The summary's near-duplicate lines: the count, then the label conflicts and the groups
    that cross splits by name (a few; all are in the manifest), then the leakage warning."""
    conflicts = [g for g in near if g["cross_class"]]
    crossing = [g for g in near if g["crosses_splits"]]
    lines = [
        f"  near-duplicates: {len(near)} groups of resized/re-encoded/recoloured copies "
        f"({sum(len(g['paths']) for g in near)} images, hashes within {options.get('near_threshold')} bits)"
        + (f", {len(conflicts)} across classes (label conflict: check them)" if conflicts else "")
        + (f", {kept} kept on one side of train/val that would have straddled it" if kept else "")
    ]
    shown = (conflicts + [g for g in crossing if not g["cross_class"]])[:MAX_NAMED]
    for g in shown:
        what = "label conflict" if g["cross_class"] else "in " + " and ".join(sorted(set(g["splits"]) - {"skipped"}))
        more = f" and {len(g['paths']) - 3} more" if len(g["paths"]) > 3 else ""
        lines.append(f"    {what}: {', '.join(g['paths'][:3])}{more} (distance {g['distance']})")
    if len(conflicts) + len(crossing) > len(shown):
        lines.append(f"    ... and more: every group is under duplicates in {MANIFEST}")
    if leaks := leakage(near):
        fix = "remove the copies" if options.get("near_duplicates") == "group" else "pass --near-duplicates group"
        lines.append(
            f"  warning: near-duplicate images in two splits ({leaks}): the held-out score overstates — "
            f"{fix} (paths under duplicates in {MANIFEST})"
        )
    return lines


def reason_kind(reason: str) -> str:
    return reason.split(" (", 1)[0]


def summary(
    manifest: Manifest,
    out: Path,
    found: int,
    ignored: int,
    width: np.ndarray,
    height: np.ndarray,
    notes: Sequence[str] = (),
    near_kept: int = 0,
) -> str:
    splits = manifest.splits
    mb = lambda s: sum(x.bytes for x in s.shards) / 1e6  # noqa: E731
    lines = [
        f"make_shards: {manifest.source} -> {out}",
        f"  {len(manifest.classes)} classes ({manifest.options.get('layout')}); {found} image files found, "
        f"{sum(s.num_samples for s in splits.values())} written, {len(manifest.skipped)} skipped, "
        f"{ignored} other files ignored",
        "  "
        + "; ".join(
            f"{name}: {s.num_samples} samples in {len(s.shards)} shards ({mb(s):.1f} MB)" for name, s in splits.items()
        ),
    ]
    if folders := manifest.options.get("split_folders"):
        lines.append(f"  splits: {split_sources(folders, manifest.options.get('val_fraction'))}")
    shown = manifest.classes[:12]
    per_class = ", ".join(f"{c} " + "/".join(str(s.class_counts.get(c, 0)) for s in splits.values()) for c in shown)
    more = f", ... ({len(manifest.classes) - len(shown)} more)" if len(manifest.classes) > len(shown) else ""
    lines.append(f"  per class {'/'.join(splits)}: {per_class}{more}")
    if manifest.skipped:
        kinds = Counter(reason_kind(s["reason"]) for s in manifest.skipped)
        lines.append("  skipped: " + ", ".join(f"{k}: {n}" for k, n in kinds.most_common()) + f" (paths in {MANIFEST})")
    identical = [d for d in manifest.duplicates if not is_near(d)]
    if identical:
        cross = sum(d["cross_class"] for d in identical)
        lines.append(
            f"  duplicates: {len(identical)} groups of identical files"
            + (f", {cross} across classes (label noise: check them)" if cross else "")
        )
        if leaks := leakage(identical):
            lines.append(
                f"  warning: identical images in two splits ({leaks}): the held-out score overstates — "
                f"remove the copies (paths under duplicates in {MANIFEST})"
            )
    if near := [d for d in manifest.duplicates if is_near(d)]:
        lines.extend(near_lines(near, manifest.options, near_kept))
    elif manifest.options.get("near_duplicates", "off") != "off":
        lines.append(f"  near-duplicates: none (hashes within {manifest.options['near_threshold']} bits)")
    if len(width):
        short = np.minimum(width, height)
        lines.append(
            f"  image size: median {int(np.median(width))}x{int(np.median(height))}, "
            f"shorter side min {short.min()} / median {int(np.median(short))} / max {short.max()}"
        )
    lines.append(f"  train RGB mean {manifest.mean}, std {manifest.std}")
    lines.extend(f"  note: {n}" for n in notes)
    lines.append(f"  wrote {out}/{MANIFEST}, {CLASS_PLOT}, {SIZE_PLOT}, {SUMMARY}")
    return "\n".join(lines)
