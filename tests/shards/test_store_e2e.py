"""Shards on object storage and HTTP: real servers on loopback (moto's S3, Python's file server),
real make_shards uploads, real 2-process gloo training that reads through the node-local cache."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from shards.cache import ShardCache
from tests.conftest import (
    EXACT,
    REPO,
    cpu_env,
    http_server,
    kill_group,
    make_shards_to,
    run_training,
    start_training,
    wait_for,
)
from toolbox import failpoints
from toolbox.testing import s3_fs, s3_server
from trainer.training import checkpoint

pytestmark = pytest.mark.e2e

# Digits: 8 train shards of ~0.63 MB. 3 MB holds 2 blocks of 2 shards: the shard-block order,
# with every shard fetched again each epoch.
LIMIT = "3MB"
LIMIT_BYTES = 3_000_000


@pytest.fixture(scope="module")
def s3(digits_shards):
    """A bucket holding the digits shards, uploaded by make_shards itself."""
    with s3_server() as (server, env):
        s3_fs(env).mkdir("data")
        made = make_shards_to("s3://data/digits", env, "--demo")
        assert made.returncode == 0, made.stderr[-2000:]
        yield env


def weights(run_dir):
    return load_file(run_dir / "final.safetensors")


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].equal(wb[name]), name


def eval_records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]


class CacheWatch:
    """Samples the cache's size while a run goes on (it can miss a peak, never invent one)."""

    def __init__(self, root):
        self.root, self.peak, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            if (self.root / ".space.lock").exists():
                self.peak = max(self.peak, ShardCache(self.root, None).used())  # under the cache's own lock
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_make_shards_uploads_the_manifest_last_and_replaces_only_when_complete(s3):
    fs = s3_fs(s3)
    names = fs.find("data/digits")
    assert "data/digits/manifest.json" in names and "data/digits/train/index.npy" in names
    assert not any("/images/" in n for n in names)  # the demo's image folder stays local
    again = make_shards_to("s3://data/digits", s3, "--demo")
    assert again.returncode == 2 and "is not empty — pass --overwrite" in again.stderr
    assert make_shards_to("s3://data/other", s3, "--demo", "--seed", "1").returncode == 0
    replaced = make_shards_to("s3://data/other", s3, "--demo", "--seed", "2", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    manifest = json.loads(fs.cat("data/other/manifest.json"))
    assert manifest["prefix"].startswith("build-") and manifest["options"]["seed"] == 2
    left = fs.find("data/other")
    assert not [n for n in left if n.startswith("data/other/train/")]  # the old build is gone, after the switch
    for shard in manifest["splits"]["train"]["shards"]:
        assert f"data/other/{manifest['prefix']}train/{shard['name']}" in left
    missing = make_shards_to("s3://nobucket/x", s3, "--demo")
    assert (
        missing.returncode == 2
        and missing.stderr.strip() == "error: bucket 'nobucket' does not exist (s3://nobucket/x) — create it first"
    )


def test_training_from_s3_with_no_limit_equals_training_from_the_local_copy(s3, uninterrupted, tmp_path):
    local, remote = uninterrupted, tmp_path / "remote"
    b = run_training(
        ["data.shards=s3://data/digits", f"run.dir={remote}", f"data.cache_dir={tmp_path / 'cache'}", *EXACT], **s3
    )
    assert b.returncode == 0, b.stderr[-3000:]
    assert_same_weights(local, remote)
    assert eval_records(local)[-1]["top1"] == eval_records(remote)[-1]["top1"]
    fetched = [json.loads(x).get("fetched_mb", 0) for x in (remote / "metrics.jsonl").read_text().splitlines()]
    assert 4.5 < sum(fetched) < 6.0  # the train split, once (the val split goes with evaluation)


@pytest.fixture(scope="module")
def limited(s3, tmp_path_factory):
    """An uninterrupted run from s3:// through a cache smaller than the data."""
    work = tmp_path_factory.mktemp("limited")
    run_dir, cache = work / "run", work / "cache"
    with CacheWatch(cache / "se-densenet-shards") as watch:
        result = run_training(
            [
                "data.shards=s3://data/digits",
                f"run.dir={run_dir}",
                f"data.cache_dir={cache}",
                f"data.cache_limit={LIMIT}",
                *EXACT,
            ],
            **s3,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, watch.peak


def test_a_cache_smaller_than_the_data_stays_under_its_limit_and_validates_every_sample(limited, digits_shards):
    run_dir, peak = limited
    assert 0 < peak <= LIMIT_BYTES
    val = json.loads((digits_shards / "manifest.json").read_text())["splits"]["val"]["num_samples"]
    assert [r["num_samples"] for r in eval_records(run_dir)] == [val, val]
    fetched = [json.loads(x).get("fetched_mb", 0) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(fetched) > 7.0  # the train split (5 MB) and, in the second epoch, what the 3 MB cache no longer held


def test_sigkill_and_restart_from_s3_is_bitwise_identical(s3, limited, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    overrides = [
        "data.shards=s3://data/digits",
        f"run.dir={run_dir}",
        f"data.cache_dir={cache}",
        f"data.cache_limit={LIMIT}",
        *EXACT,
    ]
    process = start_training(overrides, **s3, **failpoints.env(pause_checkpoint=21))
    try:  # the step-21 write stalls before its marker (ckpt-14 complete, the run mid-way): kill it there
        wait_for(lambda: (run_dir / "checkpoints/ckpt-000000021.tmp/state.pt").exists(), timeout=300, process=process)
    finally:
        kill_group(process, signal.SIGKILL)
        process.wait(timeout=60)
    resumed = run_training(overrides, **s3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 14)" in resumed.stdout
    assert_same_weights(limited[0], run_dir)


def test_a_corrupted_object_is_fetched_again_once_then_one_line(s3, tmp_path):
    fs = s3_fs(s3)
    fs.copy("data/digits", "data/corrupt", recursive=True)
    shard = "data/corrupt/train/train-000003.tar"
    data = bytearray(fs.cat(shard))
    data[5000] ^= 0xFF
    fs.pipe(shard, bytes(data))
    result = run_training(
        [
            "data.shards=s3://data/corrupt",
            f"run.dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'c'}",
            "train.epochs=1",
            "wandb.mode=disabled",
        ],
        processes=1,
        **s3,
    )
    assert result.returncode == 2
    line = "error: s3://data/corrupt/train/train-000003.tar was downloaded twice and is corrupted"
    assert line in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_store_that_goes_away_is_retried_then_one_line_and_the_checkpoint_survives(digits_shards, tmp_path):
    with s3_server() as (server, env):
        s3_fs(env).mkdir("gone")
        assert make_shards_to("s3://gone/digits", env, "--demo").returncode == 0
        run_dir, release = tmp_path / "run", tmp_path / "release"
        overrides = [
            "data.shards=s3://gone/digits",
            f"run.dir={run_dir}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.cache_limit={LIMIT}",
            "data.fetch_retries=1",
            *EXACT,
            "train.epochs=3",
        ]
        process = start_training(overrides, **env, **failpoints.env(pause_checkpoint=14, release=release))
        try:  # ckpt-7 is complete and the run waits in its step-14 checkpoint until released: stop the store there
            wait_for(lambda: Path(f"{release}.paused").exists(), timeout=300, process=process)
            server.stop()  # the blocks of later epochs are not in the cache yet: they must be fetched
            release.touch()
            output, _ = process.communicate(timeout=300)
        finally:
            kill_group(process, signal.SIGKILL)
    assert process.returncode != 0
    assert (
        "could not be read (endpoint unreachable" in output
        and "attempts) — check the network and AWS_ENDPOINT_URL" in output
    ), output[-3000:]
    path = checkpoint.complete_checkpoints(run_dir / "checkpoints")[-1]
    state, _ = checkpoint.read(path)
    assert state["progress"]["step"] >= 7


def evaluate(run_dir, data, env, name):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", str(run_dir), "--data", data, "--name", name],
        cwd=REPO,
        env=cpu_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "eval" / f"{name}.json").read_text())
    return {k: record[k] for k in ("num_samples", "top1", "top5", "loss", "confusion")}


def test_evaluate_from_s3_and_http_equals_the_local_path(s3, limited, digits_shards):
    run_dir = limited[0]
    local = evaluate(run_dir, str(digits_shards), {}, "local")
    assert evaluate(run_dir, "s3://data/digits", s3, "s3") == local
    with http_server(digits_shards.parent) as url:
        assert evaluate(run_dir, f"{url}/{digits_shards.name}?token=SECRET", {}, "http") == local
    assert "SECRET" not in (run_dir / "eval" / "http.json").read_text()


def test_credentials_never_land_in_the_run(s3, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    with http_server(digits_shards.parent) as url:  # a token in the query string, sent with each file
        missing = run_training(
            [f"data.shards={url}/missing?token=SECRET", f"run.dir={run_dir}", "wandb.mode=disabled"], processes=1
        )
        assert missing.returncode == 2 and "SECRET" not in missing.stderr
        assert missing.stderr.strip().startswith(f"error: {url}/missing has no manifest.json"), missing.stderr
        ok = run_training(
            [
                f"data.shards={url}/{digits_shards.name}?token=SECRET",
                f"run.dir={run_dir}",
                f"data.cache_dir={tmp_path / 'c'}",
                "train.epochs=1",
                "wandb.mode=offline",
            ],
            **s3,
        )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "SECRET" not in ok.stdout + ok.stderr
    assert (run_dir / "wandb").is_dir()
    secrets = [b"SECRET", s3["AWS_ACCESS_KEY_ID"].encode(), s3["AWS_SECRET_ACCESS_KEY"].encode()]
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [s for s in secrets if s in data], path  # config, checkpoints, weights, metrics, wandb


def test_each_way_a_location_fails_is_one_line_before_any_work(s3, monkeypatch):
    from shards.source import CacheOptions, ShardSource
    from toolbox.errors import DataError

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    s3_fs(s3).mkdir("empty")
    expected = {
        "s3://nobucket/x": "bucket 'nobucket' does not exist (s3://nobucket/x) — check the name, or create it",
        "s3://data/nothing": "nothing at s3://data/nothing — check the prefix, or make shards there",
        "s3://data/digits/train": "s3://data/digits/train has no manifest.json — make shards there",
    }
    for location, line in expected.items():
        with pytest.raises(DataError) as e:
            ShardSource(location, CacheOptions(retries=0))
        assert str(e.value).startswith(line)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(
        DataError,
        match=r"endpoint unreachable .* — check the network and AWS_ENDPOINT_URL \(now http://127.0.0.1:9\)",
    ):
        ShardSource("s3://data/digits", CacheOptions(retries=0))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["AWS_ENDPOINT_URL"])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(
        DataError, match="no credentials found — set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    ):
        ShardSource("s3://data/digits", CacheOptions(retries=0))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_first_upload_leaves_out_as_it_found_it(s3, tmp_path, sig):
    """Stopped after its first object: the objects it wrote are taken back, and the same command then
    completes (before, it left them and refused "not empty"). A killed upload's leftovers are
    recognised as such and replaced."""
    fs, paused = s3_fs(s3), tmp_path / "paused"
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.make_shards", "--demo", f"s3://data/first-{sig}"],
        cwd=REPO,
        env=cpu_env(**s3, **failpoints.env(upload_pause=paused)),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal starts it
    )
    try:
        wait_for(paused.exists, timeout=300, process=process)
        assert fs.find(f"data/first-{sig}")  # the first object is there
        process.send_signal(sig)
        err = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    what = "interrupted" if sig == signal.SIGINT else "terminated"
    assert lines == [f"error: {what} — OUT was left as it was; run the command again"], err[-2000:]
    fs.invalidate_cache()  # the listing above is cached
    assert fs.find(f"data/first-{sig}") == []
    again = make_shards_to(f"s3://data/first-{sig}", s3, "--demo")
    assert again.returncode == 0, again.stderr[-2000:]
    fs.pipe(f"data/leftover-{sig}/train/train-000000.tar", b"half")  # what a SIGKILLed upload leaves
    fs.pipe(f"data/leftover-{sig}/summary.txt", b"x")
    replaced = make_shards_to(f"s3://data/leftover-{sig}", s3, "--demo")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert "holds 2 objects of an upload that did not finish (no manifest.json): they are replaced" in replaced.stderr
    assert fs.cat(f"data/leftover-{sig}/train/train-000000.tar") != b"half"
