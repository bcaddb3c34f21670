"""What a shards folder holds: its file names, what one sample in a shard is (its key, its
fields), and how its image turns into RGB.

A sample is three tar members sharing a key: ``<key>.<jpg|png|webp>`` (the encoded image,
bytes as in the source file), ``<key>.cls`` (class index as ASCII digits) and ``<key>.json``
(``label``, ``path`` relative to SRC, ``width``, ``height``). The trainer, evaluate and
predict all decode images with :func:`decode_rgb`, so every mode a user's folder may hold
becomes the same 8-bit RGB here, once.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

# The files of a make_shards output (OUT), named here only: launch/ writes them, trainer/ reads them.
MANIFEST = "manifest.json"  # shards/manifest.py
TIMM_INFO = "_info.json"  # timm's webdataset reader's shard lengths, beside the manifest
INDEX_NAME = "index.npy"  # OUT/<split>/index.npy, the split's sample index (shards/index.py)
CLASS_PLOT = "class_distribution.png"  # launch/report.py
SIZE_PLOT = "image_sizes.png"
SUMMARY = "summary.txt"

# The image fields a sample may carry; anything else is transcoded to png when sharding.
IMAGE_EXTS = ("jpg", "png", "webp")

# Pillow format name -> the field its bytes are stored under unchanged. MPO is the
# multi-picture JPEG many cameras write; its first frame is a plain JPEG stream.
KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}

# Source file extensions that make a file a candidate image (lower-case, no dot).
SOURCE_EXTS = frozenset(
    {"jpg", "jpeg", "jpe", "jfif", "png", "webp", "gif", "bmp", "dib", "tif", "tiff", "ppm", "pgm", "pbm"}
)

EXIF_ORIENTATION = 0x0112  # the EXIF tag of an image's rotation/mirroring

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(relpath: str) -> str:
    """The key of the file at ``relpath`` (relative to SRC, '/'-separated).

    Stable: it depends on the path only, so the same file keeps its key whatever the
    options, split or shard. Unique in practice: 64 bits of a hash of the whole path
    (the writer still checks). Readable where it can be: the file stem, reduced to
    ASCII letters, digits, '-' and '_' (no '.', which webdataset splits keys on, and
    no '/', which would make tar folders).
    """
    stem = relpath.rsplit("/", 1)[-1].split(".", 1)[0]
    safe = _UNSAFE.sub("_", stem).strip("_")[:40]
    digest = f"{key_hash(relpath):016x}"
    return f"{safe}_{digest}" if safe else digest


def key_hash(relpath: str) -> int:
    """The 64-bit hash in a sample's key; two files with equal ones would share a key."""
    return int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def encode_cls(index: int) -> bytes:
    return str(index).encode("ascii")


def encode_meta(label: str, path: str, width: int, height: int) -> bytes:
    meta = {"label": label, "path": path, "width": width, "height": height}
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def image_field(sample: dict) -> str:
    """Which of IMAGE_EXTS ``sample`` (a webdataset sample dict) carries."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    raise KeyError(f"sample {sample.get('__key__', '?')!r} has no image field (one of {', '.join(IMAGE_EXTS)})")


MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit (make_shards: --max-pixels)
MAX_ASPECT = 100  # longer side / shorter side: a 1 x 10,000,000 strip resized for training takes gigabytes


def shape_problem(width: int, height: int, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why an image of this size is refused before it is decoded; None when it is not."""
    if width * height > max_pixels:
        return f"decompression bomb ({width}x{height} = {width * height} pixels > --max-pixels {max_pixels})"
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        return f"aspect ratio over {MAX_ASPECT}:1 ({width}x{height}): resized for the model it would fill gigabytes"
    return None


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image bytes -> an 8-bit RGB image, upright as its EXIF orientation says."""
    return finish_rgb(open_image(data))


def open_image(data: bytes, shrink: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """`decode_rgb`'s first half: the header read and the JPEG scale chosen, nothing decoded
    yet (``size`` is what decoding will give, before the EXIF rotation).

    ``shrink(width, height)``, given the upright size, may name the smallest upright size the
    caller needs: a JPEG is then decoded at 1/2, 1/4 or 1/8 scale where that still covers it
    (libjpeg's DCT scaling, many times faster for camera photos). Other formats ignore it.
    """
    img = Image.open(io.BytesIO(data))
    if problem := shape_problem(*img.size):  # refused from the header, before any allocation
        raise ValueError(problem)
    if shrink is not None and img.format == "JPEG":
        turned = orientation(img) in (5, 6, 7, 8)  # stored transposed: width and height swap
        width, height = img.size[::-1] if turned else img.size
        need = shrink(width, height)
        img.draft(img.mode, need[::-1] if turned else need)
    return img


def finish_rgb(img: Image.Image) -> Image.Image:
    """`decode_rgb`'s second half: decode, turn upright, convert to RGB."""
    turn = orientation(img)
    img.load()  # surfaces truncated data here, not later inside a transform
    if turn != 1:  # transposing copies, so only when needed
        ImageOps.exif_transpose(img, in_place=True)
    return to_rgb(img)


def orientation(img: Image.Image) -> int:
    return img.getexif().get(EXIF_ORIENTATION, 1)


def plain_jpeg(img: Image.Image) -> bool:
    """A JPEG that libjpeg's and nvJPEG's RGB output (torchvision.io.decode_jpeg) decodes to what
    `decode_rgb` gives: RGB or grayscale, stored upright."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and orientation(img) == 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. RGB passes through without a copy.

    Transparent pixels are composited on white (what a viewer shows), not left as whatever
    colour they happen to store; 16-bit and 32-bit integer data is scaled down, not clipped
    at 255 as Pillow's own ``convert`` does.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if mode != "RGBA":
            img = img.convert("RGBA")
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(img, mask=img.getchannel("A"))
        return out
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _scale_to_l(img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def _scale_to_l(img: Image.Image) -> Image.Image:
    """High bit-depth grey -> 8-bit grey over the range the data type implies."""
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = (0.0, 1.0) if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0 else _finite_range(arr)
    elif img.mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        lo, hi = _finite_range(arr)
    else:  # I;16 variants, and "I" holding 16-bit data (how Pillow opens many 16-bit files)
        lo, hi = 0.0, 65535.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = (arr.astype(np.float32) - lo) * scale
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _finite_range(arr: np.ndarray) -> tuple[float, float]:
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    if not finite.size:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())
