"""Walking a folder a user gave (make_shards' SRC, predict's and evaluate's image folders): symlinks
are followed, each real folder once (a link loop, two links to one folder), hidden folders left out,
and never into a folder that holds the one given (a link to `/` or to a parent): such a walk would
leave what it was given and list the whole machine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def walk(root: Path, given: Path | None = None) -> Iterator[tuple[str, list[str]]]:
    """(folder, its file names sorted) for ``root`` and every folder below it, in a stable order.
    ``given``: the folder the user named, when ``root`` is inside it (default: ``root``)."""
    given = Path(given or root)
    top, seen = os.path.realpath(given), set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        holds_given = real == top or top.startswith(real.rstrip(os.sep) + os.sep)
        if real in seen or (holds_given and Path(folder) != given):
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield folder, sorted(files)
