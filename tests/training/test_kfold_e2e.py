"""k-fold end to end: two fold runs of the digits (one of them on 2 processes) predict every train
sample exactly once between them, keep the manifest's duplicate groups in one fold, and a plain
run's heldout.npz holds its val split exactly once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_training
from trainer.training.data import open_shards, split_reader

pytestmark = pytest.mark.e2e


def heldout(run_dir: Path) -> dict:
    with np.load(run_dir / "heldout.npz") as f:
        return {name: f[name] for name in f.files}


def with_groups(digits_shards: Path, out: Path) -> tuple[Path, list[list[str]]]:
    """A copy of the digits shards whose manifest lists two duplicate groups of train files (one
    across classes, one near group with a val member too)."""
    shutil.copytree(digits_shards, out)
    source = open_shards(str(out))
    train, val = split_reader(source, "train"), split_reader(source, "val")
    path = lambda reader, i: json.loads(reader.read(i)["json"])["path"]
    groups = [[path(train, i) for i in (0, 500, 1000)], [path(train, i) for i in (7, 1500)] + [path(val, 3)]]
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["duplicates"] = [
        {"paths": groups[0], "splits": ["train"] * 3, "classes": [], "cross_class": True, "crosses_splits": False},
        {"kind": "near", "distance": 2, "paths": groups[1], "splits": ["train", "train", "val"], "classes": []},
    ]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, groups


def test_two_folds_predict_every_train_sample_once(digits_shards, tmp_path):
    shards, groups = with_groups(digits_shards, tmp_path / "shards")
    common = [f"data.shards={shards}", "data.folds=2", "train.epochs=1", "wandb.mode=disabled"]
    runs = []
    for fold, processes in ((0, 1), (1, 2)):
        run_dir = tmp_path / "kfold" / f"{fold}-fold{fold}"
        result = run_training([*common, f"data.fold={fold}", f"run.dir={run_dir}"], processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"k-fold: fold {fold} of 2 (0-based)" in result.stdout
        assert f"fold {fold} of 2" in (run_dir / "report.md").read_text()
        runs.append(heldout(run_dir))
    train = split_reader(open_shards(str(shards)), "train")
    keys = train.keys()
    for fold, got in enumerate(runs):
        assert int(got["fold"]) == fold
        assert len(set(got["keys"].tolist())) == len(got["keys"])  # each sample once, under 2 processes too
        assert got["probs"].shape == (len(got["keys"]), 10) and got["probs"].dtype == np.float32
        assert np.allclose(got["probs"].sum(1), 1, atol=1e-4)
        assert abs(len(got["keys"]) - len(keys) / 2) <= 10  # stratified: ~half each
    first, second = (set(r["keys"].tolist()) for r in runs)
    assert not first & second and first | second == set(keys)
    labels = dict(zip(keys, train.labels().tolist()))
    paths = {}
    for got in runs:
        assert [labels[k] for k in got["keys"].tolist()] == got["labels"].tolist()
        paths.update(zip(got["paths"].tolist(), got["keys"].tolist()))
    for group in groups:  # its train members: held out together by one of the two runs
        members = {paths[p] for p in group if p in paths}
        assert len(members) >= 2 and (members <= first or members <= second)


def test_a_plain_run_writes_its_val_split_once(uninterrupted, digits_shards):
    got = heldout(uninterrupted)  # 2 processes, 179 val samples: an odd count
    val = split_reader(open_shards(str(digits_shards)), "val")
    assert int(got["fold"]) == -1
    assert sorted(got["keys"].tolist()) == sorted(val.keys()) and len(got["keys"]) == len(val)
    assert got["paths"][0].endswith(".png") and got["probs"].shape == (len(val), 10)
