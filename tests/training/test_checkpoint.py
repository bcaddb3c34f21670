"""trainer/training/checkpoint.py: atomic, keep-N, and a checkpoint folder read as data, never as code."""

import json
import os
import pickle
import shutil

import pytest
import torch

from trainer.training import checkpoint
from trainer.training.checkpoint import CheckpointError
from trainer.training.randomness import rng_state


def _state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "epoch": 0, "step": step}


def _save(root, step, keep=2):
    return checkpoint.save(
        root, step, (_state(step), {"rng": rng_state()}), rank=0, agree=lambda failed: failed, keep=keep
    )


def test_save_is_complete_and_keeps_last_n(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    names = [p.name for p in checkpoint.complete_checkpoints(tmp_path)]
    assert names == ["ckpt-000000002", "ckpt-000000003"]
    state, own = checkpoint.read(tmp_path / "ckpt-000000003", rank=0)
    assert state["step"] == 3 and "torch" in own["rng"]  # the RNG states load as data too
    assert checkpoint.read(tmp_path / "ckpt-000000003", rank=1)[1] is None  # a rank the job did not have
    marker = json.loads((tmp_path / "ckpt-000000003" / "COMPLETE").read_text())
    assert set(marker["files"]) == {"state.pt", "rank0.pt"}
    assert marker["files"]["state.pt"]["size"] == (tmp_path / "ckpt-000000003" / "state.pt").stat().st_size


def test_only_complete_ckpt_digits_folders_count(tmp_path):
    _save(tmp_path, 1)
    torn = tmp_path / "ckpt-000000005.tmp"  # a write killed before its marker
    torn.mkdir()
    (torn / "COMPLETE").write_text("{}")
    shutil.copytree(tmp_path / "ckpt-000000001", tmp_path / "ckpt-000000050.bak")  # a user's copy
    (tmp_path / "ckpt-x").mkdir()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["ckpt-000000001"]


def _damage(path, how):
    state = path / "state.pt"
    data = bytearray(state.read_bytes())
    if how == "truncated":
        state.write_bytes(data[: len(data) // 2])
    elif how == "values changed":  # the zip stays intact: only the checksum can tell
        data[-200] ^= 0xFF
        state.write_bytes(bytes(data))
    elif how == "rank file missing":
        (path / "rank0.pt").unlink()
    elif how == "no checksums":
        (path / "COMPLETE").write_text(json.dumps({"step": 1, "epoch": 0}))


@pytest.mark.parametrize(
    "how, reason",
    [
        ("truncated", r"state.pt is truncated \(\d+ of \d+ bytes\)"),
        ("values changed", r"state.pt changed after it was written \(its sha256 differs\)"),
        ("rank file missing", r"rank0.pt cannot be read \(No such file or directory\)"),
        ("no checksums", r"it records no checksums \(written by an older version\)"),
    ],
)
def test_a_damaged_checkpoint_is_refused_with_its_reason(tmp_path, how, reason):
    path = _save(tmp_path, 1)
    _damage(path, how)
    with pytest.raises(CheckpointError, match=rf"^ckpt-000000001: {reason}$"):
        checkpoint.read(path, rank=0)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


def test_a_pickle_with_a_matching_checksum_never_runs(tmp_path):
    """Someone rewrites state.pt and its marker alike: the file is still read as data only."""
    global MARK
    MARK = tmp_path / "ran"
    path = _save(tmp_path, 1)
    evil = pickle.dumps({"model": RunsCode()})
    (path / "state.pt").write_bytes(evil)
    marker = json.loads((path / "COMPLETE").read_text())
    marker["files"]["state.pt"] = checkpoint._digest(evil)
    (path / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=r"^ckpt-000000001: state.pt cannot be loaded as data"):
        checkpoint.read(path, rank=0)
    assert not MARK.exists()


def test_prune_never_removes_the_newest(tmp_path):
    _save(tmp_path, 1, keep=1)
    _save(tmp_path, 2, keep=1)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["ckpt-000000002"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert sorted(os.listdir(tmp_path / "ckpt-000000002")) == ["COMPLETE", "rank0.pt", "state.pt"]
