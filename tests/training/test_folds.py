"""trainer/training/folds.py: the k-fold assignment (stratified, seeded, duplicate groups kept whole,
the same for any process count), the fold's view of the train split, the config keys, the sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shards.format import sample_key
from tests.conftest import REPO
from toolbox.errors import UserError
from trainer.runs import sweep
from trainer.training.config import ConfigError, load_config
from trainer.training.data import EvalOrder, ShardBlocks, open_shards, split_reader
from trainer.training.folds import (
    FoldReader,
    assign_folds,
    check_same_folds,
    fold_overrides,
    fold_readers,
    touches_train,
    train_groups,
)


def imbalanced_labels(n: int, classes: int, seed: int) -> np.ndarray:
    weights = np.arange(1, classes + 1, dtype=float)
    return np.random.default_rng(seed).choice(classes, n, p=weights / weights.sum())


def per_class(fold: np.ndarray, labels: np.ndarray, folds: int) -> np.ndarray:
    """[class, fold] counts."""
    return np.array([np.bincount(fold[labels == c], minlength=folds) for c in range(labels.max() + 1)])


@pytest.mark.parametrize("folds", [2, 3, 5, 7])
def test_every_sample_in_one_fold_each_class_split_within_one(folds):
    labels = imbalanced_labels(1003, 6, folds)
    fold = assign_folds(labels, [], folds, seed=0)
    assert fold.shape == labels.shape and set(fold.tolist()) == set(range(folds))
    counts = per_class(fold, labels, folds)
    assert (counts.max(1) - counts.min(1) <= 1).all()
    sizes = np.bincount(fold, minlength=folds)
    assert sizes.max() - sizes.min() <= 1  # the remainders go to the smallest folds


def test_folds_are_a_function_of_the_fold_seed():
    labels = imbalanced_labels(500, 4, 0)
    assert (assign_folds(labels, [], 5, seed=3) == assign_folds(labels, [], 5, seed=3)).all()
    assert (assign_folds(labels, [], 5, seed=3) != assign_folds(labels, [], 5, seed=4)).any()


def test_groups_stay_in_one_fold_and_the_classes_stay_balanced():
    labels = imbalanced_labels(2000, 5, 1)
    rng = np.random.default_rng(2)
    members = rng.permutation(2000)[:300]
    groups = [members[i : i + 3].tolist() for i in range(0, 300, 3)]  # 100 disjoint groups of 3, any classes
    fold = assign_folds(labels, groups, 4, seed=0)
    for group in groups:
        assert len(set(fold[group].tolist())) == 1
    counts = per_class(fold, labels, 4)
    assert (counts.max(1) - counts.min(1) <= 1).all()  # the other samples level what the groups left


def test_one_big_group_is_never_split():
    labels = np.array([0] * 10 + [1] * 10)
    fold = assign_folds(labels, [list(range(8))], 2, seed=0)
    assert len(set(fold[:8].tolist())) == 1


def test_manifest_groups_become_train_indices_merged_where_they_share_a_file():
    paths = [f"cls{i % 3}/img{i}.png" for i in range(10)]
    keys = [sample_key(p) for p in paths]
    duplicates = [
        {"paths": ["cls0/img0.png", "cls1/img4.png"], "splits": ["train", "train"]},
        {"kind": "near", "paths": ["cls1/img4.png", "cls2/img8.png", "val/x.png"], "splits": ["train"] * 2 + ["val"]},
        {"paths": ["cls1/img1.png", "elsewhere.png"], "splits": ["train", "val"]},
    ]
    assert train_groups(duplicates, keys) == [[0, 4, 8]]
    assert touches_train(duplicates) and not touches_train(duplicates[2:])
    assert not touches_train([])


def test_split_reader_keys_are_the_samples_keys(digits_shards):
    reader = split_reader(open_shards(str(digits_shards)), "val")
    assert reader.keys() == [reader.read(i)["__key__"] for i in range(len(reader))]


def test_a_fold_reads_its_members_as_a_split_and_the_ranks_cover_it_once(digits_shards):
    source = open_shards(str(digits_shards))
    reader = split_reader(source, "train")
    data = load_config(REPO / "configs/demo.yaml", [f"data.shards={digits_shards}", "data.folds=3", "data.fold=1"]).data
    train, held, fold = fold_readers(reader, source.manifest.duplicates, data)
    assert (fold.train, fold.heldout) == (len(train), len(held)) and len(train) + len(held) == len(reader)
    assert not set(train.members.tolist()) & set(held.members.tolist())
    assert held.read(5)["__key__"] == reader.read(int(held.members[5]))["__key__"]
    assert (held.labels() == reader.labels()[held.members]).all()
    assert sum(held.counts) == len(held)
    for world in (1, 2, 3):  # the fold does not depend on the rank; evaluation deals it out once
        again = fold_readers(reader, source.manifest.duplicates, data)[1]
        seen = [i for rank in range(world) for batch in EvalOrder(len(again), 7, rank, world) for i, _, _ in batch]
        assert sorted(seen) == list(range(len(held))) and (again.members == held.members).all()


def test_shard_blocks_over_a_fold_read_only_its_samples():
    class Split:  # three shards of 4 samples
        starts, counts = [0, 4, 8, 12], [4, 4, 4]
        files = None

    members = np.array([1, 2, 5, 9, 10, 11])
    view = FoldReader(Split(), members)
    assert view.counts == [2, 1, 3]
    shards, samples = ShardBlocks(view.counts, [10, 10, 10], 20).epoch(torch.Generator().manual_seed(0))
    assert sorted(torch.cat(samples).tolist()) == list(range(6))


def test_fold_keys_are_checked_in_one_line():
    def load(*overrides):
        return load_config(REPO / "configs/demo.yaml", list(overrides))

    assert load("data.folds=5", "data.fold=4").data.fold == 4
    for overrides, message in (
        (["data.fold=2"], "data.fold=2 needs data.folds=K"),
        (["data.folds=1"], "data.folds=1: k-fold needs at least 2 folds"),
        (["data.folds=3", "data.fold=3"], "data.fold=3 is not a fold of data.folds=3 — pick 0 to 2"),
        (["data.folds=3", "data.fold=-1"], "data.fold=-1 is not a fold"),
    ):
        with pytest.raises(ConfigError, match=message) as e:
            load(*overrides)
        assert "\n" not in str(e.value)


def test_a_resume_with_other_folds_is_refused():
    check_same_folds({"optim.lr": (0.1, 0.2)})
    with pytest.raises(UserError, match=r"data.fold 0 -> 1.*its own run.dir"):
        check_same_folds({"data.fold": (0, 1)})


def test_the_kfold_sweep_runs_the_folds_in_one_folder_as_fold_overrides_names_them(tmp_path):
    spec = sweep.read_sweep(REPO / "configs/sweeps/kfold.yaml")
    folds = sweep.point(spec, 0)["data.folds"]
    assert spec.size == folds == 5
    for i in range(folds):
        words = sweep.task_overrides(spec, i, tmp_path)
        assert words[:3] == fold_overrides(folds, i, tmp_path / "kfold")
        config = load_config(REPO / "configs/demo.yaml", words)
        assert (config.data.folds, config.data.fold) == (5, i)
    with pytest.raises(UserError, match="out of range"):
        sweep.point(spec, folds)
