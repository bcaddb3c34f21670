"""Walk SRC: the class folders, the candidate image files, and what each file really is.

Listing is cheap and happens in the main process; inspecting (read, hash, full decode, pixel
statistics) is the expensive part and runs on every core. The per-file results live in flat
numpy arrays, about 100 bytes a file, never the image data, so memory stays bounded by the
file count whatever the images weigh.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from launch.parallel import Workers
from shards.errors import UserError, first_line
from shards.format import IMAGE_EXTS, KEEP_FORMATS, SOURCE_EXTS, to_rgb

SPLITS = ("train", "val")
TRANSCODE = len(IMAGE_EXTS)  # field code of images that are re-encoded as png
CHUNK = 32  # files per task: big enough to hide the IPC, small enough to spread the work evenly


@dataclass
class Listing:
    """Every candidate image file under SRC, in a fixed order (class, then path)."""

    root: Path
    layout: str  # "folders" (SRC/<class>/...) or "presplit" (SRC/train/<class>/..., SRC/val/<class>/...)
    classes: list[str]
    relpaths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    given_split: list[int] = field(default_factory=list)  # 0 train, 1 val, -1 for "folders"
    ignored: int = 0  # files that are not images by name


class Digests:
    """N sha256 digests in one (N, 32) array; ``d[i]`` is the i-th as bytes.

    (A numpy "S32" column would be smaller to write but strips trailing zero bytes.)
    """

    def __init__(self, n: int):
        self.array = np.zeros((n, 32), np.uint8)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> bytes:
        return self.array[i].tobytes()

    def __setitem__(self, i: int, digest: bytes) -> None:
        if digest:
            self.array[i] = np.frombuffer(digest, np.uint8)


@dataclass
class Inspection:
    """What inspect_file found for each file of a Listing (arrays indexed like it)."""

    sha256: Digests
    size: np.ndarray  # (N,) int64, bytes on disk
    width: np.ndarray  # (N,) int32, as displayed (EXIF orientation applied); 0 if invalid
    height: np.ndarray
    field: np.ndarray  # (N,) int8: index into IMAGE_EXTS, TRANSCODE, or -1 if invalid
    stats: np.ndarray  # (N, 7) int64: per-channel sum, per-channel sum of squares, pixel count
    reasons: dict[int, str]  # index -> why the file is not a usable image


def list_source(src: Path) -> Listing:
    src = Path(src)
    if not src.exists():
        raise UserError(f"SRC {src} does not exist — pass the folder that holds one sub-folder per class")
    if not src.is_dir():
        raise UserError(f"SRC {src} is not a folder — pass the folder that holds one sub-folder per class")
    roots = {name: src / name for name in SPLITS}
    if all(_class_dirs(path) for path in roots.values()):
        per_split = {name: _class_dirs(path) for name, path in roots.items()}
        classes = sorted(set(per_split["train"]) | set(per_split["val"]))
        listing = Listing(src, "presplit", classes)
        for s, name in enumerate(SPLITS):
            for label, cls in enumerate(classes):
                if cls in per_split[name]:
                    _list_class(listing, roots[name] / cls, label, s)
    else:
        classes = _class_dirs(src)
        if not classes:
            raise UserError(
                f"SRC {src} has no class folders — put the images in SRC/<class name>/ "
                "(one sub-folder per class), or SRC/train/<class>/ and SRC/val/<class>/"
            )
        listing = Listing(src, "folders", classes)
        for label, cls in enumerate(classes):
            _list_class(listing, src / cls, label, -1)
    return listing


def _class_dirs(path: Path) -> list[str]:
    """Sub-folders of ``path`` (symlinks followed), sorted; hidden ones (.git, .ipynb_checkpoints) left out."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return []
    return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _list_class(listing: Listing, class_dir: Path, label: int, split: int) -> None:
    seen = set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or two links to one folder: list it once
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if "." not in name or name.rsplit(".", 1)[1].lower() not in SOURCE_EXTS:
                listing.ignored += 1
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), listing.root).replace(os.sep, "/")
            listing.relpaths.append(rel)
            listing.labels.append(label)
            listing.given_split.append(split)


def inspect_all(
    listing: Listing, max_pixels: int, workers: Workers, progress: Callable[[Iterable, int], Iterable] | None = None
) -> Inspection:
    n = len(listing.relpaths)
    out = Inspection(
        sha256=Digests(n),
        size=np.zeros(n, np.int64),
        width=np.zeros(n, np.int32),
        height=np.zeros(n, np.int32),
        field=np.full(n, -1, np.int8),
        stats=np.zeros((n, 7), np.int64),
        reasons={},
    )
    root = str(listing.root)
    chunks = ((root, listing.relpaths[i : i + CHUNK], max_pixels) for i in range(0, n, CHUNK))
    results = workers.map(inspect_chunk, chunks)
    if progress is not None:
        results = progress(results, n)
    i = 0
    for chunk in results:
        for sha, size, w, h, fld, stats, reason in chunk:
            out.sha256[i], out.size[i] = sha, size
            if reason is None:
                out.width[i], out.height[i], out.field[i] = w, h, fld
                out.stats[i] = stats
            else:
                out.reasons[i] = reason
            i += 1
    return out


def inspect_chunk(task: tuple[str, list[str], int]) -> list[tuple]:
    root, relpaths, max_pixels = task
    Image.MAX_IMAGE_PIXELS = None  # the limit is checked below, with the user's value and a clear reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd-but-valid files (bad EXIF, palette notes) are not news
        return [inspect_file(os.path.join(root, rel), max_pixels) for rel in relpaths]


def inspect_file(path: str, max_pixels: int) -> tuple:
    """(sha256, size, width, height, field, stats, reason): reason is None for a usable image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return b"", 0, 0, 0, -1, None, f"unreadable ({e.strerror or e})"
    sha = hashlib.sha256(data).digest()
    if not data:
        return sha, 0, 0, 0, -1, None, "empty file"
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:
        if data.startswith(SIGNATURES) or data[8:12] == b"WEBP":
            return sha, len(data), 0, 0, -1, None, "truncated or corrupt (unreadable header)"
        return sha, len(data), 0, 0, -1, None, "not an image (no known image format)"
    w, h = img.size
    if w * h > max_pixels:
        return (
            sha,
            len(data),
            0,
            0,
            -1,
            None,
            f"decompression bomb ({w}x{h} = {w * h} pixels > --max-pixels {max_pixels})",
        )
    try:
        if img.format in ("JPEG", "MPO") and min(w, h) >= 64:
            # Decode at half size by DCT scaling: every byte of the entropy-coded data is still
            # decoded (truncation and corruption are caught as in a full decode) at ~60% of the
            # cost; the mean/std from it are within ~1% of full resolution.
            img.draft(img.mode, (w // 2, h // 2))
        img.load()
        fld = IMAGE_EXTS.index(KEEP_FORMATS[img.format]) if img.format in KEEP_FORMATS else TRANSCODE
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated a quarter turn: shown as h x w
            w, h = h, w
        stats = _pixel_stats(to_rgb(img))
    except Exception as e:
        detail = first_line(e)[:80]
        return sha, len(data), 0, 0, -1, None, f"truncated or corrupt ({detail})"
    return sha, len(data), w, h, fld, stats, None


# How the formats we read begin, to tell a damaged image from a file that never was one.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

_LEVELS = np.arange(256, dtype=np.int64)


def _pixel_stats(rgb: Image.Image) -> list[int]:
    # The histogram is one pass in C; sums from it are exact integers, so adding them up in
    # any order gives the same mean/std.
    hist = np.asarray(rgb.histogram(), np.int64).reshape(3, 256)
    s, sq = hist @ _LEVELS, hist @ (_LEVELS * _LEVELS)
    return [*s.tolist(), *sq.tolist(), rgb.width * rgb.height]
