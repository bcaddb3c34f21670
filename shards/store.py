"""Where a dataset's files live: a local folder or a URL, read (and for make_shards written)
through fsspec.

    /data/shards  s3://bucket/prefix  gs://bucket/prefix  https://host/path  pipe:CMD

Credentials and endpoints come from each store's own chain (for S3 the AWS environment
variables and profiles, ``AWS_ENDPOINT_URL`` for MinIO or Ceph); nothing here stores them, and
every location shown to the user goes through `redact` first. ``pipe:CMD`` runs a shell command
whose output is the file (``{path}`` in CMD is replaced by the file's path in the dataset), so it
is refused unless the caller allows it. Transient failures are retried with backoff; what still
fails is a `DataError` with one line that names the file. It is not chained to the client's
exception: that one's text may quote a URL's token or a pipe's command line, which `redact` keeps
out of the line and a --debug traceback must not bring back.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

from toolbox.errors import DataError, first_line
from toolbox.redact import redact, redact_text

SCHEMES = ("s3", "gs", "gcs", "http", "https")
CHUNK = 8 << 20
BACKOFF_S = 1.0  # first retry after 1 s, then 2, 4, ... capped at 30
# Retries are ours (with backoff, data.fetch_retries); the client's own would multiply them.
S3_OPTIONS = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 1}}}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location: str) -> bool:
    return bool(_URL.match(location)) or location.startswith("pipe:")


def hint(location: str) -> str:
    """What to check when ``location`` cannot be reached, by kind of store."""
    scheme = location.split("://", 1)[0].lower() if _URL.match(location) else ""
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return (
            f"check the network and AWS_ENDPOINT_URL (now {redact(endpoint)})"
            if endpoint
            else "check the network and the bucket's region"
        )
    if scheme in ("gs", "gcs"):
        return "check the network"
    return "check the network and the URL"


class Store:
    """One dataset location. Paths given to its methods are '/'-separated and relative to it."""

    def __init__(self, location: str, retries: int = 5, allow_pipe: bool = False):
        self.location = str(location)
        self.shown = redact(self.location)
        self.retries = retries
        self.scheme = ""
        if self.location.startswith("pipe:"):
            if not allow_pipe:
                raise DataError(f"{self.shown} runs a shell command — set data.allow_pipe=true if you mean it")
            if "{path}" not in self.location:
                raise DataError(
                    "a pipe: location needs {path} where the file's path goes, e.g. 'pipe:aws s3 cp s3://b/x/{path} -'"
                )
            self.scheme = "pipe"
        elif _URL.match(self.location):
            self.scheme = self.location.split("://", 1)[0].lower()
            if self.scheme not in SCHEMES:
                raise DataError(
                    f"{self.shown}: {self.scheme}:// is not supported — use a local path, s3://, gs://, http(s):// or pipe:"
                )
        self._fs = None
        self._pid = None

    @property
    def local(self) -> Path | None:
        """The folder, when the dataset is on a file system this machine mounts."""
        return None if self.scheme else Path(self.location)

    @property
    def read_only(self) -> bool:
        return self.scheme in ("http", "https", "pipe")

    def url(self, rel: str) -> str:
        if self.local is not None:
            return str(self.local / rel)
        if self.scheme == "pipe":
            return self.location.replace("{path}", shlex.quote(rel))
        parts = urlsplit(self.location)
        path = parts.path.rstrip("/") + "/" + rel
        return urlunsplit(
            (parts.scheme, parts.netloc, path, parts.query, "")
        )  # a token in the query goes with each file

    def show(self, rel: str) -> str:
        return redact(self.url(rel))

    def fs(self):
        """fsspec's file system for this location, made once per process (forked loader workers
        must not share a parent's client)."""
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            try:
                options = S3_OPTIONS if self.scheme == "s3" else {}
                self._fs = (
                    fsspec.core.url_to_fs(self.url("x"), skip_instance_cache=True, **options)[0]
                    if self.scheme != "pipe"
                    else None
                )
            except ImportError as e:
                raise DataError(f"{self.shown} needs the {e.name} package — pip install {e.name}") from e
            self._pid = os.getpid()
        return self._fs

    # -- reading ---------------------------------------------------------------------------

    def read_bytes(self, rel: str, retries: int | None = None, limit: int | None = None) -> bytes:
        """The whole file; with a limit, at most limit + 1 bytes, whatever the server sends (the
        caller tells a file that is too large by its length)."""

        def attempt() -> bytes:
            if limit is None and self.scheme != "pipe":
                return self.fs().cat_file(self._fs_path(rel))
            with self._open(rel) as f:
                return f.read() if limit is None else _read_up_to(f, limit + 1)

        return self._retried(rel, attempt, retries)

    def download(self, rel: str, out: BinaryIO) -> tuple[int, str]:
        """Stream the whole file into ``out`` (from its start); -> (bytes, sha256 hex)."""

        def attempt() -> tuple[int, str]:
            out.seek(0)  # not truncated first: the cache has reserved the file's full size
            sha, size = hashlib.sha256(), 0
            with self._open(rel) as f:
                while chunk := f.read(CHUNK):
                    out.write(chunk)
                    sha.update(chunk)
                    size += len(chunk)
            out.truncate(size)
            out.flush()
            return size, sha.hexdigest()

        return self._retried(rel, attempt)

    def _open(self, rel: str):
        if self.scheme == "pipe":
            import webdataset

            return webdataset.gopen(self.url(rel), "rb")
        # HTTP: one streamed GET (servers that ignore Range would otherwise hand back wrong bytes)
        block = {"block_size": 0} if self.scheme in ("http", "https") else {}
        return self.fs().open(self._fs_path(rel), "rb", **block)

    def _fs_path(self, rel: str) -> str:
        url = self.url(rel)
        return url if self.scheme in ("http", "https") else self.fs()._strip_protocol(url)

    def _retried(self, rel: str, attempt: Callable, retries: int | None = None):
        retries = self.retries if retries is None else retries
        for tries in range(retries + 1):
            try:
                return attempt()
            except Exception as e:  # fsspec back-ends raise their clients' own exception types
                transient, reason = classify(e, self.scheme)
                if self.scheme == "pipe":  # its message quotes the command line, which may hold a secret
                    transient, reason = True, "the command failed"
                if not transient:
                    raise DataError(f"{self.show(rel)}: {reason}") from None
                if tries == retries:
                    raise DataError(
                        f"{self.show(rel)} could not be read ({reason}; {tries + 1} attempts) — {hint(self.location)}, "
                        "then start the same command again"
                    ) from None
                time.sleep(min(30.0, BACKOFF_S * 2**tries))

    def check(self, rel: str, limit: int | None = None) -> bytes:
        """``rel`` (the manifest), read before any work, with one line for each way it can fail."""
        try:
            return self.read_bytes(rel, limit=limit)
        except DataError as e:
            if self.local is not None or self.scheme == "pipe":
                raise
            raise DataError(self._diagnose(rel)) from e

    def _diagnose(self, rel: str) -> str:
        """Why ``rel`` cannot be read: no credentials, no bucket, no prefix, no file, no endpoint."""
        fs, where = self.fs(), self.shown.rstrip("/")
        try:
            if fs.exists(self._fs_path(rel)):
                return f"{self.show(rel)} exists but cannot be read — {hint(self.location)}"
            if self.scheme in ("http", "https"):
                return f"{where} has no {rel} — check the URL, or make shards there first"
            bucket = self._fs_path("x").split("/", 1)[0]
            if not fs.exists(bucket):
                return f"bucket {bucket!r} does not exist ({where}) — check the name, or create it"
            fs.invalidate_cache()
            if not fs.exists(self._fs_path("").rstrip("/")):
                return f"nothing at {where} — check the prefix, or make shards there with `python -m launch.make_shards SRC {where}`"
            return f"{where} has no {rel} — make shards there with `python -m launch.make_shards SRC {where}`"
        except Exception as e:
            transient, reason = classify(e, self.scheme)
            return f"{where}: {reason}" + (f" — {hint(self.location)}" if transient else "")

    # -- writing (make_shards) ---------------------------------------------------------------

    def list(self) -> list[str]:
        """Every file under the location, relative to it."""
        fs, root = self.fs(), self._fs_path("").rstrip("/")
        fs.invalidate_cache()
        try:
            found = fs.find(root)
        except FileNotFoundError:
            raise DataError(
                f"bucket {root.split('/', 1)[0]!r} does not exist ({self.shown}) — create it first"
            ) from None
        except Exception as e:
            raise DataError(f"{self.shown}: {classify(e, self.scheme)[1]}") from None
        return sorted(p[len(root) + 1 :] for p in found)

    def upload(self, local: Path, rel: str) -> None:
        fs, path = self.fs(), self._fs_path(rel)
        self._retried(rel, lambda: fs.put_file(str(local), path))

    def delete(self, rels: list[str]) -> None:
        fs = self.fs()
        for rel in rels:
            self._retried(rel, lambda rel=rel: fs.rm_file(self._fs_path(rel)))


def _read_up_to(f: BinaryIO, size: int) -> bytes:
    """A stream may return less than asked for before its end (HTTP does): read on until size or EOF."""
    parts, got = [], 0
    while got < size and (chunk := f.read(min(CHUNK, size - got))):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# Exception class names (from botocore, aiohttp, google-auth, fsspec) by what they mean.
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError")
_UNREACHABLE = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ClientConnectorError",
    "ConnectionError",
    "ConnectionRefusedError",
    "ServerDisconnectedError",
    "ReadTimeoutError",
    "TimeoutError",
    "ClientPayloadError",
    "IncompleteReadError",
    "ResponseStreamingError",
    "ServerTimeoutError",
)


CREDENTIALS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
}


def classify(e: BaseException, scheme: str = "") -> tuple[bool, str]:
    """-> (worth retrying, a short reason for the user)."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & set(_NO_CREDENTIALS):
        how = CREDENTIALS.get("gs" if scheme == "gcs" else scheme, "configure the store's credentials")
        return False, f"no credentials found — {how}"
    if isinstance(e, FileNotFoundError):
        return False, "not found"
    if isinstance(e, PermissionError) or "AccessDenied" in str(e) or "Forbidden" in str(e):
        return False, "access denied — check the credentials and the bucket's permissions"
    if names & set(_UNREACHABLE):
        return True, f"endpoint unreachable ({type(e).__name__})"
    if isinstance(e, (TypeError, AttributeError, KeyError, ImportError)):  # a bug or a broken install, not the network
        return False, f"{type(e).__name__}: {e}"
    status = getattr(e, "status", None) or getattr(e, "code", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return False, f"HTTP {status}"
    return True, f"{type(e).__name__}: {redact_text(first_line(e))}"
