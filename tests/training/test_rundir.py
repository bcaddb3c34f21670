"""trainer/rundir.py: a folder that is not a run is not written into; starting over sets an earlier
run aside whole; the preprocessing and weights metadata read back as written, or one line."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import tmpfs
from trainer import rundir
from trainer.rundir import (
    STATUS,
    Preprocessing,
    RunDir,
    RunDirError,
    WeightsInfo,
    read_weights_file,
    weights_bytes,
)

PRE = Preprocessing([0.5, 0.4, 0.3], [0.2, 0.2, 0.2], 16, 0.875, 12)


def test_a_folder_of_someone_elses_files_is_refused_and_left_alone(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    (mine / "report.md").write_text("# my report\n")
    with pytest.raises(
        RunDirError, match=r"already holds files that are not a training run's \(config\.yaml, report\.md"
    ):
        RunDir(mine).lock()
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "report.md"]
    run = RunDir(mine)
    run.lock(share=True)  # the user said it is fine
    assert RunDir(tmp_path / "new").foreign_files() == []  # a folder that does not exist yet
    (tmp_path / "empty").mkdir()
    assert RunDir(tmp_path / "empty").foreign_files() == []


def test_starting_over_sets_the_whole_earlier_run_aside(tmp_path):
    run = RunDir(tmp_path / "run")
    run.lock()
    run.prepare("a: 1\n", ["x", "y"], PRE, resume=False)  # a first start: nothing to set aside
    assert not list(run.path.glob("replaced-*"))
    for name in ("metrics.jsonl", "best.safetensors", "final.safetensors", "report.md", "status.json"):
        (run.path / name).write_text(name)
    (run.path / "checkpoints" / "ckpt-000000005").mkdir(parents=True)
    aside = run.prepare("a: 2\n", ["x", "y"], PRE, resume=False)
    assert aside.name.startswith("replaced-") and aside.parent == run.path
    assert (aside / "final.safetensors").read_text() == "final.safetensors"
    assert (aside / "checkpoints" / "ckpt-000000005").is_dir() and (aside / "config.yaml").read_text() == "a: 1\n"
    assert sorted(p.name for p in run.path.iterdir() if not p.name.startswith(("replaced-", "."))) == [
        "classes.json",
        "config.yaml",
        "preprocessing.json",
    ]


def test_preprocessing_and_weights_metadata_round_trip(tmp_path):
    assert Preprocessing.from_json(PRE.to_json(), "p") == PRE
    older = json.dumps({"mean": PRE.mean, "std": PRE.std, "image_size": 16, "crop_pct": 0.875})
    assert Preprocessing.from_json(older, "p").train_image_size == 16  # runs from before train_image_size
    for damaged in (
        '{"mean": [NaN, 0, 0], "std": [1, 1, 1], "image_size": 16, "crop_pct": 1}',
        "[]",
        "{",
        '{"mean": 1}',
    ):
        with pytest.raises(RunDirError, match=r"^p (is damaged|holds no usable preprocessing)"):
            Preprocessing.from_json(damaged, "p")
    info = WeightsInfo({"model": {"depth": 40}}, ["x", "y"], "abc", PRE, {"epoch": 1, "top1": 0.5})
    path = tmp_path / "w.safetensors"
    path.write_bytes(weights_bytes({"w": torch.ones(2)}, info))
    tensors, read = read_weights_file(path)
    assert read == info and tensors["w"].equal(torch.ones(2))


def owned_run(path) -> RunDir:
    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    run.owned = True  # RunDir writes status.json only for the lock holder; none is needed here
    return run


def test_status_json_reads_whole_with_cat(tmp_path):
    run = owned_run(tmp_path / "run")
    run.set_status("running")
    run.set_status("failed", "NonFiniteError: loss")
    text = (run.path / STATUS).read_text()
    assert text == json.dumps(run.status(), ensure_ascii=False, indent=1) + "\n"  # indented, nothing after it
    assert run.status()["state"] == "failed" and run.status()["reason"] == "NonFiniteError: loss"
    assert sorted(p.name for p in run.path.iterdir()) == [STATUS]  # no .tmp left


def fail_new_files(monkeypatch) -> None:
    """Every new file's write fails as on a full disk."""

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)


def test_on_a_full_disk_status_json_is_rewritten_in_place_longer_or_shorter(tmp_path, monkeypatch):
    run = owned_run(tmp_path / "run")
    run.set_status("running")
    fail_new_files(monkeypatch)
    run.set_status("failed", "cannot write x: no space left on the device — free space, " * 10)
    assert run.status()["reason"].startswith("cannot write x") and run.status()["state"] == "failed"
    run.set_status("completed")  # shorter than what is there: nothing of the longer one is left behind
    assert (run.path / STATUS).read_text() == json.dumps(run.status(), indent=1) + "\n"
    assert sorted(p.name for p in run.path.iterdir()) == [STATUS]


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs, unmounted after."""
    with tmpfs(tmp_path / "disk", "1m") as mount:
        yield mount


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_a_status_longer_than_the_last_is_written_on_a_really_full_disk(full_disk):
    """No padding: the block status.json already has takes a longer status in place."""
    run = owned_run(full_disk / "run")
    run.set_status("running")
    fill(full_disk)
    with pytest.raises(OSError):
        (full_disk / "run" / "probe").write_bytes(b"x" * 4096)  # the disk is full indeed
    (full_disk / "run" / "probe").unlink()
    reason = "cannot write runs/r1/checkpoints/ckpt-000000014.tmp/COMPLETE: no space left on the device " * 9
    run.set_status("failed", reason)
    assert run.status() == {"state": "failed", "time": run.status()["time"], "reason": reason[:1000]}


def test_predict_default_csvs_are_numbered_on_and_never_replaced(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()

    def done(text: str) -> Path:
        path = run.path / f".done-{text}.csv"
        path.write_text(text)
        return path

    assert run.keep_predictions(done("1")) == run.path / "predictions.csv"
    assert run.keep_predictions(done("2")).name == "predictions-2.csv"
    (run.path / "predictions.csv").unlink()  # removed by the user: the newest still has the highest number
    assert run.keep_predictions(done("3")).name == "predictions-3.csv"
    moved = rundir.move_if_free

    def raced(source: Path, path: Path) -> bool:  # another predict keeps its CSV under the name first
        if path.name == "predictions-4.csv" and not path.exists():
            path.write_text("theirs")
        return moved(source, path)

    monkeypatch.setattr(rundir, "move_if_free", raced)
    assert run.keep_predictions(done("4")).name == "predictions-5.csv"
    monkeypatch.setattr(rundir, "move_if_free", moved)

    def no_links(source, path):  # a file system without hard links: EPERM, as Linux says it
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert run.keep_predictions(done("6")).name == "predictions-6.csv"
    contents = {p.name: p.read_text() for p in run.path.iterdir()}
    assert contents == {
        f"predictions-{n}.csv": text for n, text in ((2, "2"), (3, "3"), (4, "theirs"), (5, "4"), (6, "6"))
    }
    aside = run.set_aside()  # starting the run over sets them aside with the rest of the earlier run
    assert sorted(p.name for p in aside.iterdir()) == sorted(contents) and run.numbered_predictions() == []


def eval_record(top1: float, data: str) -> dict:
    return {
        "kind": "eval",
        "checkpoint": "/runs/x/best.safetensors",
        "data": data,
        "tta": "none",
        "num_samples": 40,
        "top1": top1,
        "top5": 1.0,
        "macro": {"f1": 0.5},
    }


def test_evaluate_lists_its_output_in_the_report_of_a_finished_run_only(tmp_path):
    from trainer.training.config import load_config
    from trainer.training.tracking.report import refresh_report

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    config = load_config(None, ["data.shards=s", f"run.dir={run.path}"])
    (run.path / "eval").mkdir()
    (run.path / "eval" / "best-test.json").write_text(json.dumps(eval_record(0.875, "test")))
    (run.path / "eval" / "best-test.json.123.tmp").write_text("{")  # another evaluate, still writing
    assert not refresh_report(run, config, ["a", "b"])  # still training: its end writes the report
    assert not (run.path / "report.md").exists()
    summary = {"parameters": 1000, "world_size": 1, "best_top1": 0.9, "best_epoch": 2, "final_top1": 0.9}
    run.write_json("summary.json", {**summary, "final_top5": 1.0, "num_val_samples": 10})
    (run.path / "eval" / "final-val.json").write_text(json.dumps(eval_record(0.9, "val")))
    assert refresh_report(run, config, ["a", "b"])
    report = (run.path / "report.md").read_text()
    assert "## Evaluations (`python -m trainer.evaluate`)" in report
    assert (
        "| [best-test](eval/best-test.png) | test | best.safetensors | 40 | 0.8750 | 1.0000 | 0.5000 | none |" in report
    )
    assert report.index("best-test") < report.index("final-val")
    assert sorted(p.name for p in run.path.iterdir()) == ["eval", "report.md", "summary.json"]  # no .tmp left
