"""A run dir's checkpoints as a hostile or unlucky user leaves them: 2 real gloo processes each."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from tests.conftest import EXACT, run_module, run_training

pytestmark = pytest.mark.e2e


def copy_of(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("wandb", ".lock"))
    return copy


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_a_damaged_rank_file_moves_every_rank_back_to_the_same_checkpoint(digits_shards, uninterrupted, tmp_path):
    run_dir = copy_of(uninterrupted, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "ckpt-000000050")  # the newest is now 49: damage its rank 1 file
    rank1 = run_dir / "checkpoints" / "ckpt-000000049" / "rank1.pt"
    rank1.write_bytes(rank1.read_bytes()[:100])
    (run_dir / "final.safetensors").unlink()
    result = run_training([f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT])
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: checkpoint")]
    assert len(notes) == 1 and notes[0].startswith("note: checkpoint ckpt-000000049: rank1.pt is truncated (100 of ")
    assert notes[0].endswith(" — skipped; resuming from ckpt-000000042 instead"), notes
    assert "resuming from" in result.stdout and "ckpt-000000042 (epoch 2, step 42)" in result.stdout
    expected, got = load_file(uninterrupted / "final.safetensors"), load_file(run_dir / "final.safetensors")
    assert all(expected[name].equal(got[name]) for name in expected)  # both ranks went back together


def test_a_refused_resume_leaves_the_finished_run_as_it_was(digits_shards, uninterrupted, tmp_path):
    run_dir = copy_of(uninterrupted, tmp_path)
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "status.json", "metrics.jsonl")}
    result = run_training([f"data.shards={digits_shards}", f"run.dir={run_dir}", *EXACT, "model.growth_rate=16"])
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-3000:]  # the launcher says 1
    lines = errors(result.stderr)
    assert len(lines) == 1 and " is of another model " in lines[0] and "use a new run.dir" in lines[0], lines
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    evaluate = run_module("trainer.evaluate", run_dir, "--workers", "0")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]  # its own best weights still fit its config


def test_evaluate_last_skips_a_checkpoint_changed_after_it_was_written(uninterrupted, tmp_path):
    run_dir = copy_of(uninterrupted, tmp_path)
    state = run_dir / "checkpoints" / "ckpt-000000050" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the zip: it still opens, the numbers are wrong
    state.write_bytes(bytes(data))
    result = run_module("trainer.evaluate", run_dir, "--checkpoint", "last", "--workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "note: checkpoint ckpt-000000050: state.pt changed after it was written (its sha256 differs) — skipped; "
        "using ckpt-000000049 instead"
    ) in result.stderr


def test_a_resume_on_other_shards_is_refused_unless_allowed_and_then_recorded(digits_shards, uninterrupted, tmp_path):
    run_dir = copy_of(uninterrupted, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "ckpt-000000050")  # unfinished: the newest is step 49
    (run_dir / "final.safetensors").unlink()
    other = tmp_path / "rebuilt"  # the same samples; a rebuild with another --seed would differ as much
    shutil.copytree(digits_shards, other, ignore=shutil.ignore_patterns("images"))
    (other / "manifest.json").write_text((other / "manifest.json").read_text() + "\n")
    overrides = [f"data.shards={other}", f"run.dir={run_dir}", *EXACT]
    refused = run_training(overrides)
    lines = errors(refused.stderr)
    assert refused.returncode != 0 and len(lines) == 1, refused.stderr[-3000:]
    assert f"the shards at {other} are not the ones checkpoint" in lines[0]
    assert lines[0].endswith("or set train.resume_on_new_data=true to go on anyway (recorded in metrics.jsonl)")
    allowed = run_training([*overrides, "train.resume_on_new_data=true"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "note: resuming with changed settings: " in allowed.stdout and "data (manifest sha256)" in allowed.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    change = [r for r in records if r["kind"] == "config_change"]
    assert len(change) == 1 and set(change[0]["changes"]) >= {
        "data.shards",
        "train.resume_on_new_data",
        "data (manifest sha256)",
    }
