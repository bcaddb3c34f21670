"""A new user's first hour, as the README's "Your own images" tells it, on a machine without a GPU:
a `train/` + `test/` folder of JPEGs of their own sizes -> make_shards -> `python -m trainer` with
configs/own-images.yaml, its output redirected to a log file -> `evaluate --split test`."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.conftest import REPO, cpu_env

pytestmark = pytest.mark.e2e

CLASSES = {"circle": "ellipse", "square": "rectangle", "bar": "bar"}
TRAIN_PER_CLASS, TEST_PER_CLASS = 40, 10
# own-images.yaml's model and epochs are for real photos; these keep the test to a minute or two
SMALL = [
    "model.block_config=[2,2]",
    "model.growth_rate=8",
    "model.num_init_features=16",
    "model.se_reduction=4",
    "data.workers=1",
    "data.auto_augment=none",
    "train.epochs=3",
    "train.batch_size=16",
    "train.log_every=2",
    "optim.lr=0.01",
    "wandb.mode=disabled",
]


def photo(shape: str, rng: random.Random) -> Image.Image:
    """A shape on a noisy background, 40 to 56 px on its shorter side, not square."""
    short = rng.randint(40, 56)
    size = (short + rng.randint(0, 16), short) if rng.random() < 0.5 else (short, short + rng.randint(0, 16))
    image = Image.new("RGB", size, tuple(rng.randint(0, 90) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (
        rng.randint(2, w // 4),
        rng.randint(2, h // 4),
        rng.randint(3 * w // 4, w - 2),
        rng.randint(3 * h // 4, h - 2),
    )
    colour = tuple(rng.randint(150, 255) for _ in range(3))
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    else:
        draw.rectangle((box[0], h // 2 - 3, box[2], h // 2 + 3), fill=colour)
    return image


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    src, rng = tmp_path_factory.mktemp("photos"), random.Random(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for name, shape in CLASSES.items():
            folder = src / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                photo(shape, rng).save(folder / f"{i:03d}.jpg", quality=90)
    return src


def command(*args: str, log: Path | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = cpu_env()
    del env["ACCELERATE_USE_CPU"], env["OMP_NUM_THREADS"]  # a new user sets neither
    if log is None:
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    with open(log, "w") as out:  # stdout is a file, as under nohup or Slurm
        return subprocess.run(
            [sys.executable, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=900
        )


def test_own_jpegs_train_at_their_size_log_progress_and_evaluate_on_test(photos, tmp_path):
    shards, run, log = tmp_path / "shards", tmp_path / "run", tmp_path / "train.log"
    made = command("-m", "launch.make_shards", str(photos), str(shards))
    assert made.returncode == 0, made.stderr
    splits = json.loads((shards / "manifest.json").read_text())["splits"]
    assert splits["test"]["num_samples"] == TEST_PER_CLASS * len(CLASSES)
    assert sorted(splits) == ["test", "train", "val"]

    trained = command(
        "-m",
        "trainer",
        "--config",
        "configs/own-images.yaml",
        f"data.shards={shards}",
        f"run.dir={run}",
        *SMALL,
        log=log,
    )
    text = log.read_text()
    assert trained.returncode == 0, text
    assert "image size 48 train, 48 val (auto from the shards: median " in text  # 40-56 px: median 48
    assert "small stem (auto: below 96 px)" in text
    assert "image_size: 48" in (run / "config.yaml").read_text()
    # the log shows each epoch from inside (3 steps, a line every 2 steps of the run) and its summary with train loss and time
    for epoch in (1, 2, 3):
        assert re.search(
            rf"^epoch {epoch}/3  step [12]/3  loss \d+\.\d+  [\d,.]+ img/s  elapsed \S+  ETA epoch", text, re.M
        )
        assert re.search(rf"^epoch {epoch}/3  step {3 * epoch}  train loss \d+\.\d+  val top-1 .* time \S+", text, re.M)
    assert "\r" not in text  # no bar redrawn into the file

    evaluated = command("-m", "trainer.evaluate", str(run), "--split", "test")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((run / "eval" / "best-test.json").read_text())
    assert result["num_samples"] == TEST_PER_CLASS * len(CLASSES)
    assert result["top1"] > 1 / len(CLASSES)  # it learnt something from 3 epochs of 108 images
    assert "best-test" in (run / "report.md").read_text()
