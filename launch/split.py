"""Stratified, seeded, duplicate-aware train/val split, per-class caps, and the shard plan.

Identical files (same bytes) form one unit that goes to one split as a whole, so no image is
both trained and validated on. Each class draws from its own random stream, seeded by the
seed and the class name, so adding a class or a file to one class does not reshuffle the
others. Everything per file is a numpy array (a few bytes a file): ImageNet's 1.28 M files
must not become millions of Python objects.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

TRAIN, VAL, TEST, NONE = 0, 1, 2, -1  # indices into shards.splits.SPLITS; NONE: not written


def same_bytes_groups(digests: np.ndarray) -> np.ndarray:
    """(N, 32) uint8 digests -> (N,) int64 ids, equal exactly where the digests are equal."""
    if len(digests) == 0:
        return np.zeros(0, np.int64)
    _, ids = np.unique(np.ascontiguousarray(digests).view("V32").ravel(), return_inverse=True)
    return ids.astype(np.int64).ravel()


def duplicate_groups(group: np.ndarray, candidates: np.ndarray) -> list[np.ndarray]:
    """Groups of candidate indices with equal ``group`` ids (2+ members each, ascending),
    ordered by their first member."""
    candidates = np.sort(np.asarray(candidates, np.int64))
    if not len(candidates):
        return []
    ids = group[candidates]
    order = np.argsort(ids, kind="stable")
    _, starts, counts = np.unique(ids[order], return_index=True, return_counts=True)
    groups = [candidates[order[s : s + c]] for s, c in zip(starts, counts) if c > 1]
    return sorted(groups, key=lambda g: int(g[0]))


def assign_splits(
    labels: np.ndarray,
    group: np.ndarray,
    candidates: np.ndarray,
    class_names: Sequence[str],
    val_fraction: float,
    seed: int,
    max_per_class: int | None = None,
    given: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """-> (split per file: TRAIN, VAL or NONE for non-candidates, indices dropped by the cap).

    ``group``: equal ids for identical files. With ``given`` (a pre-split SRC: TRAIN/VAL per
    file) the user's split is kept and the cap applies to the training files only.
    """
    labels, group = np.asarray(labels, np.int64), np.asarray(group, np.int64)
    candidates = np.sort(np.asarray(candidates, np.int64))
    fixed = None if given is None else np.asarray(given, np.int64)
    capped = np.zeros(0, np.int64)
    if max_per_class is not None:
        pool = candidates if fixed is None else candidates[fixed[candidates] == TRAIN]
        same = labels[pool] * (int(group.max(initial=0)) + 1) + group[pool]  # identical and same class
        unit, sizes, per_class = _units(labels, same, pool)
        keep = np.zeros(len(sizes), bool)
        for label, units in per_class:
            rng = random.Random(f"{seed}/{class_names[label]}/cap")
            keep[_fill(_shuffled(units, rng), sizes, max_per_class)] = True
        capped = pool[~keep[unit]]
        candidates = np.setdiff1d(candidates, capped)
    split = np.full(len(labels), NONE, np.int8)
    if not len(candidates):
        return split, capped
    # A unit: identical files (within one given split when the split is given), owned by the
    # class of its first file.
    key = group[candidates] if fixed is None else group[candidates] * 2 + fixed[candidates]
    unit, sizes, per_class = _units(labels, key, candidates)
    if fixed is not None:
        split[candidates] = fixed[candidates]
        return split, capped
    unit_split = np.full(len(sizes), TRAIN, np.int8)
    for label, units in per_class:
        order = _shuffled(units, random.Random(f"{seed}/{class_names[label]}"))
        total = int(sizes[units].sum())
        n_val = min(round(val_fraction * total), total - 1) if total > 1 else 0
        unit_split[_fill(order, sizes, n_val)] = VAL
    split[candidates] = unit_split[unit]
    return split, capped


def _units(labels: np.ndarray, key: np.ndarray, members: np.ndarray):
    """Files with equal ``key`` form a unit owned by the class of its first (lowest) index.

    -> (unit id per member, unit sizes, [(label, that class's unit ids by first member)]).
    """
    if not len(members):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), []
    _, unit, sizes = np.unique(key, return_inverse=True, return_counts=True)
    unit = unit.ravel()
    first = np.full(len(sizes), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, unit, members)
    home = labels[first]
    order = np.lexsort((first, home))  # by class, then by first member
    bounds = np.flatnonzero(np.diff(home[order])) + 1
    per_class = [(int(home[part[0]]), part.tolist()) for part in np.split(order, bounds)]
    return unit, sizes, per_class


def _shuffled(units: list[int], rng: random.Random) -> list[int]:
    rng.shuffle(units)
    return units


def _fill(order: list[int], sizes: np.ndarray, n: int) -> list[int]:
    """Units taken in order while they fit in ``n`` files (a unit too big is passed over)."""
    taken, count = [], 0
    for u in order:
        if count + sizes[u] <= n:
            taken.append(u)
            count += int(sizes[u])
    return taken


def shard_count(
    num_samples: int, num_bytes: int, samples_per_shard: int | None, shard_bytes: int, min_shards: int
) -> int:
    """Enough shards for the size limits and at least ``min_shards`` (never an empty one)."""
    if num_samples == 0:
        return 0
    by_count = math.ceil(num_samples / samples_per_shard) if samples_per_shard else 1
    return min(num_samples, max(min_shards, by_count, math.ceil(num_bytes / shard_bytes)))


def plan_shards(indices: Sequence[int], num_shards: int, seed: int, split: str) -> list[list[int]]:
    """Shuffle a split's samples (so each shard mixes classes) and cut it into ``num_shards``
    runs whose lengths differ by at most one: every rank and loader worker gets a fair share."""
    order = sorted(int(i) for i in indices)
    random.Random(f"{seed}/{split}/order").shuffle(order)
    base, extra = divmod(len(order), num_shards) if num_shards else (0, 0)
    shards, start = [], 0
    for k in range(num_shards):
        end = start + base + (k < extra)
        shards.append(order[start:end])
        start = end
    return shards
