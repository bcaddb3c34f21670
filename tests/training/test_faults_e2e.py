"""Bad input and faults during training: one clear line, a non-zero exit, nothing lost."""

import json
import shutil
import tarfile

import pytest

from tests.conftest import run_training

pytestmark = pytest.mark.e2e


def _copy_shards(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("images"))
    return dst


def _corrupt_first_image(shard):
    """Overwrite the first image's bytes in place (the tar stays well-formed, the image does not)."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".png", ".jpg", ".webp")))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)
    return member.name.split(".")[0]


def _one_line_error(result, *fragments):
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_corrupted_sample_names_shard_and_sample_or_is_skipped(digits_shards, tmp_path):
    shards = _copy_shards(digits_shards, tmp_path / "shards")
    key = _corrupt_first_image(shards / "train" / "train-000000.tar")
    base = [f"data.shards={shards}", "train.epochs=1", "wandb.mode=disabled"]
    failed = run_training(base + [f"run.dir={tmp_path / 'a'}"], processes=1)
    _one_line_error(failed, "train-000000.tar", key, "data.skip_bad_samples=true")
    assert "Traceback" not in failed.stderr
    skipped = run_training(base + [f"run.dir={tmp_path / 'b'}", "data.skip_bad_samples=true"], processes=1)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_bad_samples", 0) for r in records if r["kind"] == "train") == 1


def test_missing_shard_fails_before_training(digits_shards, tmp_path):
    shards = _copy_shards(digits_shards, tmp_path / "shards")
    (shards / "val" / "val-000003.tar").unlink()
    result = run_training([f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", "wandb.mode=disabled"], processes=1)
    _one_line_error(result, "val-000003.tar", "missing")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_checkpoint_of_another_model_is_refused(digits_shards, tmp_path):
    run = tmp_path / "run"
    first = run_training(
        [f"data.shards={digits_shards}", f"run.dir={run}", "train.epochs=1", "wandb.mode=disabled"], processes=1
    )
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    other = run_training(
        [
            f"data.shards={digits_shards}",
            f"run.dir={run}",
            "train.epochs=2",
            "model.growth_rate=6",
            "wandb.mode=disabled",
        ],
        processes=1,
    )
    _one_line_error(other, "of another model", "new run.dir")
    assert "Traceback" not in other.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing lost


def test_unwritable_run_dir_fails_before_training(digits_shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_training(
        [f"data.shards={digits_shards}", f"run.dir={blocker / 'run'}", "wandb.mode=disabled"], processes=1
    )
    _one_line_error(result, "cannot write to run.dir")
    assert "Traceback" not in result.stderr


def test_asking_for_a_gpu_without_one(digits_shards, tmp_path):
    result = run_training(
        [f"data.shards={digits_shards}", f"run.dir={tmp_path / 'run'}", "train.device=cuda"], processes=1
    )
    _one_line_error(result, "no GPU")
    assert "Traceback" not in result.stderr


def test_missing_shards_folder(tmp_path):
    result = run_training([f"data.shards={tmp_path / 'nowhere'}", f"run.dir={tmp_path / 'run'}"], processes=1)
    _one_line_error(result, "nowhere")
    assert "Traceback" not in result.stderr


def test_wandb_online_without_an_account_fails_before_training(digits_shards, tmp_path):
    result = run_training(
        [f"data.shards={digits_shards}", f"run.dir={tmp_path / 'run'}", "wandb.mode=online"],
        processes=1,
        WANDB_API_KEY="",
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
    )
    _one_line_error(result, "wandb (online) could not start", "wandb.mode=offline")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
