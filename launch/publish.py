"""make_shards output -> object storage (s3://, gs://): shards first, the manifest last.

A reader takes a location for a dataset once its manifest.json is there, so the manifest is the
last object written, and a half-uploaded dataset is never taken for a complete one. Object
stores cannot rename a folder, so when OUT already holds a dataset the new shards go under a
build prefix of their own (``build-<id>/train/...``, named in the new manifest): the old dataset
stays complete and readable until the new manifest replaces the old one, and only then are the
old dataset's objects deleted. An upload stopped before its manifest (an error, Ctrl-C, SIGTERM)
takes back the objects it wrote, so OUT is left as it was found; the leftovers of one that could
not (a killed process) are recognised as such and replaced by the next run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from shards.format import CLASS_PLOT, MANIFEST, SIZE_PLOT, SUMMARY, TIMM_INFO
from shards.manifest import Manifest
from shards.splits import SPLITS
from shards.store import Store
from toolbox import failpoints
from toolbox.errors import UserError


class RemoteOut:
    """OUT on object storage: checked before any work, written once the output is complete."""

    def __init__(self, location: str, overwrite: bool):
        self.store = Store(location)
        if self.store.read_only:
            raise UserError(f"OUT {self.store.shown} is read-only — write to a folder, s3:// or gs://")
        self.existing = self.store.list()
        self.note = None
        if self.existing and not overwrite:
            if not unfinished_upload(self.existing):
                raise UserError(
                    f"OUT {self.store.shown} is not empty — pass --overwrite to replace it, or choose a new prefix"
                )
            self.note = (
                f"note: OUT {self.store.shown} holds {len(self.existing)} objects of an upload that did not finish "
                "(no manifest.json): they are replaced"
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
    """Everything in ``stage`` to the store, the manifest last; then what OUT held before goes.
    Stopped before the manifest, it deletes the objects it added (those it overwrote were only
    ever an unfinished upload's or, beside a dataset, its summary files)."""
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    rels = {p: _remote_name(p.relative_to(stage).as_posix(), prefix) for p in files}
    last = [p for p in files if rels[p] in (TIMM_INFO, MANIFEST)]
    last.sort(key=lambda p: rels[p] == MANIFEST)
    added: list[str] = []
    try:
        for path in progress([p for p in files if p not in last] + last):
            added += [rels[path]] if rels[path] not in existing else []
            store.upload(path, rels[path])
            if len(added) == 1:
                failpoints.pause("upload-pause")  # a test interrupts the upload here
    except BaseException:
        if MANIFEST not in added:  # no reader can take this upload for a dataset: take it back
            try:
                store.delete(added)
            except Exception:  # best effort: the next run recognises what is left as an unfinished upload
                pass
        raise
    store.delete([rel for rel in existing if rel not in set(rels.values())])


def unfinished_upload(existing: list[str]) -> bool:
    """Whether OUT holds only what an upload of ours writes before its manifest (a killed one's)."""
    tops = {rel.split("/", 1)[0] for rel in existing if "/" in rel}
    files = {rel for rel in existing if "/" not in rel}
    ours = all(top in SPLITS or top.startswith("build-") for top in tops)
    return MANIFEST not in existing and ours and files <= {TIMM_INFO, SUMMARY, CLASS_PLOT, SIZE_PLOT}


def _remote_name(rel: str, prefix: str) -> str:
    top = rel.split("/", 1)[0]
    return prefix + rel if top in SPLITS else rel
