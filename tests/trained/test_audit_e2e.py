"""The loop closed on a folder with labels flipped on purpose: real make_shards, two folds' heldout.npz
(synthetic probabilities that know the true class, as a good model's would), the real
`python -m trainer.audit`, then make_shards --exclude of its CSV."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from shards.manifest import Manifest
from tests.conftest import run_module
from trainer.training.data import open_shards, split_reader

pytestmark = pytest.mark.e2e

CLASSES = ("circle", "square", "stripe")
PER_CLASS = 20


def image_folder(root: Path) -> dict[str, str]:
    """SRC/<class>/<true class>_<i>.png, three files moved into another class's folder; -> the moved
    files' paths (relative to SRC) and their true class."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8) + np.uint8(60 * c)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    flipped = {}
    for i, (true, wrong) in enumerate([("circle", "square"), ("square", "stripe"), ("stripe", "circle")]):
        path = f"{wrong}/{true}_{i}.png"
        shutil.move(root / true / f"{true}_{i}.png", root / path)
        flipped[path] = true
    return flipped


def fold_run(run: Path, shards: Path, keys: list, paths: list, labels: list, fold: int) -> None:
    """A run dir as a k-fold training run leaves it: config, classes and heldout.npz, whose
    probabilities put most mass on each file's true class (its name's prefix), and on a moved
    file's the most (the class its image plainly shows: above the class's average confidence, which
    is confident learning's threshold)."""
    rng = random.Random(fold)
    probs = np.full((len(keys), len(CLASSES)), 0.05, np.float32)
    for row, path in enumerate(paths):
        true = Path(path).name.split("_")[0]
        probs[row, CLASSES.index(true)] = 0.95 if true != Path(path).parent.name else 0.7 + 0.2 * rng.random()
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"shards": str(shards)}}))
    (run / "classes.json").write_text(json.dumps(list(CLASSES)))
    np.savez_compressed(
        run / "heldout.npz",
        keys=np.array(keys),
        paths=np.array(paths),
        labels=np.array(labels, np.int64),
        probs=probs / probs.sum(axis=1, keepdims=True),
        fold=np.int64(fold),
    )


def test_audit_finds_the_flipped_labels_and_exclude_removes_them(tmp_path):
    flipped = image_folder(tmp_path / "src")
    shards = tmp_path / "shards"
    made = run_module("launch.make_shards", tmp_path / "src", shards, "--min-shards", "1", "--workers", "1")
    assert made.returncode == 0, made.stderr
    reader = split_reader(open_shards(str(shards)), "train")
    samples = [reader.read(i) for i in range(len(reader))]
    keys = [s["__key__"] for s in samples]
    paths = [json.loads(s["json"])["path"] for s in samples]
    labels = [int(s["cls"]) for s in samples]
    for fold in (0, 1):  # two folds: every other train sample each
        part = slice(fold, None, 2)
        fold_run(tmp_path / "kfold" / f"fold-{fold}", shards, keys[part], paths[part], labels[part], fold)

    audit = run_module("trainer.audit", tmp_path / "kfold" / "fold-0", tmp_path / "kfold" / "fold-1")
    assert audit.returncode == 0, audit.stderr
    out = tmp_path / "kfold" / "audit"
    rows = list(csv.DictReader((out / "label_issues.csv").open()))
    assert list(rows[0]) == ["key", "path", "given", "suggested", "self_confidence", "rank"]
    train_flips = {p for p in flipped if p in paths}  # a flipped file drawn into val is not audited
    top = {row["path"] for row in rows[: len(train_flips)]}
    assert train_flips and top == train_flips  # every flip, and nothing else, at the top
    assert {row["path"]: row["suggested"] for row in rows if row["path"] in flipped} == {
        p: flipped[p] for p in train_flips
    }
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    assert (out / "label_issues.png").stat().st_size > 0 and (out / "summary.md").is_file()
    assert f"{len(paths)} samples audited" in audit.stdout and "launch.make_shards" in audit.stdout

    fixed = tmp_path / "fixed"
    exclude = out / "label_issues.csv"
    rebuilt = run_module("launch.make_shards", tmp_path / "src", fixed, "--min-shards", "1", "--exclude", exclude)
    assert rebuilt.returncode == 0, rebuilt.stderr
    before, after = Manifest.load(shards), Manifest.load(fixed)
    assert after.edits[0]["applied"] == len(rows) and after.edits[0]["unmatched"] == 0
    assert after.splits["train"].num_samples == before.splits["train"].num_samples - len(rows)
    assert after.splits["val"].num_samples == before.splits["val"].num_samples  # the rest keep their split
    assert after.sha256 != before.sha256
    left = split_reader(open_shards(str(fixed)), "train")
    assert not train_flips & {json.loads(left.read(i)["json"])["path"] for i in range(len(left))}
