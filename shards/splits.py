"""The splits a dataset has, and how an image folder names them.

A shards folder holds train and val (what training reads) and, when the source had one, test
(held out: only `trainer.evaluate --split test` reads it). A source image folder (make_shards'
SRC, evaluate's --data) is pre-split when its top-level folders name splits, compared without
regard to case: train/ (required), at most one of val/, valid/, validation/, and test/. Nothing
else may sit beside them; a folder of only split-like names in another mix (val/ + test/,
training/ + testing/) is refused with what was found, never taken for classes named so.
"""

from __future__ import annotations

from collections.abc import Iterable

TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)  # in this order everywhere: launch/split.py's codes 0, 1, 2
TRAINING = (TRAIN, VAL)  # what training reads; test is never opened by it
# A top-level folder name (lower-cased) -> the split it is.
FOLDER_SPLITS = {"train": TRAIN, "val": VAL, "valid": VAL, "validation": VAL, "test": TEST}
# Names that look like splits but are not read as one: said so, never taken for a class.
SPLIT_LIKE = ("training", "testing", "validate", "eval", "dev")
EXPECTED = "SRC/train/<class>/ with SRC/val/<class>/ (or valid/, validation/) and/or SRC/test/<class>/"


class LayoutError(ValueError):
    """Top-level folders that are neither class folders nor a pre-split layout; str() says what was found."""


def split_folders(names: Iterable[str]) -> dict[str, str] | None:
    """The top-level folder names of an image folder -> {split: folder name} when it is pre-split,
    None when it holds class folders; LayoutError for split-like names in a mix we do not read.

    A folder called train or test among other folders is a class (vehicles have trains): only
    train/ beside a val or test folder and other folders is refused, as a pre-split SRC with
    extra folders whose images would be silently left out.
    """
    names = sorted(names)
    named = [n for n in names if n.lower() in FOLDER_SPLITS or n.lower() in SPLIT_LIKE]
    others = [n for n in names if n not in named]
    trains = [n for n in named if n.lower() == TRAIN]
    if not named or (others and not (trains and len(named) > 1)):
        return None
    if others:
        raise LayoutError(f"has split folders ({_listed(named)}) beside other folders ({_listed(others)})")
    unknown = [n for n in named if n.lower() not in FOLDER_SPLITS]
    if unknown:
        are = "is not a split name" if len(unknown) == 1 else "are not split names"
        raise LayoutError(f"has {_listed(named)}, but {_listed(unknown)} {are} (train, val, valid, validation, test)")
    by_split: dict[str, list[str]] = {}
    for name in named:
        by_split.setdefault(FOLDER_SPLITS[name.lower()], []).append(name)
    if TRAIN not in by_split:
        raise LayoutError(f"has {_listed(named)} but no train/")
    for split, folders in by_split.items():
        if len(folders) > 1:
            raise LayoutError(f"has {len(folders)} {split} folders ({_listed(folders)}), not one")
    return {split: by_split[split][0] for split in SPLITS if split in by_split}


def _listed(names: list[str]) -> str:
    return ", ".join(f"{n}/" for n in names)
