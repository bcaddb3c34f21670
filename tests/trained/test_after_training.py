"""evaluate, predict and export end to end on a tiny run trained by the real training command.

The commands run as a user runs them (subprocesses, `accelerate launch` for 2 processes); the
independent ones start together, which keeps this file inside a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch import demo
from shards.format import image_field
from shards.manifest import Manifest
from tests.conftest import REPO, cpu_env, run_training, wait_for
from toolbox import failpoints
from toolbox.errors import UserError
from toolbox.testing import accelerate_launch
from trainer.rundir import RunDir, WeightsInfo, read_weights_file, weights_bytes
from trainer.trained import export
from trainer.trained.images import read_image
from trainer.trained.load import load_trained
from trainer.training.build import build_model
from trainer.training.config import config_from_dict, to_dict
from trainer.training.data import open_shards, split_reader

pytestmark = pytest.mark.e2e
PER_CLASS = 3  # images per class in the image-folder copy of the val split


def cli(command: str, *args) -> list[str]:
    return [sys.executable, "-m", f"trainer.{command}", *map(str, args)]


def launch_two(script: str, *args) -> list[str]:
    return accelerate_launch(REPO / script, args, processes=2)


def run_together(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Start every command at once (they are independent), then wait for all of them."""
    started = {
        name: subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in commands.items()
    }
    done = {}
    for name, process in started.items():
        try:
            out, err = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:  # a hang is a failure; leave no process behind
            for other in started.values():
                other.kill()
            raise
        done[name] = subprocess.CompletedProcess(commands[name], process.returncode, out, err)
    return done


@pytest.fixture(scope="module")
def split_shards(tmp_path_factory) -> Path:
    """The digits as a user's own folder often comes: SRC/train/<class>/ and SRC/test/<class>/ (every
    5th image), sharded by the real make_shards: train, val carved from train, and test."""
    root = tmp_path_factory.mktemp("split")
    digits = demo.write_digits(root / "digits")
    for k, path in enumerate(sorted(digits.rglob("*.png"))):
        to = root / "src" / ("test" if k % 5 == 0 else "train") / path.parent.name / path.name
        to.parent.mkdir(parents=True, exist_ok=True)
        path.rename(to)
    result = subprocess.run(
        [sys.executable, "-m", "launch.make_shards", root / "src", root / "shards", "--min-shards", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "test/ -> test" in result.stdout, result.stderr
    return root / "shards"


@pytest.fixture(scope="module")
def run_dir(split_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("after") / "run"
    result = run_training(
        [f"data.shards={split_shards}", f"run.dir={run_dir}", "train.epochs=1", "wandb.mode=disabled"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def folders(split_shards, tmp_path_factory) -> dict[str, Path]:
    """`classes`: val images copied out as ROOT/<class>/<file> in several modes; `extra`: a wide image;
    `bad`: a file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    index = split_reader(open_shards(str(split_shards)), "val")
    counts = {}
    for i in range(len(index)):
        sample = index.read(i)
        label = sample["cls"].decode()
        if counts.get(label, 0) == PER_CLASS:
            continue
        counts[label] = counts.get(label, 0) + 1
        image = Image.open(io.BytesIO(sample[image_field(sample)]))
        mode = ["L", "RGBA", "P"][counts[label] - 1]  # every mode must come out as the same RGB
        (root / "classes" / label).mkdir(parents=True, exist_ok=True)
        image.convert(mode).save(root / "classes" / label / f"{label}-{counts[label]}.png")
    (root / "extra").mkdir()
    wide = Image.new("L", (16, 8))
    wide.paste(image.convert("L"), (4, 0))
    wide.save(root / "extra" / "wide.png")
    (root / "bad.jpg").write_bytes(b"this is not an image")
    return {"classes": root / "classes", "extra": root / "extra", "bad": root / "bad.jpg", "root": root}


@pytest.fixture(scope="module")
def outputs(run_dir, folders) -> dict[str, subprocess.CompletedProcess]:
    out = folders["root"]

    def predict_all_final(csv: Path, *flags: str) -> list[str]:
        """predict of the bad file, the class folders and the extra image with the final weights."""
        files = (folders["bad"], folders["classes"], folders["extra"])
        return cli("predict", run_dir, *files, "--checkpoint", "final", "--out", csv, *flags)

    return run_together(
        {
            "eval1": cli("evaluate", run_dir, "--name", "one"),
            "eval2": launch_two("trainer/evaluate.py", run_dir, "--name", "two"),
            "eval1_flip": cli("evaluate", run_dir, "--name", "one-flip", "--tta", "flip"),
            "eval2_flip": launch_two("trainer/evaluate.py", run_dir, "--name", "two-flip", "--tta", "flip"),
            "predict_flip": cli(
                "predict",
                run_dir,
                folders["classes"],
                "--checkpoint",
                "final",
                "--out",
                out / "flip.csv",
                "--tta",
                "flip",
            ),
            "eval_folder": cli("evaluate", run_dir, "--data", folders["classes"], "--checkpoint", "final"),
            "predict": cli(
                "predict",
                run_dir,
                folders["classes"],
                folders["extra"],
                "--checkpoint",
                "final",
                "--out",
                out / "pred.csv",
                "--workers",
                "1",
            ),
            "predict_letterbox": predict_all_final(out / "letterbox.csv", "--topk", "3", "--letterbox"),
            "predict_explain": predict_all_final(out / "seen.csv", "--explain", "--batch-size", "8"),
            "export": cli("export", run_dir),
            "predict_best": cli("predict", run_dir, folders["classes"], "--out", out / "best.csv"),
            "predict_raw": cli("predict", run_dir, folders["classes"], "--out", out / "raw.csv", "--no-calibration"),
            # Two predicts without --out finishing together: each keeps its own CSV.
            **{f"predict_default_{n}": cli("predict", run_dir, folders["extra"], "--workers", "0") for n in (1, 2)},
        }
    )


@pytest.fixture(scope="module")
def test_split(outputs, run_dir, split_shards) -> dict[str, subprocess.CompletedProcess]:
    """The held-out split evaluated after the others, so that the report it writes is the last one
    (evaluations that finish together each list what was there when they wrote)."""
    src = split_shards.parent / "src"
    return {
        "shards": subprocess.run(
            cli("evaluate", run_dir, "--split", "test"),
            cwd=REPO,
            env=cpu_env(),
            capture_output=True,
            text=True,
            timeout=240,
        ),
        "folder": subprocess.run(
            cli("evaluate", run_dir, "--data", src, "--split", "test", "--workers", "0"),
            cwd=REPO,
            env=cpu_env(),
            capture_output=True,
            text=True,
            timeout=240,
        ),
    }


def test_evaluate_reads_the_test_split_and_the_report_shows_it(test_split, run_dir, split_shards):
    stdout = ok(test_split["shards"]).stdout
    record = json.loads((run_dir / "eval" / "best-test.json").read_text())
    test = Manifest.load(split_shards).splits["test"]
    assert record["data"] == "test" and record["num_samples"] == test.num_samples == 360
    assert [sum(row) for row in record["confusion"]] == [test.class_counts[str(d)] for d in range(10)]
    assert f"listed in {run_dir / 'report.md'}" in stdout
    report = (run_dir / "report.md").read_text()
    row = f"| [best-test](eval/best-test.png) | test | best.safetensors | 360 | {record['top1']:.4f} |"
    assert row in report and "## Per class (final evaluation)" in report  # the training's sections stay


def test_evaluate_reads_the_test_folder_of_a_pre_split_image_folder_as_its_shards(test_split, run_dir):
    ok(test_split["folder"])
    folder = json.loads((run_dir / "eval" / "best-src-test.json").read_text())
    shards = json.loads((run_dir / "eval" / "best-test.json").read_text())
    assert folder["confusion"] == shards["confusion"] and folder["num_samples"] == 360


def test_a_test_split_the_shards_lack_is_one_line_naming_the_fix(run_dir, digits_shards, capsys):
    from trainer.trained import evaluate

    code = evaluate.main([str(run_dir), "--data", str(digits_shards), "--split", "test"])
    assert_one_line(code, capsys.readouterr().err, "have no 'test' split (they have train, val)")


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_evaluate_two_processes_equal_one(outputs, run_dir, split_shards):
    ok(outputs["eval1"]), ok(outputs["eval2"])
    one = json.loads((run_dir / "eval" / "one.json").read_text())
    two = json.loads((run_dir / "eval" / "two.json").read_text())
    assert (
        one["num_samples"] == Manifest.load(split_shards).splits["val"].num_samples == sum(map(sum, one["confusion"]))
    )
    for key in ["top1", "top5", "per_class", "macro", "confusion", "num_samples", "temperature"]:
        assert one[key] == two[key], key
    # The same rows in the split's order; a sample's logits may differ in the last bits with its batch.
    for key in ("loss", "ece", "ece_calibrated"):
        assert one[key] == pytest.approx(two[key], rel=1e-6), key
    for name in ("one.png", "one-top-losses.png", "one-reliability.png", "two-top-losses.png"):
        assert (run_dir / "eval" / name).stat().st_size > 0, name
    assert f"ECE {one['ece']:.4f} -> {one['ece_calibrated']:.4f}" in outputs["eval1"].stdout
    _, info = read_weights_file(run_dir / "best.safetensors")
    assert one["temperature"] == info.temperature  # the run's, fitted in training: evaluate fits none
    assert outputs["eval2"].stdout.count("macro") == 1  # the table comes from the main process only
    assert "threads 1 (OMP_NUM_THREADS)" in outputs["eval1"].stdout.splitlines()  # the tests' environment sets it
    assert outputs["eval2"].stdout.count("threads 1 (OMP_NUM_THREADS)") == 1
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert one["confusion"] == [r for r in logged if r["kind"] == "eval"][-1]["confusion"]


def test_evaluate_says_it_runs_in_full_precision_whatever_the_run_did(outputs):
    """The run trained with precision no (default); evaluate's own choice is said as its own."""
    for name in ("eval1", "eval2"):
        assert (
            ok(outputs[name])
            .stdout.splitlines()
            .count("precision no (evaluate always), compile none (evaluate always)")
            == 1
        ), outputs[name].stdout


def test_evaluate_loss_is_exact_across_processes(outputs, run_dir):
    one = json.loads((run_dir / "eval" / "one.json").read_text())
    two = json.loads((run_dir / "eval" / "two.json").read_text())
    assert one["loss"] == two["loss"]


def test_flip_tta_two_processes_equal_one_and_the_record_says_so(outputs, run_dir, folders):
    ok(outputs["eval1_flip"]), ok(outputs["eval2_flip"]), ok(outputs["predict_flip"]), ok(outputs["predict"])
    one, two, plain = (
        json.loads((run_dir / "eval" / f"{n}.json").read_text()) for n in ("one-flip", "two-flip", "one")
    )
    for key in ["top1", "top5", "per_class", "macro", "confusion", "num_samples", "loss", "tta", "image_size"]:
        assert one[key] == two[key], key
    assert (one["tta"], plain["tta"], one["image_size"]) == ("flip", "none", 8)
    assert one["loss"] != plain["loss"]  # the flips changed the predictions' probabilities
    _, flipped = read_csv(folders["root"] / "flip.csv")
    _, unflipped = read_csv(folders["root"] / "pred.csv")
    flips = {r["path"]: float(r["probability"]) for r in flipped}
    assert len(flips) == 10 * PER_CLASS and any(
        flips[r["path"]] != float(r["probability"]) for r in unflipped if r["path"] in flips
    )


def test_evaluate_image_folder_and_predict_agree(outputs, run_dir, folders):
    stdout = ok(outputs["eval_folder"]).stdout
    assert "top-1" in stdout and "macro" in stdout
    record = json.loads((run_dir / "eval" / "final-classes.json").read_text())
    assert record["num_samples"] == 10 * PER_CLASS
    assert (run_dir / "eval" / "final-classes.png").is_file()
    ok(outputs["predict"])
    _, rows = read_csv(folders["root"] / "pred.csv")
    confusion = [[0] * 10 for _ in range(10)]
    for row in rows:
        if Path(row["path"]).parent.parent == folders["classes"]:
            confusion[int(Path(row["path"]).parent.name)][int(row["class"])] += 1
    assert confusion == record["confusion"]


def test_predict_csv_columns_error_row_and_letterbox(outputs, folders):
    assert "31 images predicted, 0 unreadable" in ok(outputs["predict"]).stdout
    assert "threads 1 (OMP_NUM_THREADS)" in outputs["predict"].stdout.splitlines()
    assert "31 images predicted, 1 unreadable" in ok(outputs["predict_letterbox"]).stdout
    header, plain = read_csv(folders["root"] / "pred.csv")
    ranks = [f"top{i}_{field}" for i in range(2, 6) for field in ("class", "probability")]
    assert header == ["path", "class", "probability", *ranks, "error"]
    header, boxed = read_csv(folders["root"] / "letterbox.csv")
    assert header == ["path", "class", "probability", *ranks[:4], "error"]
    bad = [row for row in boxed if row["error"]]
    assert [row["path"] for row in bad] == [str(folders["bad"])] and bad[0]["class"] == ""
    assert "cannot be read" in bad[0]["error"]
    for row in plain + boxed:
        if not row["error"]:
            probs = [float(row["probability"])] + [float(row[f"top{i}_probability"]) for i in (2, 3)]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    plain_by_path, boxed_by_path = {r["path"]: r for r in plain}, {r["path"]: r for r in boxed}
    # Square images with crop_pct 1.0: letterboxing changes nothing. The wide one: it keeps its sides.
    square = [p for p in plain_by_path if "wide" not in p]
    assert all(plain_by_path[p]["probability"] == boxed_by_path[p]["probability"] for p in square)
    wide = str(folders["extra"] / "wide.png")
    assert plain_by_path[wide]["probability"] != boxed_by_path[wide]["probability"]


def test_predict_explain_writes_one_overlay_per_readable_image_and_the_csv_names_it(outputs, folders):
    result = ok(outputs["predict_explain"])
    root = folders["root"]
    assert f"31 images predicted, 1 unreadable; wrote {root / 'seen.csv'}; overlays in {root / 'seen-explain'}" in (
        result.stdout
    )
    header, rows = read_csv(root / "seen.csv")
    _, plain = read_csv(root / "pred.csv")
    assert header[-2:] == ["error", "explain"]
    bad = [row for row in rows if row["error"]]
    assert [(row["path"], row["explain"]) for row in bad] == [(str(folders["bad"]), "")]
    good = [row for row in rows if not row["error"]]
    assert sorted(p.name for p in (root / "seen-explain").iterdir()) == sorted(row["explain"] for row in good)
    by_path = {row["path"]: row for row in plain}
    for row in good:  # the same predictions as without --explain, and a file named after each
        assert (row["class"], row["probability"]) == (
            by_path[row["path"]]["class"],
            by_path[row["path"]]["probability"],
        )
        assert row["explain"].endswith(f"-{Path(row['path']).stem}-{row['class']}.png")
        with Image.open(root / "seen-explain" / row["explain"]) as overlay:
            assert overlay.format == "PNG" and overlay.size == (448, 252)
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no hidden folder left


def test_predict_explain_without_out_names_the_folder_after_its_csv(run_dir, folders, tmp_path, capsys):
    from trainer.trained import predict

    for name in ("config.yaml", "classes.json", "final.safetensors"):
        shutil.copy(run_dir / name, tmp_path / name)
    args = [str(tmp_path), str(folders["extra"]), "--checkpoint", "final", "--workers", "0", "--explain"]
    assert predict.main(args) == 0 and predict.main(args) == 0
    for csv_name, folder in (
        ("predictions.csv", "predictions-explain"),
        ("predictions-2.csv", "predictions-2-explain"),
    ):
        _, rows = read_csv(tmp_path / csv_name)
        assert [p.name for p in (tmp_path / folder).iterdir()] == [rows[0]["explain"]]
    assert "overlays in" in capsys.readouterr().out


def test_predict_without_out_never_replaces_an_earlier_csv(outputs, run_dir, folders):
    wrote = sorted(ok(outputs[f"predict_default_{n}"]).stdout.split("; wrote ")[-1].strip() for n in (1, 2))
    assert wrote == [str(run_dir / "predictions-2.csv"), str(run_dir / "predictions.csv")]
    for path in wrote:
        _, rows = read_csv(Path(path))
        assert [row["path"] for row in rows] == [str(folders["extra"] / "wide.png")]
    assert not list(run_dir.glob(".predictions*"))  # nothing of the writing is left


def parity_batch(run_dir: Path, folders: dict) -> tuple[torch.Tensor, np.ndarray]:
    trained = load_trained(run_dir)
    files = sorted(folders["classes"].rglob("*.png"))[:3]
    images = torch.stack([trained.preset()(read_image(f)) for f in files])
    with torch.no_grad():
        return images, trained.model(images).numpy()


def test_export_onnx_dynamic_batch_parity(outputs, run_dir, folders):
    import onnx
    import onnxruntime

    stdout = ok(outputs["export"]).stdout
    assert "onnx:" in stdout and "max abs logit diff" in stdout
    path = run_dir / "export" / "model.onnx"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, expected = parity_batch(run_dir, folders)
    for batch in (1, 3):
        got = session.run(["logits"], {"image": images[:batch].numpy()})[0]
        np.testing.assert_allclose(got, expected[:batch], atol=1e-4)
    props = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert props["classes"] == [str(d) for d in range(10)]
    assert props["preprocessing"]["image_size"] == 8 and len(props["preprocessing"]["mean"]) == 3


def test_predict_probabilities_are_the_onnx_logits_scaled_by_the_recorded_temperature(outputs, run_dir, folders):
    import onnxruntime

    ok(outputs["export"]), ok(outputs["predict_best"]), ok(outputs["predict_raw"])
    temperature = json.loads((run_dir / "export" / "model.json").read_text())["temperature"]
    assert temperature == load_trained(run_dir).temperature and temperature != 1
    assert "probabilities: softmax(logits / " in outputs["predict_best"].stdout
    session = onnxruntime.InferenceSession(str(run_dir / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    preset = load_trained(run_dir).preset()
    for csv_name, scale in (("best.csv", temperature), ("raw.csv", 1.0)):
        _, rows = read_csv(folders["root"] / csv_name)
        images = np.stack([preset(read_image(Path(row["path"]))).numpy() for row in rows])
        logits = session.run(["logits"], {"image": images})[0] / scale
        probs = torch.from_numpy(logits).softmax(1).numpy()
        predicted = [float(row["probability"]) for row in rows]
        np.testing.assert_allclose(probs.max(1), predicted, atol=2e-6)
        assert [str(c) for c in probs.argmax(1)] == [row["class"] for row in rows]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_parity_and_metadata(outputs, run_dir, folders):
    ok(outputs["export"])
    extra = {"model.json": ""}
    loaded = torch.jit.load(str(run_dir / "export" / "model.torchscript.pt"), _extra_files=extra)
    images, expected = parity_batch(run_dir, folders)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(images).numpy(), expected, atol=1e-4)
    assert json.loads(extra["model.json"])["classes"] == [str(d) for d in range(10)]
    described = json.loads((run_dir / "export" / "model.json").read_text())
    for fmt in ("onnx", "torchscript"):
        assert described["parity"][fmt]["max_abs_diff"] <= described["parity"][fmt]["tolerance"]
        assert described["parity"][fmt]["samples"] == 16


def test_export_parity_failure_writes_nothing(run_dir, tmp_path, monkeypatch, capsys):
    """An exporter that drifts: one error line, exit 2, and no model file where the export would go."""
    monkeypatch.setitem(export.RUN, "onnx", lambda path, inputs: np.zeros((len(inputs), 10), np.float32) + 5)
    code = export.main([str(run_dir), "--format", "torchscript", "onnx", "--out-dir", str(tmp_path), "--samples", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: the onnx export differs") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def bad(run_dir, folders, tmp_path_factory) -> dict[str, Path]:
    """Inputs a user gets wrong: a run dir without weights, another model's weights, folders that do not fit."""
    root = tmp_path_factory.mktemp("bad")
    (root / "no-weights").mkdir()
    for name in ("config.yaml", "classes.json"):
        shutil.copy(run_dir / name, root / "no-weights" / name)
    config = config_from_dict(to_dict(load_trained(run_dir).config))
    config.model.growth_rate = 6  # a wider network, saved as the trainer saves its own
    other = build_model(config, 10)
    info = WeightsInfo(
        to_dict(config), [str(d) for d in range(10)], other.fingerprint(), RunDir(run_dir).preprocessing()
    )
    (root / "other.safetensors").write_bytes(weights_bytes(other.state_dict(), info))
    torch.save(other.state_dict(), root / "other.pth")  # no fingerprint: the shapes must tell
    shutil.copytree(folders["classes"], root / "wrong-classes")
    shutil.copytree(folders["classes"] / "0", root / "wrong-classes" / "zero")
    shutil.copytree(folders["classes"], root / "empty-class")
    shutil.rmtree(root / "empty-class" / "5")
    (root / "empty-class" / "5").mkdir()
    shutil.copytree(folders["classes"], root / "broken-image")
    shutil.copy(folders["bad"], root / "broken-image" / "7" / "broken.png")
    (root / "no-images").mkdir()
    return {p.name: p for p in root.iterdir()} | {"root": root}


@pytest.fixture(scope="module")
def errors(run_dir, bad) -> dict[str, subprocess.CompletedProcess]:
    """The cases the issue names, as a user meets them (plus one raised inside a loader worker)."""
    return run_together(
        {
            "no_weights": cli("evaluate", bad["no-weights"]),
            "other_model": cli("evaluate", run_dir, "--checkpoint", bad["other.safetensors"]),
            "other_classes": cli("evaluate", run_dir, "--data", bad["wrong-classes"]),
            "broken_image": cli("evaluate", run_dir, "--data", bad["broken-image"], "--workers", "1"),
        }
    )


def assert_one_line(code: int, stderr: str, message: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], stderr[-2000:]
    assert message in lines[0] and "Traceback" not in stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_weights", "has no best.safetensors"),
        ("other_model", "holds another model"),
        ("other_classes", "differ from the run's classes"),
        ("broken_image", "cannot be read as an image"),
    ],
)
def test_bad_input_is_one_clear_line(errors, case, message):
    assert_one_line(errors[case].returncode, errors[case].stderr, message)


# The same contract for the other cases, through each command's main() in this process (no start-up cost).
@pytest.mark.parametrize(
    "command, args, message",
    [
        ("export", ["RUN", "--checkpoint", "BAD/other.pth"], "does not fit the model"),
        ("evaluate", ["RUN", "--checkpoint", "BAD/missing.safetensors"], "not found"),
        ("evaluate", ["RUN", "--data", "BAD/empty-class"], "has no images"),
        ("evaluate", ["RUN", "--data", "BAD/no-images"], "has no class folders"),
        ("evaluate", ["RUN", "--data", "BAD/nowhere"], "not found"),
        ("evaluate", ["RUN", "--name", "../outside"], "must be a plain name"),
        ("evaluate", ["RUN", "--name", ".."], "must be a plain name"),
        ("predict", ["BAD", "BAD/broken-image"], "is not a run directory"),
        ("predict", ["RUN", "BAD/nowhere"], "not found"),
        ("predict", ["RUN", "BAD/no-images"], "holds no image files"),
        ("predict", ["BAD/nowhere", "BAD/broken-image"], "run directory"),
        ("predict", ["RUN", "BAD/broken-image", "--threads", "0"], "--threads 0: must be at least 1"),
    ],
)
def test_bad_input_in_process(run_dir, bad, capsys, command, args, message):
    from trainer.trained import evaluate, predict

    argv = [a.replace("RUN", str(run_dir)).replace("BAD", str(bad["root"])) for a in args]
    code = {"evaluate": evaluate, "predict": predict, "export": export}[command].main(argv)
    assert_one_line(code, capsys.readouterr().err, message)


# Hostile inputs to predict: nothing that is not a regular file is opened, nothing above the limit
# is read, any file name has its row; run in a subprocess, so that a hang is a failure, not a stuck suite.
@pytest.fixture(scope="module")
def hostile(folders, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    folder = root / "inputs"
    folder.mkdir()
    good = sorted(folders["classes"].rglob("*.png"))[0]
    shutil.copy(good, folder / "good.png")
    shutil.copy(good, os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png"))  # not UTF-8
    (folder / "big.png").write_bytes(good.read_bytes() + b"\0")  # one byte over --max-file-size
    os.mkfifo(folder / "fifo.jpg")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "loop").symlink_to(".")  # a link to its own folder: walked once
    os.mkfifo(root / "named.jpg")
    return {"folder": folder, "fifo": root / "named.jpg", "limit": good.stat().st_size, "root": root}


def test_predict_gives_hostile_files_an_error_row_and_never_hangs(run_dir, hostile):
    out = hostile["root"] / "pred.csv"
    args = [run_dir, hostile["folder"], hostile["fifo"], "--out", out, "--max-file-size", hostile["limit"]]
    result = subprocess.run(
        cli("predict", *args, "--checkpoint", "final", "--workers", "1"),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "2 images predicted, 4 unreadable" in ok(result).stdout
    _, rows = read_csv(out)
    folder = str(hostile["folder"])
    by_path = {row["path"]: row for row in rows}
    assert list(by_path) == [f"{folder}/big.png", f"{folder}/caf\\xe9.png", f"{folder}/fifo.jpg"] + [
        f"{folder}/good.png",
        f"{folder}/zero.png",
        str(hostile["fifo"]),
    ]
    assert by_path[f"{folder}/caf\\xe9.png"]["class"] == by_path[f"{folder}/good.png"]["class"] != ""
    assert by_path[f"{folder}/caf\\xe9.png"]["error"] == ""
    assert by_path[f"{folder}/big.png"]["error"].startswith("is larger than the file size limit")
    assert by_path[f"{folder}/fifo.jpg"]["error"].startswith("is a FIFO (named pipe), not a regular file")
    assert by_path[str(hostile["fifo"])]["error"].startswith("is a FIFO")
    assert by_path[f"{folder}/zero.png"]["error"].startswith("is a character device, not a regular file")
    assert all(row["class"] == "" for row in rows if row["error"])
    assert not list(hostile["root"].glob("*.tmp"))


def test_read_image_never_reads_past_the_limit_of_a_growing_file(tmp_path, monkeypatch):
    from toolbox.errors import DataError

    path = tmp_path / "growing.png"
    path.write_bytes(b"x" * 10)
    real_fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 5, *real_fstat(fd)[7:])))
    with pytest.raises(DataError, match="is larger than the file size limit of 8 bytes"):
        read_image(path, max_bytes=8)  # stat said 5 bytes; 9 were read, and no more


def interrupt(command: list, flag: Path, sig: int = signal.SIGINT) -> subprocess.CompletedProcess:
    """Run ``command`` until it pauses with its output a .tmp file, then press Ctrl-C (SIGINT to its
    group), or send what a scheduler or `kill` sends (SIGTERM)."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=cpu_env(**failpoints.env(pause_outputs=flag)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(flag.exists, 180, process)
        os.killpg(process.pid, sig)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


STOPPED = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}


def assert_interrupted(result: subprocess.CompletedProcess, sig: int = signal.SIGINT) -> None:
    code, what = STOPPED[sig]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr[-3000:]
    assert lines == [f"error: {what} — no output was left half-written; run the command again"], result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_in_predict_is_one_line_and_keeps_the_old_csv(run_dir, folders, tmp_path, sig):
    out = tmp_path / "pred.csv"
    out.write_text("the old predictions\n")
    args = [run_dir, folders["classes"], "--out", out, "--batch-size", "4", "--workers", "1", "--checkpoint", "final"]
    assert_interrupted(interrupt(cli("predict", *args), tmp_path / "paused", sig), sig)
    assert out.read_text() == "the old predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paused", "pred.csv"]


def test_ctrl_c_in_predict_explain_keeps_the_old_csv_and_overlays(run_dir, folders, tmp_path):
    out = tmp_path / "pred.csv"
    out.write_text("the old predictions\n")
    (tmp_path / "pred-explain").mkdir()
    (tmp_path / "pred-explain" / "old.png").write_text("an old overlay")
    args = [run_dir, folders["classes"], "--out", out, "--batch-size", "4", "--workers", "1", "--checkpoint", "final"]
    assert_interrupted(interrupt(cli("predict", *args, "--explain"), tmp_path / "paused"))
    assert out.read_text() == "the old predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paused", "pred-explain", "pred.csv"]
    assert [p.name for p in (tmp_path / "pred-explain").iterdir()] == ["old.png"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_in_evaluate_is_one_line_and_writes_nothing(run_dir, tmp_path, sig):
    before = sorted(p.name for p in (run_dir / "eval").iterdir()) if (run_dir / "eval").is_dir() else []
    result = interrupt(cli("evaluate", run_dir, "--name", "ctrl-c", "--workers", "1"), tmp_path / "paused", sig)
    assert_interrupted(result, sig)
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == before


def test_weights_carry_their_preprocessing_and_a_tampered_run_is_one_line(run_dir, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.yaml", "classes.json", "best.safetensors"):
        shutil.copy(run_dir / name, copy / name)
    trained = load_trained(copy)  # no preprocessing.json: the weights file carries its own
    assert trained.preprocessing == RunDir(run_dir).preprocessing()
    (copy / "config.yaml").write_text(
        re.sub(r"\bimage_size: \d+", "image_size: 100000", (run_dir / "config.yaml").read_text(), count=1)
    )
    with pytest.raises(UserError, match=r"config\.yaml: data\.image_size=100000 is out of range .* restore the file"):
        load_trained(copy)
    shutil.copy(run_dir / "config.yaml", copy / "config.yaml")
    (copy / "classes.json").write_text('["only"]')
    with pytest.raises(UserError, match=r"classes\.json does not list 2 or more class names"):
        load_trained(copy)
    (copy / "classes.json").write_text((run_dir / "classes.json").read_text())
    (copy / "preprocessing.json").write_text('{"mean": [NaN, 0, 0], "std": [1, 1, 1], "image_size": 16, "crop_pct": 1}')
    torch.save(load_trained(copy).model.state_dict(), copy / "plain.pth")  # weights that carry nothing
    with pytest.raises(UserError, match=r"preprocessing\.json holds no usable preprocessing"):
        load_trained(copy, str(copy / "plain.pth"))
