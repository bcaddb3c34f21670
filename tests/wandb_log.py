"""Offline wandb runs read back with wandb's own reader (`wandb leet inspect`), for the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def segments(run_dir: Path) -> list[Path]:
    """The run's offline segments, one per process start (and per export), oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def inspect(segment: Path, *flags: str) -> str:
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(segment)]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", check=True, timeout=120).stdout


def records(segment: Path) -> list[dict]:
    """Every record of the segment's transaction log, as wandb wrote it."""
    return [json.loads(line) for line in inspect(segment).splitlines() if line.strip()]


def of_type(log: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in log if r["type"] == kind]


def history(log: list[dict]) -> dict[int, dict]:
    """step -> the logged row (nested values flattened with dots: `eval/per_class.path`)."""
    return {h["step"]["num"]: h["item"] for h in of_type(log, "history")}


def summary(segment: Path) -> dict:
    """The run's state as wandb sees it: summary, config, ..."""
    return json.loads(inspect(segment, "--summary"))


def table(segment: Path, row: dict, key: str) -> dict:
    """A logged table's columns and data, from the file the history row points at."""
    return json.loads((segment / "files" / row[f"{key}.path"]).read_text(encoding="utf-8"))


def model_versions(log: list[dict], kind: str = "model") -> list[dict]:
    return [a for a in of_type(log, "artifact") if a["type"] == kind]


def step_of(artifact: dict) -> int:
    return next(int(alias[5:]) for alias in artifact["aliases"] if alias.startswith("step-"))


def fetch(artifact: dict, into: Path) -> Path:
    """The artifact's files as `wandb artifact get` would lay them out (offline: from the staged copies)."""
    into.mkdir(parents=True)
    for entry in artifact["manifest"]["contents"]:
        (into / entry["path"]).write_bytes(Path(entry["local_path"]).read_bytes())
    return into
