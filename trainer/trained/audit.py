"""Find likely label errors from out-of-sample probabilities (confident learning, cleanlab).

    python -m trainer.audit RUN_DIR [RUN_DIR ...] [--out DIR] [--data SHARDS] [--sheet N]
    python -m trainer.audit --folds DIR --config CONFIG [--sweep configs/sweeps/kfold.yaml] [section.key=value ...]

Each run wrote RUN_DIR/heldout.npz at its end: its val samples' softmax from the best weights. The
K runs of a k-fold (data.folds=K data.fold=i) hold out every training sample once, so together
they give each one a probability the model formed without having trained on it; a single run gives
its val split's. The audit merges them (same classes, same shards, no sample twice), ranks the
samples cleanlab's find_label_issues flags by self-confidence (the probability given to the given
class) and writes into --out (default: RUN_DIR/audit for one run, else the runs' common parent/audit):
label_issues.csv (what `make_shards --exclude/--relabel` read), label_issues.png (the top issues'
images, from the shards), summary.md (counts, the class pairs most confused out of sample, the
near-duplicate groups that span classes). It is one numpy process: the probabilities were counted
once per sample by the runs, whatever their process count; no model runs here.

--folds DIR trains the sweep's folds one after another on this machine (`python -m trainer`, run
dirs DIR/<i>-fold<i>; a completed fold is skipped, an interrupted one resumes), then audits them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from shards.format import decode_rgb, image_field
from shards.manifest import Manifest
from toolbox.cli import add_debug_flag, run_command
from toolbox.csv_cells import SafeWriter
from toolbox.errors import UserError
from trainer.rundir import AUDIT, HELDOUT, RunDir
from trainer.training.data import open_shards, split_reader
from trainer.training.folds import FOLD_DIR

COLUMNS = ("key", "path", "given", "suggested", "self_confidence", "rank")
ISSUES_CSV, ISSUES_PNG, SUMMARY_MD = "label_issues.csv", "label_issues.png", "summary.md"
KFOLD_SWEEP = Path("configs/sweeps/kfold.yaml")
SHEET = 32  # images on the contact sheet
TOP_PAIRS = 5
THUMB_PX = 160


@dataclass
class Heldout:
    """Out-of-sample predictions, one row per sample (RUN_DIR/heldout.npz's fields, merged)."""

    keys: np.ndarray  # str
    paths: np.ndarray  # str, relative to make_shards' SRC
    labels: np.ndarray  # int64, the given class
    probs: np.ndarray  # float32 (N, C), softmax without temperature
    folds: np.ndarray  # int64 per sample, -1 for a run that is not a fold


@dataclass
class Runs:
    """What the audited runs share."""

    dirs: list[Path]
    classes: list[str]
    shards: str  # the runs' data.shards
    heldout: Heldout


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args), args.debug)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("items", nargs="*", metavar="RUN_DIR", help="run dirs (with --folds: section.key=value overrides)")
    p.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/audit, or the runs' common parent/audit)")
    p.add_argument("--data", help="the shards the runs trained on, if they moved (default: the runs' data.shards)")
    p.add_argument("--sheet", type=int, default=SHEET, metavar="N", help=f"images on the contact sheet ({SHEET})")
    p.add_argument("--folds", type=Path, metavar="DIR", help="train the k-fold runs into DIR/<i>-fold<i> first")
    p.add_argument("--config", help="with --folds: the training config, e.g. configs/own-images.yaml")
    p.add_argument("--sweep", type=Path, default=KFOLD_SWEEP, help=f"with --folds: the folds' sweep ({KFOLD_SWEEP})")
    add_debug_flag(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.sheet < 0:
        raise UserError(f"--sheet {args.sheet}: give 0 (no contact sheet) or more images")
    dirs = train_folds(args) if args.folds is not None else [Path(d) for d in args.items]
    if not dirs:
        raise UserError(
            "no run dir given — pass RUN_DIR ... (each with its heldout.npz), or --folds DIR --config CONFIG"
        )
    runs = merge_runs(dirs)
    manifest = open_shards(args.data or runs.shards).manifest
    if manifest.classes != runs.classes:
        raise UserError(f"the shards {args.data or runs.shards} have other classes than the runs — pass --data SHARDS")
    out = args.out or default_out(dirs)
    ranked = rank_issues(runs.heldout)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(out / ISSUES_CSV, runs, ranked)
    sheet = draw_sheet(out / ISSUES_PNG, runs, ranked[: args.sheet], args.data or runs.shards) if args.sheet else None
    text = summary(runs, manifest, ranked, csv_path, sheet)
    write_atomically(out / SUMMARY_MD, text.encode("utf-8"))
    print(text.rstrip("\n"))
    return 0


def default_out(dirs: list[Path]) -> Path:
    """One run: RUN_DIR/audit. Folds: beside them, in their common parent (runs/kfold/audit)."""
    if len(dirs) == 1:
        return dirs[0] / AUDIT
    return Path(os.path.commonpath([d.absolute() for d in dirs])) / AUDIT


# ---------------------------------------------------------------- the runs' held-out predictions


def merge_runs(dirs: list[Path]) -> Runs:
    """The runs' heldout.npz as one set: refused (one line) unless they share classes and shards
    and hold every sample at most once."""
    classes, shards, parts = None, None, []
    for run in dirs:
        values, run_classes = RunDir(run).read_config()
        run_shards = str((values.get("data") or {}).get("shards", ""))
        if classes is not None and (run_classes != classes or run_shards != shards):
            what = "classes.json" if run_classes != classes else f"data.shards ({run_shards} vs {shards})"
            raise UserError(f"{run} has another {what} than {dirs[0]} — audit the folds of one k-fold together")
        classes, shards = run_classes, run_shards
        parts.append(read_heldout(run, len(classes)))
    merged = Heldout(*(np.concatenate([getattr(h, f) for h in parts]) for f in Heldout.__dataclass_fields__))
    check_once(merged.keys, [run for run, h in zip(dirs, parts) for _ in range(len(h.keys))])
    return Runs(dirs, classes, shards, merged)


def read_heldout(run: Path, num_classes: int) -> Heldout:
    path = run / HELDOUT
    if not path.is_file():
        raise UserError(
            f"{path} not found — a run writes it when it ends (runs made before it did not): train again, "
            "or train the k-fold with `python -m trainer.audit --folds DIR --config CONFIG`"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            keys, paths = f["keys"].astype(str), f["paths"].astype(str)
            labels, probs = f["labels"].astype(np.int64), f["probs"].astype(np.float32)
            fold = int(f["fold"])
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}) — train the run again") from e
    n = len(keys)
    if probs.shape != (n, num_classes) or len(paths) != n or len(labels) != n or n == 0:
        raise UserError(f"{path} does not hold {num_classes} probabilities for each of its samples — train again")
    if labels.min() < 0 or labels.max() >= num_classes or not np.isfinite(probs).all():
        raise UserError(f"{path} has labels or probabilities out of range — train the run again")
    return Heldout(keys, paths, labels, probs, np.full(n, fold, np.int64))


def check_once(keys: np.ndarray, where: list[Path]) -> None:
    """Every sample once: a key held out by two runs (a fold passed twice, two k-folds mixed) is refused."""
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if (counts > 1).any():
        key = keys[first[np.argmax(counts > 1)]]
        seen = sorted({str(where[i]) for i in np.flatnonzero(keys == key)})
        also = f" (and {int((counts > 1).sum()) - 1} more samples)" if (counts > 1).sum() > 1 else ""
        raise UserError(
            f"sample {key} is held out by {' and '.join(seen)}{also} — pass each fold's run dir once, all of one k-fold"
        )


# ---------------------------------------------------------------- confident learning


def rank_issues(heldout: Heldout) -> np.ndarray:
    """Indices of the likely label errors, least self-confident first (cleanlab's confident learning)."""
    from cleanlab.filter import find_label_issues

    probs = heldout.probs / heldout.probs.sum(axis=1, keepdims=True)  # float32 softmax sums drift from 1
    return np.asarray(
        find_label_issues(heldout.labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1), np.int64
    )


def confused_pairs(heldout: Heldout, num_classes: int, top: int = TOP_PAIRS) -> list[tuple[int, int, int, int]]:
    """The off-diagonal cells of the out-of-sample confusion matrix with most samples:
    (given class, predicted class, samples, samples of the given class)."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (heldout.labels, heldout.probs.argmax(axis=1)), 1)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    cells = [np.unravel_index(i, off.shape) for i in order]
    return [(int(g), int(p), int(off[g, p]), int(cm[g].sum())) for g, p in cells if off[g, p] > 0]


# ---------------------------------------------------------------- outputs


def write_csv(path: Path, runs: Runs, ranked: np.ndarray) -> Path:
    h, classes = runs.heldout, runs.classes
    lines = _Lines()
    writer = SafeWriter(lines, lineterminator="\n")
    writer.writerow(COLUMNS)
    for rank, i in enumerate(ranked.tolist(), start=1):
        given, suggested = int(h.labels[i]), int(h.probs[i].argmax())
        confidence = round(float(h.probs[i, given]), 4)
        writer.writerow([h.keys[i], h.paths[i], classes[given], classes[suggested], confidence, rank])
    write_atomically(path, "".join(lines.parts).encode("utf-8"))
    return path


class _Lines:
    """A file-like that keeps what csv writes, for one atomic write."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def draw_sheet(path: Path, runs: Runs, top: np.ndarray, shards: str) -> Path | None:
    """The top issues' images from the shards, each under `given -> suggested` and its self-confidence."""
    from trainer.training.tracking.plots import contact_sheet

    if not len(top):
        return None
    h, classes = runs.heldout, runs.classes
    images = find_images(shards, {str(h.keys[i]) for i in top}, "train" if (h.folds[top] >= 0).all() else "val")
    shown = [i for i in top.tolist() if str(h.keys[i]) in images]
    captions = [
        f"{classes[h.labels[i]]} -> {classes[h.probs[i].argmax()]}\n"
        f"self-confidence {h.probs[i, h.labels[i]]:.2f}\n{Path(str(h.paths[i])).name[:28]}"
        for i in shown
    ]
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.png")  # savefig goes by the suffix
    try:
        contact_sheet([images[str(h.keys[i])] for i in shown], captions, tmp, f"likely label issues: top {len(shown)}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def find_images(shards: str, keys: set[str], first: str) -> dict:
    """key -> thumbnail, for the samples of ``keys`` found in the shards (``first``'s split looked in
    first). Each sample's key is read from its tar header alone until every key is found."""
    source = open_shards(shards, reads=("train", "val"))
    found = {}
    for split in (first, *({"train", "val"} - {first})):
        reader = split_reader(source, split)
        for i in range(len(reader)):
            if len(found) == len(keys):
                return found
            if reader.key(i) in keys:
                sample = reader.read(i)
                image = decode_rgb(sample[image_field(sample)])
                image.thumbnail((THUMB_PX, THUMB_PX))
                found[str(sample["__key__"])] = image
    return found


def summary(runs: Runs, manifest: Manifest, ranked: np.ndarray, csv_path: Path, sheet: Path | None) -> str:
    h, classes = runs.heldout, runs.classes
    n, m = len(h.keys), len(ranked)
    split = "train" if (h.folds >= 0).all() else "val"
    total = manifest.splits[split].num_samples if split in manifest.splits else n
    lines = [
        "# Label audit",
        "",
        f"- {n} samples audited ({len(runs.dirs)} run(s); {n} of the {split} split's {total} samples), one process",
        f"- {m} likely label issues ({100 * m / n:.1f}%), least self-confident first: {csv_path}",
    ]
    if sheet is not None:
        lines.append(f"- the top ones as images (given -> suggested, self-confidence): {sheet}")
    lines += ["", "## Class pairs most confused (out of sample: given -> predicted)", ""]
    pairs = confused_pairs(h, len(classes))
    lines += [f"- {classes[g]} -> {classes[p]}: {k} of {t} ({100 * k / t:.1f}%)" for g, p, k, t in pairs] or ["- none"]
    conflicts = [d for d in manifest.duplicates if d.get("cross_class")]
    lines += ["", f"## Duplicates across classes in the shards' manifest: {len(conflicts)}", ""]
    for group in conflicts:
        kind = group.get("kind", "identical")
        lines.append(f"- {kind}, {' / '.join(group['classes'])}: {', '.join(group['paths'])}")
    source = manifest.source or "SRC"
    seed, fraction = manifest.options.get("seed", 0), manifest.options.get("val_fraction", 0.1)
    lines += [
        "",
        "## Next",
        "",
        "Check the images, delete the rows you disagree with (or set a new_class column), then rebuild:",
        "",
        f"    python -m launch.make_shards {source} {runs.shards.rstrip('/')}-fixed --seed {seed} "
        f"--val-fraction {fraction} --exclude {csv_path}",
        "",
        f"(or --relabel {csv_path} to move them to their suggested class instead)",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- --folds: the k-fold, one fold after another


def train_folds(args: argparse.Namespace) -> list[Path]:
    """Each fold of the sweep trained in turn with `python -m trainer` (a completed one skipped);
    -> their run dirs."""
    if args.config is None:
        raise UserError("--folds needs --config CONFIG, the training config the folds share")
    bad = [item for item in args.items if "=" not in item]
    if bad:
        raise UserError(
            f"{bad[0]}: with --folds, give section.key=value overrides only (the run dirs are DIR/<i>-fold<i>)"
        )
    fixed, folds = fold_plan(args.sweep)
    dirs = []
    for fold in folds:
        run_dir = args.folds / FOLD_DIR.format(fold=fold)  # as the sweep names its tasks
        dirs.append(run_dir)
        if RunDir(run_dir).status().get("state") == "completed" and (run_dir / HELDOUT).is_file():
            print(f"fold {fold}: completed in {run_dir}, not trained again", flush=True)
            continue
        words = [*fixed, f"data.fold={fold}", *args.items, f"run.dir={run_dir}"]
        print(f"fold {fold} of {len(folds)}: python -m trainer --config {args.config} {' '.join(words)}", flush=True)
        code = subprocess.run([sys.executable, "-m", "trainer", "--config", args.config, *words]).returncode
        if code != 0:
            raise UserError(f"fold {fold} stopped (exit {code}; its error is above) — the same command resumes it")
    return dirs


def fold_plan(sweep: Path) -> tuple[list[str], list[int]]:
    """The k-fold sweep's fixed overrides (data.folds=K, and any other single `value`) and its folds
    (data.fold's values), from wandb's sweep YAML with dotted keys."""
    try:
        spec = yaml.safe_load(sweep.read_text(encoding="utf-8"))
        parameters = spec["parameters"]
        folds = [int(f) for f in parameters["data.fold"]["values"]]
        fixed = [f"{key}={p['value']}" for key, p in parameters.items() if "value" in p]
    except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError) as e:
        raise UserError(
            f"{sweep} is not a k-fold sweep ({type(e).__name__}: {e}) — it needs parameters data.folds {{value: K}} "
            "and data.fold {values: [0, ..., K-1]}; pass --sweep configs/sweeps/kfold.yaml"
        ) from e
    if not any(word.startswith("data.folds=") for word in fixed):
        raise UserError(f"{sweep} sets no data.folds {{value: K}} — add it beside data.fold's values")
    return fixed, folds
