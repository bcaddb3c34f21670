"""`model.pretrained=imagenet`: torchvision's ImageNet DenseNet weights, through torchvision's
weights API and torch.hub's cache (`$TORCH_HOME/hub/checkpoints`, default ~/.cache/torch), and
`python -m trainer.fetch_weights`, which fills that cache on a machine with internet.

One process per cache downloads while the others wait on a file lock beside the file (every rank
of a job, and other jobs on the node or, on NFS, the cluster), then each reads the cached file.
torch.hub checks the sha256 prefix in the file's name when it downloads and moves the file into
place only then, so a file in the cache was whole when it came; like torch.hub, a run does not
hash it again at every start (fetch_weights does, on request). Without network and without the
file, the run stops with one line naming the fetch_weights command.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch

from toolbox import lock
from toolbox.cli import Console, add_debug_flag, run_command
from toolbox.errors import UserError, first_line
from trainer.training.config import IMAGENET, TORCHVISION_DENSENETS, load_config

FETCH = "python -m trainer.fetch_weights"
# A compute node whose firewall drops packets would otherwise hold every start for minutes (the
# kernel's connect retries) before the same one-line error.
DOWNLOAD_TIMEOUT_S = 60
HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's HASH_REGEX: densenet121-a639ec97.pth


def torchvision_weights(depth: int):
    """torchvision's ImageNet weights entry (a WeightsEnum member) for a DenseNet depth."""
    from torchvision.models import DenseNet121_Weights, DenseNet161_Weights, DenseNet169_Weights, DenseNet201_Weights

    shipped = {
        121: DenseNet121_Weights.IMAGENET1K_V1,
        161: DenseNet161_Weights.IMAGENET1K_V1,
        169: DenseNet169_Weights.IMAGENET1K_V1,
        201: DenseNet201_Weights.IMAGENET1K_V1,
    }
    if depth not in shipped:
        names = ", ".join(f"densenet{d}" for d in shipped)
        raise UserError(f"torchvision has no ImageNet weights for a DenseNet of depth {depth} — use one of {names}")
    return shipped[depth]


def cache_dir() -> Path:
    """Where torch.hub keeps downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_file(weights) -> Path:
    return cache_dir() / Path(urlparse(weights.url).path).name


def fetch_command(depth: int) -> str:
    return f"{FETCH} densenet{depth}"


def imagenet_state_dict(depth: int, console: Console, progress: bool = False) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict for the depth, from the cache, downloaded into it first
    by whichever process takes the lock (the others wait, then read the file)."""
    weights = torchvision_weights(depth)
    path = cached_file(weights)
    if path.is_file():
        return _get(weights, depth, progress)
    with _turn_to_fetch(path, console) as failed_for_the_holder:
        if failed_for_the_holder:  # the same job's other ranks do not each wait for the same failure
            raise UserError(failed_for_the_holder)
        if not path.is_file():
            console.say(f"downloading torchvision's densenet{depth} ImageNet weights to {path}")
        return _get(weights, depth, progress)


def _get(weights, depth: int, progress: bool) -> dict[str, torch.Tensor]:
    """weights.get_state_dict: torch.hub downloads the file when it is not cached (checking its
    hash), then reads it with weights_only (tensors, no pickled code)."""
    path = cached_file(weights)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(progress=progress, check_hash=True, weights_only=True)
    except Exception as e:  # torch.load's and urllib's errors have no common base worth naming
        if path.is_file():  # a torn copy, a disk error: not a download problem
            raise UserError(
                f"the cached ImageNet weights {path} cannot be read ({first_line(e)}) — delete the file and run "
                f"`{fetch_command(depth)}` (it downloads them again and checks their sha256)"
            ) from e
        if "invalid hash value" in str(e):  # torch.hub's words for a download that is not the file
            raise UserError(
                f"the download of {weights.url} does not match the sha256 in its name ({first_line(e)}) — a proxy's "
                f"page or a broken transfer; run `{fetch_command(depth)}` again"
            ) from e
        raise UserError(
            f"model.pretrained=imagenet needs torchvision's densenet{depth} ImageNet weights, which are not in the "
            f"cache ({path.parent}) and cannot be downloaded here ({first_line(e)}) — run `{fetch_command(depth)}` "
            "on a machine with internet (a login node), with the same TORCH_HOME"
        ) from e


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torch.hub's urlopen has no timeout of its own: the process default applies while it runs."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def _turn_to_fetch(path: Path, console: Console) -> Iterator[str | None]:
    """This process's turn to fetch `path`, under a flock on `path`.lock. Yields the failure the
    holder it waited for wrote into the lock file (None when it did not wait or that one
    succeeded); a UserError inside is written there for the next waiter. A file system without
    locks: no turn, at worst two processes download (each into a temporary file, renamed whole)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(
            f"cannot write torch.hub's cache {path.parent} ({first_line(e)}) — set TORCH_HOME to a writable "
            f"folder, or fill this one with `{FETCH}` as its owner"
        ) from e
    try:
        waited = _take(fd, path, console)
        failure = _record(fd).get("failed") if waited else None
        if waited is not None:
            lock.hold(fd)
        try:
            yield failure
        except UserError as e:
            if waited is not None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({**lock.holder(), "failed": first_line(e)}).encode(), 0)
            raise
        finally:
            lock.let_go(fd)
    finally:
        os.close(fd)  # drops the flock


def _take(fd: int, path: Path, console: Console) -> bool | None:
    """Takes the lock, waiting for its holder: whether it had to wait; None without locks."""
    try:
        holder = lock.flock(fd)
    except OSError as e:
        if e.errno in lock.NO_LOCKS:
            return None
        raise
    if holder is None:
        return False
    console.say(f"waiting for {lock.describe(holder)}, which is fetching {path.name}")
    fcntl.flock(fd, fcntl.LOCK_EX)
    return True


def _record(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


# ----------------------------------------------------------------------------- fetch_weights


def fetch(depth: int, console: Console) -> Path:
    """The cached file for the depth: downloaded (hash checked by torch.hub) when absent, else
    hashed here, then read once to be sure it loads."""
    weights = torchvision_weights(depth)
    path = cached_file(weights)
    if path.is_file():
        _check_sha256(path, depth)
    imagenet_state_dict(depth, console, progress=sys.stderr.isatty())
    return path


def _check_sha256(path: Path, depth: int) -> None:
    match = HASH_IN_NAME.search(path.name)
    if match is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise UserError(
            f"{path} does not match the sha256 in its name (it starts {digest.hexdigest()[:12]}) — a torn or "
            f"replaced copy; delete it and run `{fetch_command(depth)}` again"
        )


def parse_depth(name: str) -> int:
    """densenet121, DenseNet-121 or 121 -> 121."""
    match = re.fullmatch(r"(?:densenet[-_]?)?(\d+)", name.strip().lower())
    depth = int(match.group(1)) if match else None
    if depth not in TORCHVISION_DENSENETS:
        names = ", ".join(f"densenet{d}" for d in TORCHVISION_DENSENETS)
        raise UserError(f"no torchvision ImageNet weights named {name!r} — give one of {names} (or just 121)")
    return depth


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=FETCH,
        usage=f"{FETCH} MODEL [MODEL ...]  |  {FETCH} --config CONFIG [section.key=value ...]",
        description="Download torchvision's ImageNet DenseNet weights into torch.hub's cache ($TORCH_HOME/hub/"
        "checkpoints), or check the copy already there, and print where it is: run it on a machine with internet "
        "(a login node) before training with model.pretrained=imagenet where there is none.",
    )
    p.add_argument(
        "models", nargs="*", metavar="MODEL", help="densenet121, densenet161, densenet169, densenet201 or 121, ..."
    )
    p.add_argument("--config", metavar="CONFIG", help="fetch the weights for this training config's model.depth")
    add_debug_flag(p)
    return p


def _depths(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[int]:
    if args.config is None:
        if not args.models:
            parser.error("give a MODEL (e.g. densenet121) or --config CONFIG")
        return [parse_depth(name) for name in args.models]
    # Only model.* matters here; the keys a run needs besides get placeholders, so a config written
    # for `data.shards=OUT` on the command line reads as it is. What comes after CONFIG are overrides.
    config = load_config(args.config, ["data.shards=unused", "run.dir=unused", *args.models])
    if config.model.pretrained != IMAGENET:
        print(f"note: {args.config} does not set model.pretrained=imagenet; these weights are for when it does")
    if config.model.depth not in TORCHVISION_DENSENETS:
        raise UserError(
            f"{args.config} has model.depth={config.model.depth}, for which torchvision has no ImageNet weights — "
            f"pass model.depth=121 (or 161, 169, 201), or name the model: `{FETCH} densenet121`"
        )
    return [config.model.depth]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    def body() -> int:
        console = Console()
        for depth in _depths(args, parser):
            path = fetch(depth, console)
            size = path.stat().st_size / 2**20
            console.say(f"densenet{depth}: {path} ({size:.1f} MiB, sha256 checked)")
        console.say(
            f"TORCH_HOME={os.environ.get('TORCH_HOME', '(unset: ~/.cache/torch)')}: a run finds the "
            "weights there when its TORCH_HOME is the same"
        )
        return 0

    return run_command(body, args.debug, again=f"run `{FETCH}` again")
