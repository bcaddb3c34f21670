"""OUT/manifest.json: what is in the shards, so that nothing downstream scans a tar to find out.

Also writes timm's ``_info.json`` (shard file names and lengths per split) next to it, so
timm's webdataset reader can read our output as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards.errors import DataError, first_line
from shards.format import MANIFEST, TIMM_INFO

FORMAT_VERSION = 1
MAKE_CMD = "python -m launch.make_shards SRC OUT"


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


@dataclass
class Manifest:
    classes: list[str]
    splits: dict[str, SplitInfo]
    mean: list[float]
    std: list[float]
    options: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    source: str = ""
    created: str = ""  # the one field that differs between two identical runs
    version: int = FORMAT_VERSION
    prefix: str = ""  # where the splits' folders sit below OUT ("" or "build-<id>/", see launch/publish.py)
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
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path} cannot be read ({e.strerror}) — check its permissions") from e
        return cls.parse(raw, str(path), root)

    @classmethod
    def parse(cls, raw: bytes, where: str, root: Path | None = None) -> Manifest:
        """The manifest in ``raw`` (read from ``where``, named in errors); ``root`` is OUT when it
        is a local folder."""
        try:
            manifest = cls.from_dict(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            reason = f"missing field {e}" if isinstance(e, KeyError) else first_line(e)
            raise DataError(f"{where} is not a valid manifest ({reason}) — re-run `{MAKE_CMD}`") from e
        manifest.root, manifest.sha256 = root, hashlib.sha256(raw).hexdigest()
        return manifest

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        if not isinstance(d, dict):
            raise ValueError("top level is not an object")
        if d.get("version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"format version {d['version']} is newer than this code reads ({FORMAT_VERSION})")
        splits = {}
        for name, s in d["splits"].items():
            shards = [_shard_info(x) for x in s["shards"]]
            index = _shard_info(s["index"]) if s.get("index") else None
            split = SplitInfo(
                int(s["num_samples"]), {str(k): int(v) for k, v in s["class_counts"].items()}, shards, index
            )
            if sum(x.samples for x in shards) != split.num_samples:
                raise ValueError(f"split {name!r}: shard sample counts do not add up to num_samples")
            splits[str(name)] = split
        classes = [str(c) for c in d["classes"]]
        mean, std = [float(x) for x in d["mean"]], [float(x) for x in d["std"]]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std must have 3 values (RGB)")
        return cls(
            classes=classes,
            splits=splits,
            mean=mean,
            std=std,
            options=dict(d.get("options", {})),
            skipped=list(d.get("skipped", [])),
            duplicates=list(d.get("duplicates", [])),
            source=str(d.get("source", "")),
            created=str(d.get("created", "")),
            version=int(d.get("version", FORMAT_VERSION)),
            prefix=str(d.get("prefix", "")),
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


def _shard_info(x: dict) -> ShardInfo:
    return ShardInfo(str(x["name"]), int(x["samples"]), int(x["bytes"]), str(x["sha256"]))


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
