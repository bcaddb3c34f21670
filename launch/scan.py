"""Walk SRC: the class folders, the candidate image files, and what each file really is.

Listing is cheap and happens in the main process; inspecting (read, hash, full decode, pixel
statistics, the perceptual hash for near-duplicates) is the expensive part and runs on every core. The per-file results live in flat
numpy arrays, about 100 bytes a file, never the image data, so memory stays bounded by the
file count whatever the images weigh.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from launch import neardup
from launch.parallel import Workers
from shards.format import IMAGE_EXTS, KEEP_FORMATS, SOURCE_EXTS, shape_problem, to_rgb
from shards.splits import EXPECTED, SPLITS, LayoutError, split_folders
from toolbox.errors import UserError, first_line
from toolbox.walk import walk

TRANSCODE = len(IMAGE_EXTS)  # field code of images that are re-encoded as png
CHUNK = 32  # files per task: big enough to hide the IPC, small enough to spread the work evenly
# Above any image the default --max-pixels lets through even uncompressed (89.5 M pixels x 4 bytes
# = 358 MB of RGBA BMP/TIFF/PPM); bigger files are videos, archives or dumps with an image's name,
# and every worker holds one file whole, so this bounds the memory a scan can take.
DEFAULT_MAX_FILE_BYTES = 512_000_000
# A name that is not UTF-8 is skipped, not kept as bytes: its path goes into the manifest and each
# sample's json (UTF-8 JSON, which cannot hold it), and into the sample key's hash; an escaped
# stand-in would name a file that does not exist in every report, evaluate and predict output.
NOT_UTF8 = "name not UTF-8 (rename it, e.g. `convmv -f latin1 -t utf-8 -r --notest SRC`)"
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


@dataclass
class Listing:
    """Every candidate image file under SRC, in a fixed order (class, then path)."""

    root: Path
    layout: str  # "folders" (SRC/<class>/...) or "presplit" (SRC/train/<class>/..., SRC/test/<class>/...)
    classes: list[str]
    folders: dict[str, str] = field(default_factory=dict)  # presplit: split -> its folder in SRC (as spelt there)
    relpaths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    given_split: list[int] = field(default_factory=list)  # index into SPLITS, -1 for "folders"
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
    phash: np.ndarray  # (N,) uint64 perceptual hash (launch/neardup.py); 0 if not hashed (off, or small)


class Facts(NamedTuple):
    """What inspect_file found in one file; reason is None for a usable image."""

    sha256: bytes
    size: int
    width: int
    height: int
    field: int
    stats: list[int] | None
    reason: str | None
    phash: int = 0


def _unusable(sha: bytes, size: int, reason: str) -> Facts:
    return Facts(sha, size, 0, 0, -1, None, reason)


def list_source(src: Path) -> Listing:
    src = Path(src)
    if not src.exists():
        raise UserError(f"SRC {src} does not exist — pass the folder that holds one sub-folder per class")
    if not src.is_dir():
        raise UserError(f"SRC {src} is not a folder — pass the folder that holds one sub-folder per class")
    top = _class_dirs(src)
    try:
        folders = split_folders(top)
    except LayoutError as e:
        raise UserError(f"SRC {src} {e} — lay it out as {EXPECTED}, or as SRC/<class>/ alone") from None
    if folders is not None:
        return _list_presplit(src, folders)
    if not top:
        raise UserError(
            f"SRC {src} has no class folders — put the images in SRC/<class name>/ "
            "(one sub-folder per class), or SRC/train/<class>/ and SRC/val/<class>/"
        )
    listing = Listing(src, "folders", top)
    for label, cls in enumerate(top):
        _list_class(listing, src / cls, label, -1)
    return listing


def _list_presplit(src: Path, folders: dict[str, str]) -> Listing:
    """SRC/<split folder>/<class>/...: the classes are every split's class folders together (a class
    with no training image is then refused, or dropped with --skip-empty-classes, whichever split
    holds it)."""
    per_split = {split: _class_dirs(src / folder) for split, folder in folders.items()}
    for split, classes in per_split.items():
        if not classes:
            raise UserError(
                f"SRC {src}/{folders[split]} holds no class folders — put its images in "
                f"{src}/{folders[split]}/<class name>/ (a pre-split SRC is {EXPECTED})"
            )
    classes = sorted(set().union(*per_split.values()))
    listing = Listing(src, "presplit", classes, folders=folders)
    for split, folder in folders.items():
        for label, cls in enumerate(classes):
            if cls in per_split[split]:
                _list_class(listing, src / folder / cls, label, SPLITS.index(split))
    return listing


def _class_dirs(path: Path) -> list[str]:
    """Sub-folders of ``path`` (symlinks followed), sorted; hidden ones (.git, .ipynb_checkpoints) left out."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return []
    return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _list_class(listing: Listing, class_dir: Path, label: int, split: int) -> None:
    for dirpath, filenames in walk(class_dir, given=listing.root):  # never up out of SRC through a link
        for name in filenames:
            if "." not in name or name.rsplit(".", 1)[1].lower() not in SOURCE_EXTS:
                listing.ignored += 1
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), listing.root).replace(os.sep, "/")
            listing.relpaths.append(rel)
            listing.labels.append(label)
            listing.given_split.append(split)


def inspect_all(
    listing: Listing,
    max_pixels: int,
    max_bytes: int,
    workers: Workers,
    progress: Callable[[Iterable, int], Iterable] | None = None,
    near: bool = False,
) -> Inspection:
    """Every file of ``listing``, on every core; ``near``: also its perceptual hash."""
    n = len(listing.relpaths)
    out = Inspection(
        sha256=Digests(n),
        size=np.zeros(n, np.int64),
        width=np.zeros(n, np.int32),
        height=np.zeros(n, np.int32),
        field=np.full(n, -1, np.int8),
        stats=np.zeros((n, 7), np.int64),
        reasons={},
        phash=np.zeros(n, np.uint64),
    )
    root = str(listing.root)
    chunks = ((root, listing.relpaths[i : i + CHUNK], max_pixels, max_bytes, near) for i in range(0, n, CHUNK))
    results = workers.map(inspect_chunk, chunks)
    if progress is not None:
        results = progress(results, n)
    i = 0
    for chunk in results:
        for facts in chunk:
            out.sha256[i], out.size[i] = facts.sha256, facts.size
            if facts.reason is None:
                out.width[i], out.height[i], out.field[i] = facts.width, facts.height, facts.field
                out.stats[i], out.phash[i] = facts.stats, facts.phash
            else:
                out.reasons[i] = facts.reason
            i += 1
    return out


def inspect_chunk(task: tuple[str, list[str], int, int, bool]) -> list[Facts]:
    root, relpaths, max_pixels, max_bytes, near = task
    Image.MAX_IMAGE_PIXELS = None  # the limit is checked below, with the user's value and a clear reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd-but-valid files (bad EXIF, palette notes) are not news
        return [
            inspect_file(os.path.join(root, rel), max_pixels, max_bytes, near)
            if is_utf8(rel)
            else _unusable(b"", 0, NOT_UTF8)
            for rel in relpaths
        ]


def inspect_file(path: str, max_pixels: int, max_bytes: int = DEFAULT_MAX_FILE_BYTES, near: bool = False) -> Facts:
    """What the file at ``path`` is; ``near``: with its perceptual hash, as the image is shown."""
    try:
        data = read_source(path, max_bytes)
    except NotRead as e:
        return _unusable(b"", 0, str(e))
    except OSError as e:
        return _unusable(b"", 0, f"unreadable ({e.strerror or e})")
    sha = hashlib.sha256(data).digest()
    if not data:
        return _unusable(sha, 0, "empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:
        if data.startswith(SIGNATURES) or data[8:12] == b"WEBP":
            return _unusable(sha, len(data), "truncated or corrupt (unreadable header)")
        return _unusable(sha, len(data), "not an image (no known image format)")
    w, h = img.size
    if problem := shape_problem(w, h, max_pixels):
        return _unusable(sha, len(data), problem)
    try:
        if img.format in ("JPEG", "MPO") and min(w, h) >= 64:
            # Decode at half size by DCT scaling: every byte of the entropy-coded data is still
            # decoded (truncation and corruption are caught as in a full decode) at ~60% of the
            # cost; the mean/std from it are within ~1% of full resolution.
            img.draft(img.mode, (w // 2, h // 2))
        img.load()
        fld = IMAGE_EXTS.index(KEEP_FORMATS[img.format]) if img.format in KEEP_FORMATS else TRANSCODE
        orientation = img.getexif().get(0x0112, 1)
        if orientation in (5, 6, 7, 8):  # rotated a quarter turn: shown as h x w
            w, h = h, w
        if near and orientation != 1:  # hashed as shown: a copy saved upright is still a copy
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
        stats = _pixel_stats(rgb)
        phash = neardup.perceptual_hash(rgb) if near and neardup.hashable(w, h) else 0  # see MIN_SIDE
    except Exception as e:
        detail = first_line(e)[:80]
        return _unusable(sha, len(data), f"truncated or corrupt ({detail})")
    return Facts(sha, len(data), w, h, fld, stats, None, phash)


class NotRead(Exception):
    """A source file that is not read at all; ``str(e)`` is the reason it is skipped."""


def read_source(path: str, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path`` (a symlink to one is followed), or NotRead when it
    is anything else (a FIFO, device, socket) or over ``max_bytes``: checked before it is opened,
    again on what was opened, and while reading, which never goes past ``max_bytes`` + 1 bytes."""
    _check(os.stat(path), path, max_bytes)  # nothing but a regular file is ever opened...
    # ...and O_NONBLOCK: should a FIFO be swapped in since, opening it does not wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    with open(fd, "rb") as f:
        size = _check(os.fstat(fd), path, max_bytes)
        data = f.read(size + 1)  # one byte more than stat said: a file that grew since is caught
        if len(data) > size:
            data += f.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise NotRead(f"too large (grew past --max-file-size {_mb(max_bytes)} while read)")
    return data


def _check(st: os.stat_result, path: str, max_bytes: int) -> int:
    """-> the size of a regular file of at most ``max_bytes``; else NotRead."""
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a file")
        via = ", via a symlink" if os.path.islink(path) else ""
        raise NotRead(f"not a regular file ({kind}{via})")
    if st.st_size > max_bytes:
        raise NotRead(f"too large ({_mb(st.st_size)} > --max-file-size {_mb(max_bytes)})")
    return st.st_size


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def is_utf8(name: str) -> bool:
    """Whether a name from the OS (undecodable bytes are lone surrogates in it) is valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """A name from the OS as text that any UTF-8 output can hold: undecodable bytes as \\xNN."""
    return name if is_utf8(name) else os.fsencode(name).decode("utf-8", "backslashreplace")


# How the formats we read begin, to tell a damaged image from a file that never was one.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

_LEVELS = np.arange(256, dtype=np.int64)


def _pixel_stats(rgb: Image.Image) -> list[int]:
    # The histogram is one pass in C; sums from it are exact integers, so adding them up in
    # any order gives the same mean/std.
    hist = np.asarray(rgb.histogram(), np.int64).reshape(3, 256)
    s, sq = hist @ _LEVELS, hist @ (_LEVELS * _LEVELS)
    return [*s.tolist(), *sq.tolist(), rgb.width * rgb.height]
