import os

from toolbox.walk import walk


def test_links_are_followed_once_and_never_up_out_of_the_given_folder(tmp_path):
    root = tmp_path / "photos"
    (root / "a" / ".hidden").mkdir(parents=True)
    (root / "a" / "1.jpg").write_bytes(b"x")
    (root / "a" / ".hidden" / "2.jpg").write_bytes(b"x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "3.jpg").write_bytes(b"x")
    os.symlink(outside, root / "linked")  # a sibling outside: followed
    os.symlink(root / "a", root / "again")  # a second link to one folder: listed once
    os.symlink("/", root / "everything")  # a link to an ancestor: never entered
    os.symlink(tmp_path, root / "a" / "parent")  # nor a parent
    found = {os.path.relpath(folder, root): files for folder, files in walk(root)}
    assert found == {".": [], "a": ["1.jpg"], "linked": ["3.jpg"]}


def test_a_folder_inside_the_given_one_is_walked_but_not_a_link_from_it_to_above(tmp_path):
    src = tmp_path / "src"
    (src / "cats").mkdir(parents=True)
    (src / "cats" / "c.png").write_bytes(b"x")
    os.symlink("/", src / "dogs")  # a class folder linked to / (make_shards scanned the machine)
    assert [files for _, files in walk(src / "cats", given=src)] == [["c.png"]]
    assert list(walk(src / "dogs", given=src)) == []
