"""k-fold cross-validation over the train split: `data.folds=K data.fold=i` trains on the train split
minus fold i and validates on fold i, so K runs give every train image one out-of-sample prediction
(each run's heldout.npz; trainer/training/heldout.py). The val split is not read by such a run.

The folds are a pure function of the train split's labels, the manifest's duplicate groups and
(K, data.fold_seed): every rank and every one of the K runs computes the same folds, whatever the
process count, train.seed or data.fold. They are stratified (each class spread over the folds as
evenly as whole groups allow: within one sample when no groups stand in the way), and a group of
identical or near-duplicate files (manifest.duplicates, by path) never straddles two folds: a copy
on both sides would be predicted by a model that trained on it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.format import sample_key
from shards.reader import SplitReader
from toolbox.errors import UserError

FOLD_DIR = "{fold}-fold{fold}"  # a fold's run dir in its set's folder: what configs/sweeps/kfold.yaml names them


@dataclass(frozen=True)
class Fold:
    """Which fold a run holds out, and the sizes of what it trains on and validates on."""

    fold: int
    folds: int
    train: int
    heldout: int

    def describe(self) -> str:
        return (
            f"k-fold: fold {self.fold} of {self.folds} (0-based) — training on {self.train} train samples, "
            f"validating on the {self.heldout} held out (the val split is not used)"
        )

    def summary(self) -> dict:
        """summary.json's columns for a fold run."""
        return {"fold": self.fold, "folds": self.folds, "num_train_samples": self.train}


def fold_overrides(folds: int, fold: int, parent: str | Path) -> list[str]:
    """The overrides of fold `fold`'s run of a K-fold set kept in `parent`: the same run dir as the
    fold's task of configs/sweeps/kfold.yaml (RUNS_ROOT/kfold/<i>-fold<i>)."""
    return [f"data.folds={folds}", f"data.fold={fold}", f"run.dir={Path(parent) / FOLD_DIR.format(fold=fold)}"]


FOLD_KEYS = ("data.folds", "data.fold", "data.fold_seed")


def check_same_folds(changes: dict[str, tuple]) -> None:
    """A resume whose folds differ from the checkpoint's is refused: its weights have trained on
    samples the new fold holds out (or, from a plain run, on the val split's neighbours' folds)."""
    moved = {key: change for key, change in changes.items() if key in FOLD_KEYS}
    if moved:
        said = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in moved.items())
        error = UserError(
            f"the checkpoint in this run dir was trained with other folds ({said}): its weights have seen the "
            "samples this run would hold out — give each fold its own run.dir (trainer.training.folds.fold_overrides)"
        )
        error.agreed = True  # every rank compares the same checkpoint: the main process alone says it
        raise error


def assign_folds(labels: np.ndarray, groups: Sequence[Sequence[int]], folds: int, seed: int) -> np.ndarray:
    """Each sample's fold in [0, folds). `groups`: disjoint sets of sample indices kept in one fold.

    Groups go first, biggest first, each to the fold holding the fewest samples of its classes; then
    each class's other samples, in a seeded order, one at a time to the fold with the fewest of that
    class (ties: the fold with fewest samples overall, then the lowest number). Without groups every
    class is split within one sample and the folds' sizes within one sample per class of each other.
    """
    labels = np.asarray(labels, dtype=np.int64)
    classes = int(labels.max()) + 1 if len(labels) else 0
    counts = np.zeros((folds, classes), dtype=np.int64)
    fold = np.full(len(labels), -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    kept = [np.asarray(g, dtype=np.int64) for g in groups if len(g) > 1]
    for g in sorted(rng.permutation(len(kept)).tolist(), key=lambda g: -len(kept[g])):  # stable: seeded ties
        per_class = np.bincount(labels[kept[g]], minlength=classes)
        load = counts @ per_class
        best = min(range(folds), key=lambda f: (load[f], counts[f].sum(), f))
        fold[kept[g]], counts[best] = best, counts[best] + per_class
    totals = counts.sum(1).tolist()
    for c in range(classes):
        members = np.flatnonzero((labels == c) & (fold < 0))
        heap = [(int(counts[f, c]), totals[f], f) for f in range(folds)]
        heapq.heapify(heap)
        for i in members[rng.permutation(len(members))].tolist():
            n, total, f = heapq.heappop(heap)
            fold[i], totals[f] = f, total + 1
            heapq.heappush(heap, (n + 1, total + 1, f))
    return fold


def train_groups(duplicates: list[dict], keys: list[str]) -> list[list[int]]:
    """The manifest's duplicate groups (identical and near) as train sample indices, merged where two
    share a sample (a file in an identical and a near group); members outside train are left out."""
    where = {key: i for i, key in enumerate(keys)}
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for entry in duplicates:
        members = [where[k] for k in map(sample_key, entry.get("paths", [])) if k in where]
        for i in members[1:]:
            parent[root(i)] = root(members[0])
        if members:
            root(members[0])
    merged: dict[int, list[int]] = {}
    for i in sorted(parent):
        merged.setdefault(root(i), []).append(i)
    return [g for g in merged.values() if len(g) > 1]


def touches_train(duplicates: list[dict]) -> bool:
    """Whether any group has two or more members in train: only then are the samples' keys needed."""
    return any(
        len(e.get("paths", [])) > 1 and list(e.get("splits", ["train"] * 2)).count("train") > 1 for e in duplicates
    )


def split_folds(reader: SplitReader, duplicates: list[dict], folds: int, seed: int) -> np.ndarray:
    """The train split's fold assignment: labels from the sample index, and the samples' keys (their
    first tar header each) only when the manifest has duplicate groups inside train."""
    keys = reader.keys() if touches_train(duplicates) else []
    return assign_folds(reader.labels(), train_groups(duplicates, keys), folds, seed)


class FoldReader:
    """Some of a split's samples (`members`, ascending) read as a split of their own: sample j is the
    split's sample members[j]. What the loaders, the shard-block order and the prefetcher see."""

    def __init__(self, reader: SplitReader, members: np.ndarray):
        self.reader, self.members = reader, np.asarray(members, dtype=np.int64)
        self.files = reader.files
        shards = np.searchsorted(np.asarray(reader.starts), self.members, side="right") - 1
        self.counts = np.bincount(shards, minlength=len(reader.counts)).tolist()  # per shard, in shard order

    def __len__(self) -> int:
        return len(self.members)

    @property
    def has_index(self) -> bool:
        return self.reader.has_index

    def read(self, j: int) -> dict:
        return self.reader.read(int(self.members[j]))

    def labels(self) -> np.ndarray:
        return self.reader.labels()[self.members]

    def prefetcher(self):
        inner = self.reader.prefetcher()
        return None if inner is None else FoldPrefetch(inner, self.members)


@dataclass
class FoldPrefetch:
    """The split's prefetcher, told about a fold's samples by their index in the split."""

    inner: object  # shards.source.Prefetcher
    members: np.ndarray

    def want(self, shards: list[int], protect: list[int]) -> None:
        self.inner.want(shards, protect)

    def want_samples(self, samples: list[int]) -> None:
        self.inner.want_samples(self.members[np.asarray(samples, dtype=np.int64)].tolist())


def fold_readers(reader: SplitReader, duplicates: list[dict], data) -> tuple[FoldReader, FoldReader, Fold]:
    """data (a DataConfig) with folds set -> (the train samples outside fold data.fold, those in it, the Fold)."""
    assigned = split_folds(reader, duplicates, data.folds, data.fold_seed)
    held = assigned == data.fold
    train, heldout = FoldReader(reader, np.flatnonzero(~held)), FoldReader(reader, np.flatnonzero(held))
    return train, heldout, Fold(data.fold, data.folds, len(train), len(heldout))
