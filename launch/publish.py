"""make_shards output -> object storage (s3://, gs://): shards first, the manifest last.

A reader takes a location for a dataset once its manifest.json is there, so the manifest is the
last object written, and a half-uploaded dataset is never taken for a complete one. Object
stores cannot rename a folder, so when OUT already holds a dataset the new shards go under a
build prefix of their own (``build-<id>/train/...``, named in the new manifest): the old dataset
stays complete and readable until the new manifest replaces the old one, and only then are the
old dataset's objects deleted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from launch.scan import SPLITS
from shards.format import MANIFEST, TIMM_INFO
from shards.manifest import Manifest
from shards.store import Store
from toolbox.errors import UserError


class RemoteOut:
    """OUT on object storage: checked before any work, written once the output is complete."""

    def __init__(self, location: str, overwrite: bool):
        self.store = Store(location)
        if self.store.read_only:
            raise UserError(f"OUT {self.store.shown} is read-only — write to a folder, s3:// or gs://")
        self.existing = self.store.list()
        if self.existing and not overwrite:
            raise UserError(
                f"OUT {self.store.shown} is not empty — pass --overwrite to replace it, or choose a new prefix"
            )

    @property
    def shown(self) -> str:
        return self.store.shown

    def place(self, manifest: Manifest) -> None:
        """Decide where the new splits go (before the manifest is written)."""
        manifest.prefix = self.prefix = build_prefix(manifest, self.existing)

    def put(self, stage: Path, progress=lambda files: files) -> None:
        upload(stage, self.store, self.prefix, self.existing, progress)


def build_prefix(manifest: Manifest, existing: list[str]) -> str:
    """Where the splits' folders go: OUT itself when it holds no dataset, else a build folder
    named by the new shards' contents."""
    if MANIFEST not in existing:
        return ""
    digest = hashlib.sha256()
    for split in sorted(manifest.splits):
        for shard in manifest.splits[split].shards:
            digest.update(shard.sha256.encode())
    return f"build-{digest.hexdigest()[:12]}/"


def upload(stage: Path, store: Store, prefix: str, existing: list[str], progress=lambda files: files) -> None:
    """Everything in ``stage`` to the store, the manifest last; then what OUT held before goes."""
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    rels = {p: _remote_name(p.relative_to(stage).as_posix(), prefix) for p in files}
    last = [p for p in files if rels[p] in (TIMM_INFO, MANIFEST)]
    last.sort(key=lambda p: rels[p] == MANIFEST)
    for path in progress([p for p in files if p not in last] + last):
        store.upload(path, rels[path])
    store.delete([rel for rel in existing if rel not in set(rels.values())])


def _remote_name(rel: str, prefix: str) -> str:
    top = rel.split("/", 1)[0]
    return prefix + rel if top in SPLITS else rel
