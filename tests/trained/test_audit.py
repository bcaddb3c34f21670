"""trainer.audit without shards or models: merging the folds' heldout.npz, what is refused, the
ranking, the CSV, the k-fold sweep's plan."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from toolbox.errors import UserError
from trainer.trained.audit import (
    COLUMNS,
    Heldout,
    Runs,
    check_once,
    confused_pairs,
    default_out,
    fold_plan,
    merge_runs,
    rank_issues,
    write_csv,
)

CLASSES = ["cat", "dog", "=cmd"]


def run_dir(path: Path, keys: list[str], fold: int, classes=CLASSES, shards="shards", labels=None) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"data": {"shards": shards}}))
    (path / "classes.json").write_text(json.dumps(classes))
    n = len(keys)
    labels = np.arange(n) % len(classes) if labels is None else np.asarray(labels)
    probs = np.full((n, len(classes)), 0.1, np.float32)
    probs[np.arange(n), labels] = 0.8
    np.savez_compressed(
        path / "heldout.npz",
        keys=np.array(keys),
        paths=np.array([f"{CLASSES[label]}/{k}.png" for k, label in zip(keys, labels)]),
        labels=labels.astype(np.int64),
        probs=probs,
        fold=np.int64(fold),
    )
    return path


def test_folds_merge_into_one_set(tmp_path):
    a = run_dir(tmp_path / "fold-0", ["a", "b", "c"], 0)
    b = run_dir(tmp_path / "fold-1", ["d", "e"], 1)
    runs = merge_runs([a, b])
    assert list(runs.heldout.keys) == ["a", "b", "c", "d", "e"]
    assert runs.heldout.probs.shape == (5, 3) and list(runs.heldout.folds) == [0, 0, 0, 1, 1]
    assert runs.classes == CLASSES and runs.shards == "shards"
    assert default_out([a, b]) == tmp_path.absolute() / "audit" and default_out([a]) == a / "audit"


def test_a_sample_held_out_twice_is_refused(tmp_path):
    a = run_dir(tmp_path / "fold-0", ["a", "b"], 0)
    b = run_dir(tmp_path / "fold-1", ["b", "c"], 1)
    with pytest.raises(UserError, match="sample b is held out by .*fold-0 and .*fold-1"):
        merge_runs([a, b])
    with pytest.raises(UserError, match="held out by"):
        check_once(np.array(["x", "x"]), [a, a])


@pytest.mark.parametrize("other", [{"classes": ["cat", "dog", "bird"]}, {"shards": "elsewhere"}])
def test_runs_of_other_classes_or_shards_are_refused(tmp_path, other):
    a = run_dir(tmp_path / "fold-0", ["a"], 0)
    b = run_dir(tmp_path / "fold-1", ["b"], 1, **other)
    with pytest.raises(UserError, match="audit the folds of one k-fold together"):
        merge_runs([a, b])


def test_a_run_without_heldout_is_one_line_naming_the_fix(tmp_path):
    a = run_dir(tmp_path / "old", ["a"], -1)
    (a / "heldout.npz").unlink()
    with pytest.raises(UserError, match="heldout.npz not found .* --folds DIR --config CONFIG"):
        merge_runs([a])
    (a / "heldout.npz").write_bytes(b"not an npz")
    with pytest.raises(UserError, match="damaged"):
        merge_runs([a])


def heldout_with_flips(n=300, classes=3, flips=(5, 50, 120)) -> Heldout:
    rng = np.random.default_rng(0)
    true = np.arange(n) % classes
    probs = rng.dirichlet(np.ones(classes) * 0.3, n).astype(np.float32) * 0.2
    probs[np.arange(n), true] += 0.8
    flips = list(flips)
    probs[flips] = 0.05 / (classes - 1)  # a moved file plainly shows its class: above the class's mean confidence
    probs[flips, true[flips]] = 0.95
    labels = true.copy()
    labels[flips] = (true[flips] + 1) % classes
    keys = np.array([f"k{i}" for i in range(n)])
    return Heldout(keys, np.array([f"p/{k}.png" for k in keys]), labels, probs, np.zeros(n, np.int64))


def test_ranked_issues_are_the_flips_least_self_confident_first():
    h = heldout_with_flips()
    ranked = rank_issues(h)
    assert set(ranked.tolist()) == {5, 50, 120}
    confidence = h.probs[ranked, h.labels[ranked]]
    assert (np.diff(confidence) >= 0).all()


def test_confused_pairs_are_the_largest_off_diagonal_cells():
    h = heldout_with_flips(flips=(0, 3, 6, 1))  # 0, 3, 6: cat labelled dog; 1: dog labelled =cmd
    pairs = confused_pairs(h, 3)
    assert pairs[0] == (1, 0, 3, 102) and pairs[1][:3] == (2, 1, 1)


def test_csv_has_the_interface_columns_and_is_formula_safe(tmp_path):
    h = heldout_with_flips(flips=(2,))  # true class 2 "=cmd", labelled "cat"
    runs = Runs([tmp_path], CLASSES, "shards", h)
    path = write_csv(tmp_path / "label_issues.csv", runs, np.array([2, 7]))
    rows = list(csv.reader(path.open()))
    assert tuple(rows[0]) == COLUMNS
    assert rows[1][:4] == ["k2", "p/k2.png", "cat", "'=cmd"] and rows[1][5] == "1"
    assert float(rows[1][4]) == pytest.approx(float(h.probs[2, 0]), abs=1e-4)
    assert rows[2][5] == "2" and len(rows) == 3


def test_fold_plan_reads_the_kfold_sweep(tmp_path):
    sweep = tmp_path / "kfold.yaml"
    parameters = {"data.folds": {"value": 3}, "data.fold": {"values": [0, 1, 2]}, "train.epochs": {"value": 5}}
    sweep.write_text(yaml.safe_dump({"method": "grid", "parameters": parameters}))
    assert fold_plan(sweep) == (["data.folds=3", "train.epochs=5"], [0, 1, 2])
    sweep.write_text(yaml.safe_dump({"parameters": {"optim.lr": {"values": [0.1]}}}))
    with pytest.raises(UserError, match="is not a k-fold sweep"):
        fold_plan(sweep)
