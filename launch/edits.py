"""`--exclude FILE` and `--relabel FILE`: a label-issue CSV applied to a build of the shards.

The file is `python -m trainer.audit`'s audit/label_issues.csv or a user's edited copy: its rows
name files by `path` (relative to SRC, as each sample's json has it) or, where the path cell is
empty, by sample `key`; for --relabel a row's new class is `new_class` when the file has that
column, else `suggested`. The edits are applied after the train/val split is drawn, so every other
file keeps the split it had without them: the rebuilt val set is the old one less the excluded
files, and its metrics stay comparable. The manifest records each file (name, sha256, counts).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch.scan import Listing, printable
from launch.split import NONE, TRAIN
from shards.format import sample_key
from toolbox.csv_cells import read_cell
from toolbox.errors import UserError

NEW_CLASS = "new_class"  # a user's own column for --relabel; wins over the audit's `suggested`
SUGGESTED = "suggested"
MAX_CSV_BYTES = 1 << 30  # a label-issue list of a few million rows; anything bigger is not one


@dataclass
class Edit:
    """One --exclude or --relabel file, matched against the listing."""

    option: str  # "exclude" | "relabel"
    file: str  # as given on the command line
    sha256: str
    rows: int
    targets: dict[int, str | None]  # listing index -> the new class name (None for exclude)
    unmatched: int  # rows that name no file of SRC
    applied: int = 0  # files excluded or moved to another class (a relabel to the class it has is no change)

    def record(self) -> dict:
        """What the manifest keeps of it."""
        fields = ("option", "file", "sha256", "rows", "unmatched", "applied")
        return {name: getattr(self, name) for name in fields} | {"matched": len(self.targets)}

    def note(self) -> str:
        done = "excluded" if self.option == "exclude" else "relabelled"
        missed = f" ({self.unmatched} of its {self.rows} rows matched no file)" if self.unmatched else ""
        return f"{done} {self.applied} file(s) listed in {self.file}{missed}"


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exclude", metavar="CSV", help="leave out the files this CSV lists by path or key (trainer.audit's CSV)"
    )
    p.add_argument(
        "--relabel",
        metavar="CSV",
        help=f"move the files this CSV lists to the class in its {NEW_CLASS} column, else its {SUGGESTED} column",
    )


def read_edits(args: argparse.Namespace, listing: Listing) -> list[Edit]:
    """Each edit file given, read and matched now: a bad file stops the build before the scan."""
    edits = []
    for option in ("exclude", "relabel"):
        if getattr(args, option):
            edits.append(_read(option, Path(getattr(args, option)), listing))
    return edits


def _read(option: str, path: Path, listing: Listing) -> Edit:
    flag = f"--{option} {printable(str(path))}"
    raw = _bytes(path, flag)
    try:
        rows = list(csv.DictReader(raw.decode("utf-8-sig").splitlines()))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{flag} is not a UTF-8 CSV ({e}) — pass trainer.audit's label_issues.csv") from None
    header = set(rows[0]) if rows else set()
    if not header & {"path", "key"}:
        raise UserError(f"{flag} has no path or key column — pass trainer.audit's label_issues.csv or an edited copy")
    column = NEW_CLASS if NEW_CLASS in header else SUGGESTED
    if option == "relabel" and column not in header:
        raise UserError(f"{flag} has no {SUGGESTED} or {NEW_CLASS} column — add the new class of each row")
    find = _finder(listing)
    targets, unmatched = {}, 0
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        index = find(read_cell(row.get("path") or ""), read_cell(row.get("key") or ""))
        if index is None:
            unmatched += 1
            continue
        targets[index] = (
            _new_class(row, column, listing.classes, f"{flag} line {number}") if option == "relabel" else None
        )
    if not targets:
        raise UserError(
            f"{flag}: none of its {len(rows)} rows names a file of SRC (matched by path, or by key where the path "
            "is empty) — pass the CSV written for this SRC's shards"
        )
    return Edit(option, printable(str(path)), hashlib.sha256(raw).hexdigest(), len(rows), targets, unmatched)


def _bytes(path: Path, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CSV_BYTES + 1)
    except OSError as e:
        raise UserError(f"{flag} cannot be read ({e.strerror}) — pass trainer.audit's label_issues.csv") from None
    if len(raw) > MAX_CSV_BYTES:
        raise UserError(f"{flag} is larger than {MAX_CSV_BYTES >> 20} MB — it is not a list of label issues")
    return raw


def _finder(listing: Listing):
    """(path, key) -> the listing index of the file it names, or None. Keys are hashed only when a
    row needs one (1.28 M paths take a second or two)."""
    by_path = {p: i for i, p in enumerate(listing.relpaths)}
    by_key: dict[str, int] = {}

    def find(path: str, key: str) -> int | None:
        if path:
            return by_path.get(path)
        if key and not by_key:
            by_key.update((sample_key(p), i) for i, p in enumerate(listing.relpaths))
        return by_key.get(key) if key else None

    return find


def _new_class(row: dict, column: str, classes: list[str], where: str) -> str:
    name = read_cell(row.get(column) or "")
    if name not in classes:
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise UserError(
            f"{where}: class {name!r} is not a class of SRC ({shown}) — correct the {column} cell, or make "
            "the class folder in SRC first (a relabel never creates a class)"
        )
    return name


def apply_edits(
    edits: list[Edit], listing: Listing, classes: list[str], label: np.ndarray, split: np.ndarray, reasons: dict
) -> None:
    """Into the drawn split: excluded files become NONE (with their reason), relabelled ones get
    their new class (in ``label``, and in the listing so the duplicate report shows it too)."""
    for edit in edits:
        for i, name in edit.targets.items():
            if split[i] == NONE:  # skipped anyway (not an image, filtered, capped), or excluded already
                continue
            if edit.option == "exclude":
                split[i] = NONE
                reasons[i] = f"excluded by --exclude {edit.file}"
                edit.applied += 1
            elif name in classes and classes.index(name) != label[i]:
                label[i] = classes.index(name)
                listing.labels[i] = listing.classes.index(name)
                edit.applied += 1
            elif name not in classes:
                raise UserError(
                    f"--relabel {edit.file}: class {name!r} was dropped (no valid training image) — "
                    "add images to it, or correct the rows that name it"
                )
    _check_classes_left(edits, classes, label, split)


def _check_classes_left(edits: list[Edit], classes: list[str], label: np.ndarray, split: np.ndarray) -> None:
    counts = np.bincount(label[split == TRAIN], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if edits and empty:
        files = " and ".join(f"--{e.option} {e.file}" for e in edits)
        raise UserError(
            f"class {empty[0]!r} has no training image left after {files} — keep some of its files out of the CSV"
        )
