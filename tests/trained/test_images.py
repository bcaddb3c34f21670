"""evaluate's image folders: a pre-split one is read by make_shards' split-folder rules."""

from __future__ import annotations

import pytest

from toolbox.errors import UserError
from trainer.trained.images import labelled_images


def folder(root, *paths: str):
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")  # listed by name only: nothing here is decoded
    return root


def test_the_split_asked_for_is_read_from_a_pre_split_folder_whatever_its_case(tmp_path):
    root = folder(tmp_path, "Train/a/1.png", "Train/b/2.png", "TEST/a/3.png", "TEST/b/4.jpg", "TEST/b/5.png")
    items, read = labelled_images(root, ["a", "b"], "test")
    assert read == root / "TEST" and [(p.name, label) for p, label in items] == [
        ("3.png", 0),
        ("4.jpg", 1),
        ("5.png", 1),
    ]
    assert labelled_images(root, ["a", "b"], "train")[1] == root / "Train"


def test_classes_named_like_splits_are_classes(tmp_path):
    root = folder(tmp_path, "train/1.png", "test/2.png")
    items, read = labelled_images(root, ["test", "train"], "val")
    assert read == root and len(items) == 2


@pytest.mark.parametrize(
    "paths, split, message",
    [
        (
            ["train/a/1.png", "test/a/2.png"],
            "val",
            "has no val folder (it has train/, test/) — pass --split train or --split test",
        ),
        (["val/a/1.png", "test/a/2.png"], "test", "has test/, val/ but no train/ — pass a folder of class folders"),
    ],
)
def test_a_split_the_folder_lacks_or_a_mix_is_one_line(tmp_path, paths, split, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        labelled_images(folder(tmp_path, *paths), ["a"], split)
