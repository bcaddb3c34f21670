"""OUT/manifest.json: what is in the shards, so that nothing downstream scans a tar to find out.

Also writes timm's ``_info.json`` (shard file names and lengths per split) next to it, so
timm's webdataset reader can read our output as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards.format import MANIFEST, MAX_PIXELS, TIMM_INFO
from shards.index import RECORD
from toolbox.errors import DataError, first_line

FORMAT_VERSION = 1
MAKE_CMD = "python -m launch.make_shards SRC OUT"
# A bound read before parsing: make_shards writes ~200 bytes a shard, so 64 MB is some 300,000
# shards; a hostile or wrong file never costs more memory than this before it is refused.
MAX_BYTES = 64 << 20
MAX_INDEX_HEADER = 4096  # an index.npy is a .npy header (~200 bytes) and 16 bytes a sample
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    num_samples: int
    class_counts: dict[str, int]
    shards: list[ShardInfo]
    index: ShardInfo | None = None  # <split>/index.npy (shards/index.py); None in shards made before it


# A channel without variance (a blue channel 0 everywhere) is normalised as if it varied by one grey
# level: make_shards writes this std for it, and the trainer floors an older manifest's 0 to it.
MIN_STD = round(1 / 255, 6)


@dataclass
class Manifest:
    classes: list[str]
    splits: dict[str, SplitInfo]
    mean: list[float]
    std: list[float]
    options: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    # make_shards --exclude/--relabel FILE, one record each: option, file, sha256, rows, matched, unmatched, applied
    edits: list[dict] = field(default_factory=list)
    source: str = ""
    created: str = ""  # the one field that differs between two identical runs
    version: int = FORMAT_VERSION
    prefix: str = ""  # where the splits' folders sit below OUT ("" or "build-<id>/", see launch/publish.py)
    # The train split's images as written (after --resize-short), in pixels: median_width, median_height,
    # and the shorter side's short_p10, short_median, short_p90. {} in shards made before it was recorded.
    image_sizes: dict[str, int] = field(default_factory=dict)
    root: Path | None = field(default=None, compare=False, repr=False)  # OUT; set by load/write
    sha256: str = field(default="", compare=False, repr=False)  # of the manifest.json bytes read: names the dataset

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard_paths(self, split: str) -> list[Path]:
        if self.root is None:
            raise DataError("manifest has no output folder yet — call Manifest.load(OUT) or manifest.write(OUT)")
        if split not in self.splits:
            raise DataError(
                f"{self.root / MANIFEST} has no split {split!r} (has {', '.join(self.splits) or 'none'}) — "
                f"pick one of those or re-run `{MAKE_CMD}`"
            )
        return [self.root / self.prefix / split / s.name for s in self.splits[split].shards]

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["root"], d["sha256"]
        return d

    def write(self, out_dir: str | os.PathLike) -> None:
        """Write manifest.json and timm's _info.json into ``out_dir`` (each atomically)."""
        self.root = Path(out_dir)
        _write_json(self.root / MANIFEST, self.to_dict())
        _write_json(self.root / TIMM_INFO, self.timm_info())

    def timm_info(self) -> dict:
        return {
            "name": Path(self.source).name if self.source else "",
            "num_classes": len(self.classes),
            "splits": {
                split: {
                    "name": split,
                    "num_samples": info.num_samples,
                    "filenames": [f"{self.prefix}{split}/{s.name}" for s in info.shards],
                    "shard_lengths": [s.samples for s in info.shards],
                }
                for split, info in self.splits.items()
            },
        }

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> Manifest:
        root = Path(out_dir)
        path = root / MANIFEST
        if not path.is_file():
            raise DataError(f"{path} not found — make shards first with `{MAKE_CMD}`")
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)  # never more, whatever the file is or becomes
        except OSError as e:
            raise DataError(f"{path} cannot be read ({e.strerror}) — check its permissions") from e
        return cls.parse(raw, str(path), root)

    @classmethod
    def parse(cls, raw: bytes, where: str, root: Path | None = None) -> Manifest:
        """The manifest in ``raw`` (read from ``where``, named in errors), checked like a config:
        every name stays inside the dataset and every count adds up. ``root`` is OUT when it is a
        local folder."""
        if len(raw) > MAX_BYTES:
            raise DataError(too_large(where))
        try:
            manifest = cls.from_dict(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
            reason = f"missing field {e}" if isinstance(e, KeyError) else first_line(e)
            raise DataError(f"{where} is not a valid manifest ({reason}) — re-run `{MAKE_CMD}`") from e
        manifest.root, manifest.sha256 = root, hashlib.sha256(raw).hexdigest()
        return manifest

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        """The manifest in ``d``; ValueError (or KeyError: a missing field) naming the field that is wrong."""
        if not isinstance(d, dict):
            raise ValueError("top level is not an object")
        version = _count(d.get("version", FORMAT_VERSION), "version")
        if version > FORMAT_VERSION:
            raise ValueError(f"format version {version} is newer than this code reads ({FORMAT_VERSION})")
        splits = _typed(d["splits"], dict, "splits")
        classes = [_typed(c, str, f"classes[{i}]") for i, c in enumerate(_typed(d["classes"], list, "classes"))]
        if len(set(classes)) != len(classes):
            raise ValueError("classes: a class is listed twice")
        return cls(
            classes=classes,
            splits={_plain_name(name, "splits"): _split(s, f"splits.{name}", classes) for name, s in splits.items()},
            mean=_rgb(d["mean"], "mean"),
            std=_rgb(d["std"], "std"),  # 0 in manifests made before MIN_STD; normalisation floors it
            options=_typed(d.get("options", {}), dict, "options"),
            skipped=_typed(d.get("skipped", []), list, "skipped"),
            duplicates=_typed(d.get("duplicates", []), list, "duplicates"),
            edits=_typed(d.get("edits", []), list, "edits"),
            source=_typed(d.get("source", ""), str, "source"),
            created=_typed(d.get("created", ""), str, "created"),
            version=version,
            prefix=_prefix(d.get("prefix", "")),
            image_sizes=_image_sizes(d.get("image_sizes", {})),
        )

    def verify(self, split: str | None = None, checksum: bool = False) -> None:
        """Check that the shards are there with the recorded sizes (and sha256 if ``checksum``)."""
        for name in [split] if split else list(self.splits):
            for path, info in zip(self.shard_paths(name), self.splits[name].shards):
                if not path.is_file():
                    raise DataError(f"shard {path} is missing — re-run `{MAKE_CMD}` with --overwrite")
                size = path.stat().st_size
                if size != info.bytes or (checksum and _sha256_file(path) != info.sha256):
                    what = f"{size} bytes, manifest says {info.bytes}" if size != info.bytes else "sha256 differs"
                    raise DataError(f"shard {path} is corrupted ({what}) — re-run `{MAKE_CMD}` with --overwrite")


def too_large(where: str) -> str:
    return (
        f"{where} is larger than a manifest can be ({MAX_BYTES >> 20} MB) — it is not make_shards' manifest.json: "
        f"re-run `{MAKE_CMD}`"
    )


# Checks of one field each: the field's name goes into the message, the caller adds the manifest's.


def _typed(value, kind: type, where: str):
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where} is {type(value).__name__}, not {kind.__name__}")
    return value


def _count(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where} is {_short(value)}, not a count (a whole number, 0 or more)")
    return value


def _short(value) -> str:
    """A value as a message shows it: a hostile manifest's 2 GB string is not printed whole."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _plain_name(name, where: str) -> str:
    """A file or folder name that stays where it is put: no path, no '..', no URL scheme or drive."""
    bad = not isinstance(name, str) or name in ("", ".", "..") or len(name) > 255
    if bad or any(c in name for c in "/\\:\0"):
        raise ValueError(f"{where} has {_short(name)}, which is not a plain file name inside the dataset")
    return name


def _prefix(value) -> str:
    """'' or relative folders ending in '/' ('build-<id>/'), below the dataset's location."""
    prefix = _typed(value, str, "prefix")
    if prefix and (not prefix.endswith("/") or prefix.startswith("/")):
        raise ValueError(f"prefix {_short(prefix)} is not a relative folder like 'build-<id>/' below the dataset")
    for part in prefix.split("/")[:-1]:
        _plain_name(part, "prefix")
    return prefix


def _rgb(value, where: str) -> list[float]:
    values = _typed(value, list, where)
    ok = len(values) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not ok or not all(math.isfinite(v) and 0 <= v <= 1 for v in values):
        raise ValueError(f"{where} is {_short(values)}, not 3 numbers from 0 to 1 (RGB)")
    return [float(v) for v in values]


def _image_sizes(value) -> dict[str, int]:
    sizes = _typed(value, dict, "image_sizes")
    for key, side in sizes.items():
        if not 0 < _count(side, f"image_sizes.{key}") <= MAX_PIXELS:
            raise ValueError(f"image_sizes.{key} is not a side in pixels")
    return sizes


def _shard_info(x: dict, where: str) -> ShardInfo:
    _typed(x, dict, where)
    _plain_name(x["name"], f"{where}.name")
    sha = _typed(x["sha256"], str, f"{where}.sha256")
    if not _SHA256.fullmatch(sha):  # it names the file in the node cache
        raise ValueError(f"{where}.sha256 is {_short(sha)}, not 64 hex digits")
    return ShardInfo(x["name"], _count(x["samples"], f"{where}.samples"), _count(x["bytes"], f"{where}.bytes"), sha)


def _split(s: dict, where: str, classes: list[str]) -> SplitInfo:
    _typed(s, dict, where)
    shards = [
        _shard_info(x, f"{where}.shards[{i}]") for i, x in enumerate(_typed(s["shards"], list, f"{where}.shards"))
    ]
    n = _count(s["num_samples"], f"{where}.num_samples")
    if sum(x.samples for x in shards) != n:
        raise ValueError(f"{where}.num_samples is {n} but its shards hold {sum(x.samples for x in shards)} samples")
    counts = {
        str(k): _count(v, f"{where}.class_counts.{k}")
        for k, v in _typed(s["class_counts"], dict, f"{where}.class_counts").items()
    }
    if set(counts) - set(classes) or (counts and sum(counts.values()) != n):
        raise ValueError(f"{where}.class_counts do not add up to num_samples ({n}) over the manifest's classes")
    index = _shard_info(s["index"], f"{where}.index") if s.get("index") else None
    if index is not None:
        header = index.bytes - RECORD.itemsize * n  # the .npy header: the rest is one record per sample
        if index.samples != n or not 0 < header <= MAX_INDEX_HEADER:
            raise ValueError(f"{where}.index is {index.samples} samples in {index.bytes} bytes, not the split's {n}")
    return SplitInfo(n, counts, shards, index)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
