"""model.pretrained=imagenet through the real commands, with no network (an HTTPS proxy that refuses
every connection): a run starts from the weights in TORCH_HOME's cache; without them the job stops
with one line naming fetch_weights, as fetch_weights itself does."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from tests.conftest import REPO, cpu_env, train_command

pytestmark = pytest.mark.e2e

FILE = "densenet121-a639ec97.pth"
NO_NETWORK = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
# DenseNet-121 as torchvision builds it, on 32 px digits (the ImageNet stem's smallest useful size), a few steps.
IMAGENET_121 = [
    "model.depth=121",
    "model.block_config=null",
    "model.growth_rate=null",
    "model.num_init_features=null",
    "model.small_inputs=false",
    "model.pretrained=imagenet",
    "data.image_size=32",
    "data.normalize=imagenet",
    "train.epochs=1",
    "train.batch_size=8",
    "wandb.mode=disabled",
]


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("few") / "shards"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.make_shards",
            "--demo",
            "--max-per-class",
            "6",
            "--val-fraction",
            "0.34",
            "--min-shards",
            "1",
            str(out),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def train(shards: Path, tmp: Path, processes: int) -> subprocess.CompletedProcess:
    overrides = [f"data.shards={shards}", f"run.dir={tmp / 'run'}", *IMAGENET_121]
    env = cpu_env(TORCH_HOME=str(tmp / "torch"), **NO_NETWORK)
    command = train_command("configs/demo.yaml", overrides, processes)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_run_starts_from_the_cached_imagenet_weights(few_digits, tmp_path):
    cache = tmp_path / "torch/hub/checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), cache / FILE)
    result = train(few_digits, tmp_path, processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialised from torchvision's densenet121 ImageNet weights: 604 tensors loaded" in result.stdout
    assert "data.normalize=imagenet matches them" not in result.stdout  # it does: no note
    assert (tmp_path / "run/final.safetensors").is_file()


def test_without_the_weights_the_job_says_one_line_naming_fetch_weights(few_digits, tmp_path):
    """Under accelerate launch: every rank fails to fetch, the job says it once."""
    result = train(few_digits, tmp_path, processes=2)
    assert result.returncode != 0
    said = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert len(said) == 1, result.stderr[-3000:]
    assert said[0].startswith("error: model.pretrained=imagenet needs torchvision's densenet121 ImageNet weights")
    assert said[0].endswith(
        "run `python -m trainer.fetch_weights densenet121` on a machine with internet (a login node), with the same "
        "TORCH_HOME"
    )


def test_fetch_weights_without_network_says_so_in_one_line(tmp_path):
    env = cpu_env(TORCH_HOME=str(tmp_path / "torch"), **NO_NETWORK)
    command = [sys.executable, "-m", "trainer.fetch_weights", "densenet121"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: model.pretrained=imagenet needs torchvision's densenet121 ImageNet weights")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    left = sorted(p.name for p in (tmp_path / "torch/hub/checkpoints").iterdir())
    assert left == [f"{FILE}.lock"]  # no partial download; the lock file keeps the failure for waiters
