import os

import torch

from trainer import checkpoint
from trainer.state import rng_state


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
    path, state, rank_state = checkpoint.load_newest(tmp_path, rank=0)
    assert path.name == "ckpt-000000003" and state["step"] == 3 and "torch" in rank_state["rng"]


def test_incomplete_and_corrupted_checkpoints_are_skipped(tmp_path, recwarn):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    # a write killed before its marker: a .tmp dir, never picked
    torn = tmp_path / "ckpt-000000005.tmp"
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"garbage")
    # the newest complete one corrupted afterwards: skipped with a warning naming it
    (tmp_path / "ckpt-000000002" / "state.pt").write_bytes(b"not a checkpoint")
    path, state, _ = checkpoint.load_newest(tmp_path, rank=0)
    assert path.name == "ckpt-000000001" and state["step"] == 1
    assert any("ckpt-000000002" in str(w.message) for w in recwarn)


def test_prune_never_removes_the_newest(tmp_path):
    _save(tmp_path, 1, keep=1)
    _save(tmp_path, 2, keep=1)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["ckpt-000000002"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert sorted(os.listdir(tmp_path / "ckpt-000000002")) == ["COMPLETE", "rank0.pt", "state.pt"]
