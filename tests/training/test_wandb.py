"""The wandb side without training: ranking the shown samples, the config key, and real offline
runs (in this process) read back with wandb's own reader."""

import hashlib
import io
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from shards.manifest import Manifest, SplitInfo
from tests.wandb_log import history, model_versions, records, segments, step_of, summary, table
from trainer.training.config import ConfigError, load_config, wandb_id
from trainer.training.metrics import ShownSamples
from trainer.training.tracking.wandb_run import WandbRun, versions

CLASSES = ["猫", "犬", "ねずみ"]  # class names as given, in any script


def test_shown_samples_are_the_most_confidently_wrong_first_then_the_least_sure_right():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.7, 0.3], [0.99, 0.01]])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])  # wrong: 0 (0.9), 1 (0.6), 3 (0.55); right: 2 (0.8), 4 (0.7), 5 (0.99)
    images = torch.arange(6.0)[:, None]
    for limit, expected in [(4, [0, 1, 3, 4]), (6, [0, 1, 3, 4, 2, 5]), (2, [0, 1])]:
        shown = ShownSamples(limit)
        for chunk in range(0, 6, 4):  # in batches, as evaluation goes
            shown.add(images[chunk : chunk + 4], probs[chunk : chunk + 4], labels[chunk : chunk + 4])
        assert shown.images[:, 0].int().tolist() == expected
    nothing = ShownSamples(0)
    nothing.add(images, probs, labels)
    assert nothing.keys is None


def test_a_versions_step_comes_from_its_step_alias():
    assert versions({"name": "model-x", "aliases": ["best", "step-25", "latest"]}) == {("model-x", 25)}
    assert versions({"name": "run-x-table", "aliases": ["latest"]}) == set()


def test_log_model_is_a_checked_bool_and_the_wandb_id_is_resolved(tmp_path):
    required = ["data.shards=s", f"run.dir={tmp_path / 'r'}"]
    config = load_config(None, required)
    assert config.wandb.log_model is True
    assert config.wandb.id == wandb_id(tmp_path / "r")  # saved in config.yaml: export and a fetched model find the run
    assert load_config(None, required + ["wandb.log_model=false"]).wandb.log_model is False
    assert load_config(None, required + ["wandb.id=mine"]).wandb.id == "mine"
    with pytest.raises(ConfigError, match="wandb.log_model"):
        load_config(None, required + ["wandb.log_model=maybe"])


def test_the_manifest_knows_the_sha256_of_its_bytes(tmp_path):
    manifest = Manifest(CLASSES, {"train": SplitInfo(0, {}, [])}, [0.5] * 3, [0.2] * 3)
    manifest.write(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded.sha256 == hashlib.sha256((tmp_path / "manifest.json").read_bytes()).hexdigest()
    assert "sha256" not in json.loads((tmp_path / "manifest.json").read_text())


def fake_dataset() -> SimpleNamespace:
    manifest = Manifest(
        CLASSES,
        {"train": SplitInfo(30, {}, []), "val": SplitInfo(6, {}, [])},
        [0.5] * 3,
        [0.2] * 3,
        skipped=[{"path": "a/broken.jpg", "reason": "truncated"}],
    )
    manifest.sha256 = "f" * 64
    png = io.BytesIO()
    Image.new("RGB", (8, 6), "red").save(png, format="PNG")
    extras = {"class_distribution.png": png.getvalue()}  # no image_sizes.png: extras may be missing
    return SimpleNamespace(manifest=manifest, shown="s3://bucket/data", read_extra=extras.get)


def eval_record(step: int) -> dict:
    scores = {"precision": 0.5, "recall": 0.25, "specificity": 0.75, "f1": 1 / 3, "support": 2}
    per_class = {name: {**scores, "f1": i / 10} for i, name in enumerate(CLASSES)}
    macro = {k: 0.5 for k in ("precision", "recall", "specificity", "f1")}
    confusion = [[2, 0, 0], [1, 1, 0], [0, 0, 2]]
    head = {"kind": "eval", "epoch": step // 10, "step": step, "top1": 0.8, "top5": 1.0, "loss": 0.5, "num_samples": 6}
    return {**head, "per_class": per_class, "macro": macro, "confusion": confusion}


def test_offline_segments_log_tables_data_and_each_model_version_once(tmp_path, monkeypatch):
    """Three starts of one run, in this process: per-class table with CJK names, the data once,
    model versions that a resumed start does not log again, and none with log_model off."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("best.safetensors", "final.safetensors", "config.yaml", "classes.json", "preprocessing.json"):
        (run_dir / name).write_text(name)
    monkeypatch.setenv("WANDB_DATA_DIR", str(run_dir / "wandb"))  # what the trainer defaults it to, undone after
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    config = load_config(None, ["data.shards=s3://bucket/data", f"run.dir={run_dir}"])
    dataset = fake_dataset()
    record = eval_record(10)

    first = WandbRun(config, CLASSES, dataset, fresh=True)
    first.log(record, {"best_top1": 0.8})
    first.log_model(10, ["best"], record)
    first.finish()
    resumed = WandbRun(config, CLASSES, dataset, fresh=False)
    resumed.log_model(10, ["best"], record)  # redone after a resume: already in the first start's log
    resumed.log_model(20, ["final", "best"], record)
    resumed.finish()
    config.wandb.log_model = False
    off = WandbRun(config, CLASSES, dataset, fresh=False)
    off.log_model(30, ["final"], record)
    off.finish()

    logs = [records(segment) for segment in segments(run_dir)]
    assert len(logs) == 3
    assert [[step_of(a) for a in model_versions(log)] for log in logs] == [[10], [20], []]
    best, final = model_versions(logs[0])[0], model_versions(logs[1])[0]
    assert set(best["aliases"]) == {"best", "step-10", "latest"} and set(final["aliases"]) >= {"final", "best"}
    assert sorted(e["path"] for e in final["manifest"]["contents"]) == sorted(
        ["best.safetensors", "final.safetensors", "config.yaml", "classes.json", "preprocessing.json"]
    )
    staging = run_dir / "wandb" / "artifacts" / "staging"
    assert all(e["local_path"].startswith(str(staging)) for e in best["manifest"]["contents"])
    assert json.loads(best["metadata"])["dataset"]["manifest_sha256"] == "f" * 64

    rows = history(logs[0])
    assert rows[0]["data/class_distribution._type"] == "image-file"  # the data, once, at the start
    assert not any(key.startswith("data/") for row in history(logs[1]).values() for key in row)
    per_class = table(segments(run_dir)[0], rows[10], "eval/per_class")
    assert per_class["columns"] == ["class", "precision", "recall", "specificity", "f1", "support"]
    assert [row[0] for row in per_class["data"]] == CLASSES and [row[4] for row in per_class["data"]] == [0, 0.1, 0.2]
    assert "eval/per_class_f1_table.path" in rows[10]  # the bar chart's data
    state = summary(segments(run_dir)[0])
    assert state["config"]["dataset"]["location"] == "s3://bucket/data"
    assert state["config"]["dataset"]["skipped_files"] == 1 and state["summary"]["data/skipped_files"] == 1
    assert state["summary"]["best_top1"] == 0.8 and state["summary"]["eval/top1"] == {"max": 0.8}


def test_online_without_a_server_says_first_what_it_waits_for(tmp_path, monkeypatch, capsys):
    from toolbox.errors import UserError
    from trainer.training.tracking import wandb_run

    monkeypatch.setattr(wandb_run, "INIT_TIMEOUT_S", 5.0)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing answers
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with pytest.raises(UserError, match=r"^wandb \(online\) could not start: .* — use wandb.mode=offline"):
        wandb_run.start("online", tmp_path, project="p", id="abc")
    assert capsys.readouterr().out.startswith(
        "wandb: connecting to http://127.0.0.1:9 (up to 5 s; use wandb.mode=offline"
    )
