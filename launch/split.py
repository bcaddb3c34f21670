"""Stratified, seeded, duplicate-aware train/val split, per-class caps, and the shard plan.

Identical files (same bytes) form one unit that goes to one split as a whole, so no image is
both trained and validated on. Each class draws from its own random stream, seeded by the
seed and the class name, so adding a class or a file to one class does not reshuffle the
others.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

TRAIN, VAL, DROPPED = 0, 1, -1


def duplicate_groups(hashes: Sequence[bytes], candidates: Sequence[int]) -> list[list[int]]:
    """Groups (each sorted, in order of first member) of candidate indices with equal hashes."""
    by_hash: dict[bytes, list[int]] = defaultdict(list)
    for i in candidates:
        by_hash[hashes[i]].append(i)
    return [group for group in by_hash.values() if len(group) > 1]


def assign_splits(
    labels: Sequence[int],
    hashes: Sequence[bytes],
    candidates: Sequence[int],
    class_names: Sequence[str],
    val_fraction: float,
    seed: int,
    max_per_class: int | None = None,
    given: Sequence[int] | None = None,
) -> tuple[dict[int, int], list[int]]:
    """-> ({index: TRAIN or VAL} for every kept candidate, [indices dropped by the cap]).

    With ``given`` (a pre-split SRC: TRAIN/VAL per index) the user's split is kept and the
    cap applies to the training files only.
    """
    capped: list[int] = []
    if max_per_class is not None:
        candidates, capped = _cap(labels, hashes, candidates, class_names, seed, max_per_class, given)
    split: dict[int, int] = {}
    units = _units(labels, hashes, candidates, given)
    for label in sorted(units):
        rng = random.Random(f"{seed}/{class_names[label]}")
        for fixed, class_units in sorted(units[label].items()):
            rng.shuffle(class_units)
            if fixed is None:
                total = sum(map(len, class_units))
                n_val = min(round(val_fraction * total), total - 1) if total > 1 else 0
                val_units, train_units = _take(class_units, n_val)
                split.update((i, VAL) for unit in val_units for i in unit)
                split.update((i, TRAIN) for unit in train_units for i in unit)
            else:
                split.update((i, fixed) for unit in class_units for i in unit)
    return split, sorted(capped)


def _cap(labels, hashes, candidates, class_names, seed, cap, given) -> tuple[list[int], list[int]]:
    """At most ``cap`` files per class (of its training files when the split is given), chosen
    at random but keeping identical files of a class together. -> (kept, dropped)."""
    per_class: dict[int, dict[bytes, list[int]]] = defaultdict(dict)
    kept = []
    for i in candidates:
        if given is not None and given[i] != TRAIN:
            kept.append(i)
        else:
            per_class[labels[i]].setdefault(hashes[i], []).append(i)
    dropped = []
    for label in sorted(per_class):
        units = sorted(per_class[label].values())
        random.Random(f"{seed}/{class_names[label]}/cap").shuffle(units)
        taken, rest = _take(units, cap)
        kept.extend(i for unit in taken for i in unit)
        dropped.extend(i for unit in rest for i in unit)
    return sorted(kept), dropped


def _units(labels, hashes, candidates, given) -> dict[int, dict[int | None, list[list[int]]]]:
    """label -> given split (None if free) -> units; a unit is a group of identical files.

    A unit belongs to the class (and given split) of its first file; in a pre-split SRC
    identical files are only grouped within one given split, since the user's split stands.
    """
    groups: dict[tuple, list[int]] = {}
    for i in candidates:
        fixed = None if given is None else given[i]
        groups.setdefault((hashes[i], fixed), []).append(i)
    units: dict[int, dict[int | None, list[list[int]]]] = defaultdict(lambda: defaultdict(list))
    for (_, fixed), unit in groups.items():
        units[labels[unit[0]]][fixed].append(unit)
    for per_split in units.values():
        for class_units in per_split.values():
            class_units.sort()  # a fixed order before the seeded shuffle, whatever the dict order
    return units


def _take(units: list[list[int]], n: int) -> tuple[list[list[int]], list[list[int]]]:
    """Units in order while they fit in ``n`` files; the rest."""
    taken, rest, count = [], [], 0
    for unit in units:
        if count + len(unit) <= n:
            taken.append(unit)
            count += len(unit)
        else:
            rest.append(unit)
    return taken, rest


def shard_count(num_samples: int, num_bytes: int, samples_per_shard: int | None, shard_bytes: int, min_shards: int) -> int:
    """Enough shards for the size limits and at least ``min_shards`` (never an empty one)."""
    if num_samples == 0:
        return 0
    by_count = math.ceil(num_samples / samples_per_shard) if samples_per_shard else 1
    return min(num_samples, max(min_shards, by_count, math.ceil(num_bytes / shard_bytes)))


def plan_shards(indices: Sequence[int], num_shards: int, seed: int, split: str) -> list[list[int]]:
    """Shuffle a split's samples (so each shard mixes classes) and cut it into ``num_shards``
    runs whose lengths differ by at most one: every rank and loader worker gets a fair share."""
    order = sorted(indices)
    random.Random(f"{seed}/{split}/order").shuffle(order)
    base, extra = divmod(len(order), num_shards) if num_shards else (0, 0)
    shards, start = [], 0
    for k in range(num_shards):
        end = start + base + (k < extra)
        shards.append(order[start:end])
        start = end
    return shards
