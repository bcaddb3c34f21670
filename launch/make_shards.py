"""Image folders -> clean, analysed, deterministic WebDataset shards.

    python -m launch.make_shards SRC OUT [options]
    python -m launch.make_shards --demo OUT          # scikit-learn's digits, then the same
    python -m launch.make_shards SRC s3://bucket/prefix   # or gs://: built locally ($TMPDIR), then uploaded

Reads SRC/<class>/**/<image>, or a pre-split SRC (shards/splits.py): SRC/train/<class>/... with
SRC/val/ (or valid/, validation/) and/or SRC/test/. Drops and reports what is not a usable image,
splits train/val (stratified, seeded, identical files kept together; as given when SRC has a val
folder), keeps a test folder whole as a third split that training never reads, and writes
OUT/<split>/*.tar, OUT/manifest.json, timm's _info.json, two plots and a summary. Everything is
built beside OUT and only renamed into place when complete; any error is one line on stderr, exit
code 2, and OUT untouched (--debug prints the error's whole chained traceback before that line).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from launch import demo, neardup, outdir, report
from launch.edits import Edit, add_options, apply_edits, read_edits
from launch.pack import Entry, ShardJob, write_shard
from launch.parallel import Workers, default_workers
from launch.publish import RemoteOut
from launch.scan import DEFAULT_MAX_FILE_BYTES, Inspection, Listing, inspect_all, list_source, printable
from launch.split import (
    NONE,
    TEST,
    TRAIN,
    VAL,
    assign_splits,
    duplicate_groups,
    plan_shards,
    same_bytes_groups,
    shard_count,
)
from shards.format import INDEX_NAME, MAX_PIXELS, SUMMARY, key_hash, sample_key, shard_name
from shards.index import write_index
from shards.manifest import Manifest, ShardInfo, SplitInfo
from shards.splits import SPLITS, TRAINING
from shards.store import is_url
from shards.writer import publish, staging
from toolbox import errors, failpoints
from toolbox.cli import is_disk_error, run_command
from toolbox.errors import UserError

DEFAULT_MIN_SHARDS = 16
DEMO_MIN_SHARDS = 8  # 1,797 images: 8 shards still give 2 per loader worker for 2 ranks x 2 workers
DEFAULT_SHARD_MB = 256.0
UNITS = {"": 1e6, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9}  # a bare number is MB


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error here, not usage + message
        raise UserError(f"{message} — see `python -m launch.make_shards --help`")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_intermixed_args(argv)  # options may sit between SRC and OUT
    want = 1 if args.demo else 2
    if len(args.paths) != want:
        p.error("--demo takes only OUT" if args.demo else "expected SRC and OUT")
    if args.min_shards is None:
        args.min_shards = DEMO_MIN_SHARDS if args.demo else DEFAULT_MIN_SHARDS
    _check_ranges(args)
    return args


def _parser() -> _Parser:
    p = _Parser(
        prog="python -m launch.make_shards",
        usage="%(prog)s SRC OUT [options]  |  %(prog)s --demo OUT [options]",
        description="Image folders (one sub-folder per class) -> WebDataset tar shards, manifest and plots.",
    )
    p.add_argument("paths", nargs="*", metavar="SRC OUT", help="source image folder and output folder")
    p.add_argument(
        "--demo", action="store_true", help="shard scikit-learn's digits (written to OUT/images) instead of SRC"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, metavar="F", help="share of each class for val (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="split and shuffle seed (default 0)")
    p.add_argument("--samples-per-shard", type=int, metavar="N", help="at most this many samples per shard")
    p.add_argument(
        "--shard-size", type=float, default=DEFAULT_SHARD_MB, metavar="MB", help="target shard size (default 256)"
    )
    p.add_argument(
        "--min-shards",
        type=int,
        metavar="N",
        help=f"at least this many shards per split (default {DEFAULT_MIN_SHARDS}, demo {DEMO_MIN_SHARDS})",
    )
    _add_filters(p)
    add_options(p)  # --exclude, --relabel (launch/edits.py)
    _add_near_duplicates(p)
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUT (only once the new output is complete)"
    )
    p.add_argument(
        "--workers", type=int, default=default_workers(), metavar="N", help="processes (default: all cores available)"
    )
    p.add_argument(
        "--resize-short", type=int, metavar="PX", help="re-encode images whose shorter side is above PX down to PX"
    )
    p.add_argument(
        "--debug", action="store_true", help="on an error, print its full chained traceback before the one line"
    )
    return p


def _add_filters(p: argparse.ArgumentParser) -> None:
    """The options that decide which files become samples."""
    p.add_argument("--min-side", type=int, metavar="PX", help="skip images whose shorter side is below PX")
    p.add_argument("--max-aspect", type=float, metavar="R", help="skip images whose long/short side ratio is above R")
    p.add_argument(
        "--max-per-class",
        type=int,
        metavar="N",
        help="keep at most N images per class (of train/ only, for a pre-split SRC)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        metavar="N",
        help="decompression-bomb limit (default Pillow's, 89478485)",
    )
    p.add_argument(
        "--max-file-size",
        type=file_size,
        default=DEFAULT_MAX_FILE_BYTES,
        metavar="SIZE",
        help=f"skip files larger than this, unread, e.g. 64MB or 2GB (default {DEFAULT_MAX_FILE_BYTES // 10**6}MB)",
    )
    p.add_argument(
        "--skip-empty-classes", action="store_true", help="drop classes with no valid image instead of stopping"
    )


def _add_near_duplicates(p: argparse.ArgumentParser) -> None:
    """The options of the near-duplicate search (launch/neardup.py)."""
    p.add_argument(
        "--near-duplicates",
        choices=neardup.MODES,
        default=neardup.DEFAULT_MODE,
        help="find resized/re-encoded/recoloured copies by perceptual hash: off, report them, "
        f"or group them (also keep each group on one side of train/val; default {neardup.DEFAULT_MODE})",
    )
    p.add_argument(
        "--near-threshold",
        type=hash_bits,
        default=neardup.DEFAULT_THRESHOLD,
        metavar="BITS",
        help=f"largest Hamming distance of two near-duplicates' 64-bit hashes (default {neardup.DEFAULT_THRESHOLD})",
    )


def hash_bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        bits = -1
    if not 0 <= bits <= 32:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of bits from 0 to 32, e.g. {neardup.DEFAULT_THRESHOLD}"
        )
    return bits


def file_size(text: str) -> int:
    """'256MB', '2GB', '500k', '1e9b' or a bare number of MB -> bytes."""
    found = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    try:
        size = int(float(found[1]) * UNITS[found[2]])
    except (TypeError, KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size, e.g. 256MB or 2GB") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte, e.g. 256MB")
    return size


def _check_ranges(args: argparse.Namespace) -> None:
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction {args.val_fraction} is out of range — use a value in [0, 1), e.g. 0.1")
    for name in (
        "samples_per_shard",
        "min_shards",
        "min_side",
        "max_per_class",
        "max_pixels",
        "workers",
        "resize_short",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value} must be at least 1 — leave it out for the default")
    if args.shard_size <= 0:
        raise UserError(f"--shard-size {args.shard_size} must be positive — it is in MB, e.g. 256")
    if args.max_aspect is not None and args.max_aspect < 1:
        raise UserError(f"--max-aspect {args.max_aspect} must be at least 1 — it is long side / short side")


def recorded_options(args: argparse.Namespace, listing: Listing) -> dict:
    """The options that shape the output, for the manifest (not --workers or --overwrite,
    which do not change a byte of it)."""
    return {
        "layout": listing.layout,
        "split_folders": listing.folders,  # presplit: split -> its folder in SRC; no val: val carved from train
        "demo": args.demo,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "samples_per_shard": args.samples_per_shard,
        "shard_size_mb": args.shard_size,
        "min_shards": args.min_shards,
        "min_side": args.min_side,
        "max_aspect": args.max_aspect,
        "max_per_class": args.max_per_class,
        "max_pixels": args.max_pixels,
        "max_file_size": args.max_file_size,
        "skip_empty_classes": args.skip_empty_classes,
        "resize_short": args.resize_short,
        "exclude": args.exclude,
        "relabel": args.relabel,
        "near_duplicates": args.near_duplicates,
        "near_threshold": args.near_threshold,
    }


def check_out(out: Path, src: Path | None, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out} is a file — pass a folder path (new, empty, or with --overwrite)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"OUT {out} is not empty — pass --overwrite to replace it, or choose a new folder")
    if src is not None and src.exists():
        s, o = src.resolve(), out.resolve()
        if o == s or s in o.parents:
            raise UserError(f"OUT {out} is inside SRC {src} — choose an OUT outside SRC")
        if o in s.parents:
            raise UserError(f"SRC {src} is inside OUT {out} — choose an OUT that does not contain SRC")


@dataclass
class Plan:
    """Everything decided before a byte is written (per-file facts as arrays indexed like the listing)."""

    listing: Listing
    scan: Inspection
    classes: list[str]  # kept classes, sorted
    label: np.ndarray  # (N,) index into classes, -1 for a dropped class
    split: np.ndarray  # (N,) TRAIN, VAL, TEST or NONE
    skipped: list[dict]
    duplicates: list[dict]
    splits: tuple[str, ...]  # those written: train and val, and test when SRC has a test folder
    edits: list[Edit]  # --exclude, --relabel as applied
    near_kept: int = 0  # near-duplicate groups kept on one side that a split by identical files would cut


def prepare(src: Path, args: argparse.Namespace, workers: Workers) -> Plan:
    listing = list_source(src)
    edits = read_edits(args, listing)  # a bad CSV stops here, before the scan
    near = args.near_duplicates != "off"
    scan = inspect_all(
        listing, args.max_pixels, args.max_file_size, workers, _progress("scanning", "files", len), near=near
    )
    reasons = dict(scan.reasons)
    for i in np.flatnonzero(scan.field >= 0).tolist():
        reason = _filter_reason(int(scan.width[i]), int(scan.height[i]), args)
        if reason:
            reasons[i] = reason
    usable = np.ones(len(listing.relpaths), bool)
    usable[list(reasons)] = False

    labels = np.asarray(listing.labels, np.int64)
    given = np.asarray(listing.given_split, np.int64)
    counts, label = _learnable_classes(src, listing, labels, usable & (given <= TRAIN), args)
    for i in np.flatnonzero(usable & (label < 0)).tolist():
        reasons[i] = "class dropped (no valid training image, --skip-empty-classes)"
    usable &= label >= 0

    same = same_bytes_groups(scan.sha256.array)
    similar = _near_groups(scan, same, args, workers) if near else same
    held_out = given == TEST  # the user's test set: kept whole, never capped, never part of val
    split_by = lambda group: assign_splits(  # noqa: E731
        labels,
        group,
        np.flatnonzero(usable & ~held_out),
        listing.classes,
        args.val_fraction,
        args.seed,
        args.max_per_class,
        given if "val" in listing.folders else None,  # no val folder: val is carved from train as for class folders
    )
    split, capped = split_by(similar if args.near_duplicates == "group" else same)
    split[usable & held_out] = TEST
    for i in capped.tolist():
        reasons[i] = f"over --max-per-class {args.max_per_class}"
    kept = [c for c, n in zip(listing.classes, counts) if n > 0]
    apply_edits(edits, listing, kept, label, split, reasons)  # after the split: the other files keep theirs
    skipped = [
        {"path": printable(listing.relpaths[i]), "reason": reasons[i]}
        for i in sorted(reasons, key=lambda i: listing.relpaths[i])
    ]
    duplicates = _duplicates(listing, scan, same, split)
    near_kept = 0
    if near:
        # Where a split by identical files alone would have put each file: the groups it cuts are
        # the leaks that grouping prevented (in report mode, the split itself).
        alone = split if args.near_duplicates == "report" else split_by(same)[0]
        found, near_kept = _near_duplicates(listing, scan, same, similar, split, alone)
        duplicates += found
    splits = TRAINING + (("test",) if "test" in listing.folders else ())
    return Plan(listing, scan, kept, label, split, skipped, duplicates, splits, edits, near_kept)


def _learnable_classes(
    src: Path, listing: Listing, labels: np.ndarray, training: np.ndarray, args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray]:
    """A class is one the model can learn: it needs a training image, wherever else it has some.
    -> (training images per class, each file's index into the kept classes, -1 for a dropped one)."""
    counts = np.bincount(labels[training], minlength=len(listing.classes))
    empty = [c for c, n in zip(listing.classes, counts) if n == 0]
    if empty and not args.skip_empty_classes:
        where = "training folder has" if listing.layout == "presplit" else "folder has"
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        names = ", ".join(f"'{printable(c)}'" for c in empty[:5]) + more
        raise UserError(
            f"class {names}: {where} no valid image — add images, remove the folder, or pass --skip-empty-classes"
        )
    if len(empty) == len(listing.classes):
        raise UserError(f"SRC {src} has no valid image — check the files (see why with a few of them in a test folder)")
    new_label = np.cumsum(counts > 0) - 1
    new_label[counts == 0] = -1
    return counts, new_label[labels] if len(labels) else labels


def _filter_reason(w: int, h: int, args: argparse.Namespace) -> str | None:
    if args.min_side and min(w, h) < args.min_side:
        return f"too small (shorter side {min(w, h)} px < --min-side {args.min_side})"
    if args.max_aspect and max(w, h) / min(w, h) > args.max_aspect:
        return f"aspect ratio out of bounds ({max(w, h) / min(w, h):.2f} > --max-aspect {args.max_aspect})"
    return None


def _duplicates(listing: Listing, scan: Inspection, group: np.ndarray, split: np.ndarray) -> list[dict]:
    """Groups of identical valid images (filtered or capped ones too: they are still copies)."""
    return [
        {"kind": "identical", "sha256": scan.sha256[members[0]].hex(), **_group_entry(listing, members, split)}
        for members in duplicate_groups(group, np.flatnonzero(scan.field >= 0))
    ]


def _group_entry(listing: Listing, members: np.ndarray, split: np.ndarray) -> dict:
    """The manifest's fields of a group of copies: paths, where each went, its classes."""
    members = members.tolist()
    classes = sorted({listing.classes[listing.labels[i]] for i in members})
    where = [SPLITS[split[i]] if split[i] != NONE else "skipped" for i in members]
    return {
        "paths": [listing.relpaths[i] for i in members],
        "splits": where,
        "classes": classes,
        "cross_class": len(classes) > 1,
        "crosses_splits": len(set(where) - {"skipped"}) > 1,
    }


def _near_groups(scan: Inspection, same: np.ndarray, args: argparse.Namespace, workers: Workers) -> np.ndarray:
    """Group ids that join near-duplicate images (hashes within --near-threshold) and identical files."""
    compared = np.flatnonzero((scan.field >= 0) & neardup.hashable(scan.width, scan.height))
    if len(compared) < 2:  # nothing to compare (the --demo digits are 8x8): no graph to build
        return same
    return neardup.near_groups(scan.phash, compared, same, args.near_threshold, workers.map)


def _near_duplicates(
    listing: Listing, scan: Inspection, same: np.ndarray, similar: np.ndarray, split: np.ndarray, alone: np.ndarray
) -> tuple[list[dict], int]:
    """-> (the manifest entries of near-duplicate groups: label conflicts first, then the groups a
    split by identical files alone (``alone``) cuts between train and val, then the rest; how many
    of those the split kept whole)."""
    entries, kept = [], 0
    for members in duplicate_groups(similar, np.flatnonzero(scan.field >= 0)):
        if len(np.unique(same[members])) < 2:
            continue  # identical files only: already an "identical" entry
        entry = {
            "kind": "near",
            "distance": neardup.max_distance(scan.phash[members]),
            **_group_entry(listing, members, split),
        }
        cut = {TRAIN, VAL} <= set(alone[members].tolist())
        kept += cut and not entry["crosses_splits"]
        entries.append((not entry["cross_class"], not (cut or entry["crosses_splits"]), entry))
    entries.sort(key=lambda e: e[:2])  # stable: by first member within each kind
    return [e[2] for e in entries], kept


def write(plan: Plan, stage: Path, args: argparse.Namespace, source: str, workers: Workers) -> Manifest:
    """The shards and each split's sample index into ``stage`` (on every core); -> their manifest."""
    _check_keys(plan)
    splits, jobs = _lay_out(plan, stage, args)
    results = workers.map(write_shard, (_shard_job(plan, path, shard, args) for path, shard in jobs), ahead=2)
    total = sum(split.num_samples for split in splits.values())
    written = _progress("writing", "samples", lambda done: done[0].samples)(results, total)
    records = {name: [] for name in plan.splits}
    pause = failpoints.value("make-shards-pause")
    gone = []
    for k, ((path, _), (info, index, vanished)) in enumerate(zip(jobs, written)):
        split = splits[Path(path).parent.name]
        split.shards.append(info)
        records[Path(path).parent.name].append(index)
        for entry in vanished:  # deleted or moved since the scan: left out and said, as any skipped file
            split.num_samples -= 1
            split.class_counts[entry.label_name] -= 1
            gone.append({"path": printable(entry.relpath), "reason": "gone since the scan (deleted or moved)"})
        if k == 0 and pause:  # a test interrupts the run here: staging holds a shard, the pool is busy
            Path(pause).touch()
            time.sleep(failpoints.WAIT_S)
    for name, split in splits.items():
        size, sha = write_index(stage / name / INDEX_NAME, records[name])
        split.index = ShardInfo(INDEX_NAME, split.num_samples, size, sha)

    train = plan.split == TRAIN
    mean, std = report.mean_std(plan.scan.stats[train])
    return Manifest(
        classes=plan.classes,
        splits=splits,
        mean=mean,
        std=std,
        options=recorded_options(args, plan.listing),
        skipped=sorted(plan.skipped + gone, key=lambda s: s["path"]),
        duplicates=plan.duplicates,
        edits=[edit.record() for edit in plan.edits],
        source=source,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        image_sizes=report.image_sizes(plan.scan.width[train], plan.scan.height[train], args.resize_short),
    )


def _check_keys(plan: Plan) -> None:
    relpaths = plan.listing.relpaths
    written = np.flatnonzero(plan.split != NONE)
    hashes = np.fromiter((key_hash(relpaths[i]) for i in written.tolist()), np.uint64, len(written))
    if len(np.unique(hashes)) != len(hashes):
        raise UserError("two files got the same sample key (a 64-bit hash collision) — rename one of them")


def _lay_out(plan: Plan, stage: Path, args: argparse.Namespace) -> tuple[dict[str, SplitInfo], list]:
    """Each split's folder in ``stage`` and its (still shardless) SplitInfo; -> those, and every
    shard to write as (path, the listing's indices of its samples), in shard order."""
    splits, jobs = {}, []
    for name in plan.splits:
        members = np.flatnonzero(plan.split == SPLITS.index(name))
        n = shard_count(
            len(members),
            int(plan.scan.size[members].sum()),
            args.samples_per_shard,
            int(args.shard_size * 1e6),
            args.min_shards,
        )
        (stage / name).mkdir()
        for k, shard in enumerate(plan_shards(members, n, args.seed, name)):
            jobs.append((str(stage / name / shard_name(name, k)), shard))
        counts = np.bincount(plan.label[members], minlength=len(plan.classes))
        splits[name] = SplitInfo(len(members), dict(zip(plan.classes, counts.tolist())), [])
    return splits, jobs


def _shard_job(plan: Plan, path: str, shard: list[int], args: argparse.Namespace) -> ShardJob:
    listing, scan = plan.listing, plan.scan
    entries = [
        Entry(
            sample_key(listing.relpaths[i]),
            str(listing.root / listing.relpaths[i]),
            listing.relpaths[i],
            int(plan.label[i]),
            plan.classes[plan.label[i]],
            int(scan.width[i]),
            int(scan.height[i]),
            scan.sha256[i],
            int(scan.field[i]),
        )
        for i in shard
    ]
    return ShardJob(path, entries, args.resize_short, args.max_file_size)


def _progress(desc: str, unit: str, weight=lambda item: 1):
    """A tqdm bar on stderr (on a terminal only) counting ``weight(item)`` per item passing through."""

    def wrap(items, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            yield from items
            return
        tqdm.monitor_interval = 0  # no monitor thread: the worker pool forks
        with tqdm(total=total, desc=desc, unit=unit, disable=None, file=sys.stderr, leave=False) as bar:
            for item in items:
                bar.update(weight(item))
                yield item

    return wrap


def run(args: argparse.Namespace) -> str:
    src = None if args.demo else Path(args.paths[0])
    if is_url(args.paths[-1]):  # object storage: checked now, built in a local folder, then uploaded
        work = outdir.scratch(args.paths[-1])
        with outdir.claim(work / "out") as notes:  # before RemoteOut looks at what OUT holds, as below
            remote = RemoteOut(args.paths[-1], args.overwrite)
            _say(notes + ([remote.note] if remote.note else []))
            try:
                return build(args, src, work / "out", remote)
            finally:
                outdir.clear(work)
    out = Path(args.paths[-1])
    with outdir.claim(out) as notes:  # before check_out: a run that finished meanwhile is seen
        _say(notes)
        check_out(out, src, args.overwrite)
        return build(args, src, out, None)


def _say(notes: list[str]) -> None:
    for note in notes:
        print(note, file=sys.stderr, flush=True)


def build(args: argparse.Namespace, src: Path | None, out: Path, remote: RemoteOut | None) -> str:
    """Scan, split and write into a staging folder beside ``out``, which then becomes OUT (or,
    with ``remote``, is uploaded to it)."""
    shown = remote.shown if remote is not None else printable(str(out))
    with Workers(args.workers) as workers:
        if src is not None:
            plan = prepare(src, args, workers)  # every input error surfaces here, before anything is written
        with staging(out) as stage:
            outdir.mark(stage)
            if src is None:  # the digits are written as an image folder: into OUT itself when it is local
                images = (stage if remote is None else out.parent) / "images"
                plan = prepare(demo.write_digits(images), args, workers)
                src = out / "images" if remote is None else images
            manifest = write(plan, stage, args, printable(str(src.absolute())), workers)
            if remote is not None:
                remote.place(manifest)
            text = finish(manifest, plan, stage, shown, args.min_shards)
            outdir.unmark(stage)
            if remote is None:
                publish(stage, out)
            else:
                remote.put(stage, lambda files: _progress("uploading", "files")(files, len(files)))
    return text


def finish(manifest: Manifest, plan: Plan, stage: Path, out: str, min_shards: int) -> str:
    """Manifest, timm's _info.json, plots and summary into ``stage``; -> the summary."""
    manifest.write(stage)
    sel = plan.split != NONE
    width, height = plan.scan.width[sel], plan.scan.height[sel]
    notes = [
        n for n in [report.write_plots(manifest, stage, width, height), report.flat_channels_note(manifest.std)] if n
    ] + [edit.note() for edit in plan.edits]
    for name in manifest.splits:
        n, k = manifest.splits[name].num_samples, len(manifest.splits[name].shards)
        if 0 < n < min_shards:
            notes.append(f"{name} has only {n} samples, so {k} shards (fewer than --min-shards {min_shards})")
    text = report.summary(
        manifest, out, len(plan.listing.relpaths), plan.listing.ignored, width, height, notes, plan.near_kept
    )
    (stage / SUMMARY).write_text(text + "\n", encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_command(
        lambda: print(run(parse_args(argv))) or 0,
        "--debug" in argv,  # known before parsing, which can fail too
        kept="OUT was left as it was",
        explain=file_error,
    )


def file_error(e: BaseException) -> tuple[int, str] | None:
    """Any other error of the file system (a path, a permission): one line too."""
    if isinstance(e, OSError) and not is_disk_error(e):
        where = f" ({e.filename})" if e.filename else ""
        return errors.EXIT_USAGE, f"{e.strerror or e}{where} — check the paths, permissions and free disk space"
    return None


if __name__ == "__main__":
    sys.exit(main())
