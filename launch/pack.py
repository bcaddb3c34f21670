"""Source files -> samples -> one shard, in a worker process.

A shard is a pure function of its list of entries, so shards can be written in parallel in
any order and still come out byte-identical. JPEG, PNG and WebP bytes are stored as they are;
other formats are re-encoded as PNG without loss; --resize-short re-encodes large images.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from launch.scan import DEFAULT_MAX_FILE_BYTES, NotRead, read_source
from shards.format import IMAGE_EXTS, encode_cls, encode_meta, to_rgb
from shards.manifest import ShardInfo
from shards.writer import ShardWriter
from toolbox.errors import DataError

PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}
RERUN = "re-run once nothing writes to SRC"
SAVE_ARGS = {"jpg": ("JPEG", {"quality": 90}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 90})}


@dataclass(frozen=True)
class Entry:
    key: str
    path: str  # absolute, to read
    relpath: str  # relative to SRC, for the json
    label: int
    label_name: str
    width: int
    height: int
    sha256: bytes
    field: int  # index into IMAGE_EXTS, or len(IMAGE_EXTS) to transcode to png


@dataclass(frozen=True)
class ShardJob:
    path: str
    entries: list[Entry]
    resize_short: int | None = None
    max_bytes: int = DEFAULT_MAX_FILE_BYTES  # --max-file-size, again: a file swapped since the scan


def write_shard(job: ShardJob) -> tuple[ShardInfo, np.ndarray, list[Entry]]:
    """-> the shard's manifest entry, its sample index records, and the entries whose file was
    gone by the time it was read (deleted or moved since the scan: left out, not the end of the run)."""
    Image.MAX_IMAGE_PIXELS = None  # every file here passed the user's pixel limit in the scan
    gone = []
    with warnings.catch_warnings(), ShardWriter(Path(job.path)) as writer:
        warnings.simplefilter("ignore")
        for e in job.entries:
            try:
                data = read_source(e.path, job.max_bytes)
            except FileNotFoundError:
                gone.append(e)
                continue
            except NotRead as why:  # a FIFO or /dev/zero put in its place since the scan
                raise DataError(f"{e.relpath} changed while it was being sharded ({why}) — {RERUN}") from why
            if hashlib.sha256(data).digest() != e.sha256:  # its shard would not match the manifest
                raise DataError(f"{e.relpath} changed while it was being sharded — {RERUN}")
            ext, data = encode_image(data, e.field, job.resize_short)
            meta = encode_meta(e.label_name, e.relpath, e.width, e.height)
            writer.add(e.key, {ext: data, "cls": encode_cls(e.label), "json": meta})
        return writer.close(), writer.index, gone


def encode_image(data: bytes, field: int, resize_short: int | None) -> tuple[str, bytes]:
    """-> (image field, bytes): the source bytes where they can stay, else a re-encoding."""
    ext = IMAGE_EXTS[field] if field < len(IMAGE_EXTS) else "png"
    if resize_short is None and field < len(IMAGE_EXTS):
        return ext, data
    img = Image.open(io.BytesIO(data))
    img.load()
    if resize_short is not None and min(img.size) > resize_short:
        ImageOps.exif_transpose(img, in_place=True)
        img = to_rgb(img)
        w, h = img.size
        scale = resize_short / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    elif field < len(IMAGE_EXTS):
        return ext, data  # small enough already: keep the original bytes
    else:
        ImageOps.exif_transpose(img, in_place=True)  # the orientation tag does not survive re-encoding
        if img.mode not in PNG_MODES:
            img = to_rgb(img)
    fmt, kwargs = SAVE_ARGS[ext]
    if fmt == "JPEG" and img.mode not in ("L", "RGB"):
        img = to_rgb(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return ext, buf.getvalue()
