"""make_shards --exclude/--relabel: a label-issue CSV matched by path or key, applied after the
split, refused in one line when it names nothing or a class that does not exist."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from launch.edits import apply_edits, read_edits
from launch.scan import Listing
from launch.split import NONE, TRAIN, VAL
from shards.format import sample_key
from toolbox.errors import UserError

HEADER = "key,path,given,suggested,self_confidence,rank\n"


def listing() -> Listing:
    paths = ["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png", "=x/e.png", "=x/f.png"]
    return Listing(Path("src"), "folders", ["=x", "cat", "dog"], relpaths=paths, labels=[1, 1, 2, 2, 0, 0])


def edits(tmp_path: Path, text: str, exclude=True, relabel=False):
    path = tmp_path / "issues.csv"
    path.write_text(text, encoding="utf-8")
    args = argparse.Namespace(exclude=str(path) if exclude else None, relabel=str(path) if relabel else None)
    return read_edits(args, listing())


def test_rows_match_by_path_or_by_key_and_unmatched_rows_are_counted(tmp_path):
    text = (
        HEADER
        + ",cat/a.png,cat,dog,0.1,1\n"
        + f"{sample_key('dog/c.png')},,dog,cat,0.2,2\n"
        + ",cat/zz.png,cat,dog,0.3,3\n"
    )
    (edit,) = edits(tmp_path, text)
    assert edit.targets == {0: None, 2: None} and edit.rows == 3 and edit.unmatched == 1
    assert "1 of its 3 rows matched no file" in edit.note()


def test_a_formula_guarded_path_still_matches(tmp_path):
    (edit,) = edits(tmp_path, HEADER + ",'=x/e.png,'=x,cat,0.1,1\n")
    assert list(edit.targets) == [4]


def test_a_file_that_matches_nothing_is_one_line(tmp_path):
    with pytest.raises(UserError, match="none of its 1 rows names a file of SRC"):
        edits(tmp_path, HEADER + ",bird/q.png,bird,cat,0.1,1\n")
    with pytest.raises(UserError, match="no path or key column"):
        edits(tmp_path, "name,class\na,b\n")
    with pytest.raises(UserError, match="cannot be read"):
        read_edits(argparse.Namespace(exclude=str(tmp_path / "missing.csv"), relabel=None), listing())


def test_relabel_takes_new_class_over_suggested_and_refuses_an_unknown_class(tmp_path):
    (edit,) = edits(tmp_path, HEADER.strip() + ",new_class\n,cat/a.png,cat,dog,0.1,1,'=x\n", False, True)
    assert edit.targets == {0: "=x"}
    with pytest.raises(UserError, match="class 'bird' is not a class of SRC .* never creates a class"):
        edits(tmp_path, HEADER + ",cat/a.png,cat,bird,0.1,1\n", False, True)


def test_edits_apply_after_the_split_and_leave_the_other_files_alone(tmp_path):
    text = HEADER + ",cat/a.png,cat,dog,0.1,1\n,dog/d.png,dog,cat,0.1,2\n"
    exclude, relabel = edits(tmp_path, text, True, True)
    where = listing()
    label = np.array([1, 1, 2, 2, 0, 0])
    split = np.array([TRAIN, TRAIN, TRAIN, VAL, TRAIN, TRAIN], np.int8)
    reasons = {}
    exclude.targets, relabel.targets = {0: None}, {0: "dog", 3: "cat"}  # a.png excluded (so not moved), d.png moved
    apply_edits([exclude, relabel], where, ["=x", "cat", "dog"], label, split, reasons)
    assert split.tolist() == [NONE, TRAIN, TRAIN, VAL, TRAIN, TRAIN]
    assert label.tolist() == [1, 1, 2, 1, 0, 0] and where.labels[3] == 1
    assert reasons == {0: f"excluded by --exclude {exclude.file}"}
    assert exclude.record()["applied"] == 1 and relabel.record()["applied"] == 1
    assert set(exclude.record()) == {"option", "file", "sha256", "rows", "matched", "unmatched", "applied"}


def test_an_edit_that_empties_a_class_is_refused(tmp_path):
    (edit,) = edits(tmp_path, HEADER + ",=x/e.png,,,,\n,=x/f.png,,,,\n")
    split = np.full(6, TRAIN, np.int8)
    with pytest.raises(UserError, match="class '=x' has no training image left"):
        apply_edits([edit], listing(), ["=x", "cat", "dog"], np.array([1, 1, 2, 2, 0, 0]), split, {})
