"""Image files a user hands to evaluate and predict: read safely (regular files only, up to a size
limit, decoded to upright RGB), listed under folders, and labelled by class folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from shards.format import SOURCE_EXTS, decode_rgb
from shards.splits import EXPECTED, LayoutError, split_folders
from toolbox.errors import DataError, UserError, first_line
from toolbox.walk import walk
from trainer.training.samples import Sample

MAX_FILE_BYTES = 256 * 10**6  # an image larger than this is refused unread (predict: --max-file-size)
KINDS = {  # what a path is when it is not a regular file, as a row's error says it
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def read_image(path: Path, max_bytes: int = MAX_FILE_BYTES):
    """An 8-bit RGB image, or DataError naming the file and why it cannot be read."""
    data = read_file(path, max_bytes)
    try:
        return decode_rgb(data)
    except Exception as e:  # any decoder failure means the same to the user: this file is not usable
        if not data:
            reason = "empty file"
        elif isinstance(e, UnidentifiedImageError):  # its message holds a BytesIO repr, not news
            reason = "not an image, or a damaged header"
        else:
            reason = first_line(e)[:120]
        raise DataError(f"{path} cannot be read as an image ({reason})") from e


def read_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file (a symlink is followed) of at most ``max_bytes``. A FIFO, a
    device or a socket is refused before it is opened: reading one would hang or never end."""
    try:
        kind = special(os.stat(path).st_mode)
        if kind is None:  # a regular file, as far as stat saw; opened without blocking should it have changed since
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                info = os.fstat(f.fileno())
                kind = special(info.st_mode)
                data = f.read(max_bytes + 1) if kind is None and info.st_size <= max_bytes else b""
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e})") from e
    if kind is not None:
        raise DataError(f"{path} is {kind}, not a regular file: not read")
    if info.st_size > max_bytes or len(data) > max_bytes:
        raise DataError(f"{path} is larger than the file size limit of {max_bytes:,} bytes: not read")
    return data


def special(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    return None if stat.S_ISREG(mode) else KINDS.get(stat.S_IFMT(mode), "a special file")


def image_files(root: Path) -> list[Path]:
    """Image files under `root` by extension (any case), in a stable order (toolbox.walk: links
    followed, each folder once, never up out of `root`)."""
    return [
        Path(folder) / f for folder, files in walk(root) for f in files if f.rsplit(".", 1)[-1].lower() in SOURCE_EXTS
    ]


def labelled_images(root: Path, classes: list[str], split: str) -> tuple[list[tuple[Path, int]], Path]:
    """ROOT/<class>/**/<image> (or ROOT/<split folder>/<class>/..., as make_shards reads a pre-split
    SRC), labelled by the run's class list. -> (image and label pairs, the folder of class folders read)."""
    if not root.is_dir():
        raise UserError(f"image folder {root} not found — pass a make_shards output or a folder of class folders")
    folders = subfolders(root)
    if sorted(classes) != folders:  # a run whose classes are called train and val reads them as classes
        root = split_root(root, folders, split)
        folders = subfolders(root)
    if not folders:
        raise UserError(f"{root} has no class folders — lay it out as {root}/<class>/<image>")
    if folders != sorted(classes):
        extra, missing = sorted(set(folders) - set(classes)), sorted(set(classes) - set(folders))
        raise UserError(
            f"the class folders of {root} differ from the run's classes (not in the run: {extra or 'none'}; "
            f"missing: {missing or 'none'}) — evaluate on a folder with exactly the run's {len(classes)} class folders"
        )
    items = []
    for label, name in enumerate(classes):
        files = image_files(root / name)
        if not files:
            raise UserError(
                f"class folder {root / name} has no images — add images of that class (every class of the run needs some)"
            )
        items += [(path, label) for path in files]
    return items, root


def split_root(root: Path, folders: list[str], split: str) -> Path:
    """The folder of ``split`` in a pre-split image folder; ``root`` itself when it holds class folders."""
    try:
        named = split_folders(folders)
    except LayoutError as e:
        raise UserError(f"{root} {e} — pass a folder of class folders, or one laid out as {EXPECTED}") from None
    if named is None:
        return root
    if split not in named:
        raise UserError(
            f"{root} has no {split} folder (it has {', '.join(f + '/' for f in named.values())}) — "
            f"pass --split {' or --split '.join(named)}"
        )
    return root / named[split]


def subfolders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


class LabelledImages(Dataset):
    """Image files as ShardDataset's samples: (index, seed, size) -> (tensor, label, index), for EvalOrder."""

    def __init__(self, items: list[tuple[Path, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: tuple[int, int, None]):
        index = item[0]
        path, label = self.items[index]
        try:
            image = read_image(path)
        except DataError as e:
            raise DataError(f"{e} — remove or replace it (make_shards drops such files for you)") from e
        return Sample(self.transform(image), label, index)
