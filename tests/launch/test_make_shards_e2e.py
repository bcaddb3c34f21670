"""The real `python -m launch.make_shards` in a subprocess, on a folder of every awkward kind of
file: every valid image lands exactly once, every invalid one is reported, the output is the
same bytes whatever --workers is, stock webdataset reads it, and every error leaves OUT alone."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.format import decode_rgb
from shards.manifest import Manifest
from tests.conftest import wait_for
from tests.launch.test_make_shards import bomb_png, encode, image_tree, noise, read_only_folder, with_orientation

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def make_shards(*args, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.make_shards", *map(str, args)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def assert_one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` -> sha256 of its bytes (to prove a folder was not touched)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------- the corpus


def build_corpus(root: Path) -> tuple[Path, dict[str, str], dict[str, str], Path]:
    """-> (SRC, valid relpath -> stored field, invalid relpath -> reason kind, an outside file)."""
    src = root / "src"
    valid: dict[str, str] = {}
    invalid: dict[str, str] = {}

    def put(rel: str, data: bytes, field: str | None = None, reason: str | None = None):
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if field:
            valid[rel] = field
        if reason:
            invalid[rel] = reason

    for c, cls in enumerate(["cat", "狗", "with space"]):
        for i in range(8):
            put(f"{cls}/plain_{i}.jpg", encode(noise((24 + i, 20), seed=100 * c + i), "JPEG", quality=90), "jpg")
    put("cat/UPPER.JPEG", encode(noise((20, 16), seed=1), "JPEG"), "jpg")
    put("cat/cmyk.jpg", encode(noise((16, 16), seed=2).convert("CMYK"), "JPEG"), "jpg")
    put("cat/gray16.png", encode(Image.fromarray((np.arange(96).reshape(8, 12) * 600).astype(np.uint16)), "PNG"), "png")
    pal = noise((12, 10), seed=3).convert("P")
    put("cat/palette.png", encode(pal, "PNG", transparency=0), "png")
    put("cat/la.png", encode(noise((10, 10), seed=4).convert("LA"), "PNG"), "png")
    put("cat/rgba.PNG", encode(noise((10, 10), seed=5).convert("RGBA"), "PNG"), "png")
    put("cat/rotated.jpg", with_orientation(noise((40, 20), seed=6), 6), "jpg")
    put("cat/one_pixel.png", encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), "png")
    put("cat/anim.gif", encode(noise((14, 12), seed=7).convert("P"), "GIF"), "png")
    put("cat/bitmap.BMP", encode(noise((14, 12), seed=8), "BMP"), "png")
    put("cat/scan.tiff", encode(noise((14, 12), seed=9), "TIFF"), "png")
    put("cat/photo.webp", encode(noise((14, 12), seed=10), "WEBP", lossless=True), "webp")
    put("cat/sub/deeper/nested.jpg", encode(noise((18, 18), seed=11), "JPEG"), "jpg")
    put("cat/big.jpg", encode(Image.new("RGB", (2600, 1800), (30, 60, 90)), "JPEG", quality=70), "jpg")  # 4.7 MP
    put("狗/照片 1.jpg", encode(noise((22, 18), seed=12), "JPEG"), "jpg")
    put("with space/a b.png", encode(noise((15, 15), seed=13), "PNG"), "png")
    # identical bytes: twice within a class, and once across classes (label noise)
    twin = encode(noise((16, 12), seed=14), "JPEG")
    put("with space/twin_a.jpg", twin, "jpg")
    put("with space/twin_b.jpg", twin, "jpg")
    put("狗/stray_cat.jpg", (src / "cat/plain_0.jpg").read_bytes(), "jpg")
    # invalid ones
    good = encode(noise((64, 64), seed=15), "JPEG", quality=95)
    put("cat/truncated.jpg", good[: len(good) * 2 // 3], reason="truncated or corrupt")
    put("cat/empty.jpg", b"", reason="empty file")
    put("cat/fake.jpg", b"<html>this is not a jpeg</html>\n", reason="not an image")
    put("狗/bomb.png", bomb_png(), reason="decompression bomb")
    # not images by name: ignored, not reported
    put("cat/notes.txt", b"hello")
    put("cat/.DS_Store", b"\x00\x00\x00\x01Bud1")
    put("狗/Thumbs.db", b"\xd0\xcf\x11\xe0")
    put("README.md", b"stray file at SRC's root")
    # a symlinked file from outside SRC is followed
    outside = root / "outside.jpg"
    outside.write_bytes(encode(noise((20, 20), seed=16), "JPEG"))
    (src / "cat" / "linked.jpg").symlink_to(outside)
    valid["cat/linked.jpg"] = "jpg"
    return src, valid, invalid, outside


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """The same corpus sharded with 1 and with 2 workers."""
    src = corpus[0]
    base = tmp_path_factory.mktemp("runs")
    opts = ["--val-fraction", "0.25", "--min-shards", "3", "--seed", "7"]
    res1 = make_shards(src, base / "w1", "--workers", "1", *opts)
    make_shards(src, base / "w2", "--workers", "2", *opts)
    return base / "w1", base / "w2", res1


def read_samples(out: Path) -> dict[str, list[dict]]:
    """split -> samples read straight from the tars with tarfile (no webdataset)."""
    result = {}
    for split in ("train", "val"):
        samples: dict[str, dict] = {}
        for shard in sorted((out / split).glob("*.tar")):
            with tarfile.open(shard) as tf:
                for m in tf.getmembers():
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {"__key__": key, "__shard__": shard.name})[ext] = tf.extractfile(m).read()
        result[split] = list(samples.values())
    return result


# ---------------------------------------------------------------- the output


def test_every_valid_image_lands_exactly_once_and_every_invalid_is_reported(corpus, runs):
    src, valid, invalid, _ = corpus
    out = runs[0]
    m = Manifest.load(out)
    samples = read_samples(out)
    paths = Counter(json.loads(s["json"])["path"] for split in samples.values() for s in split)
    assert set(paths) == set(valid) and max(paths.values()) == 1
    skipped = {s["path"]: s["reason"] for s in m.skipped}
    assert set(skipped) == set(invalid)
    for rel, kind in invalid.items():
        assert skipped[rel].startswith(kind), (rel, skipped[rel])
    assert m.classes == sorted(["cat", "狗", "with space"])
    for split, info in m.splits.items():
        assert info.num_samples == len(samples[split]) == sum(s.samples for s in info.shards)
        labels = Counter(m.classes[int(s["cls"])] for s in samples[split])
        assert {c: n for c, n in info.class_counts.items() if n} == dict(labels)


def test_samples_have_the_documented_fields(corpus, runs):
    src, valid, _, outside = corpus
    m = Manifest.load(runs[0])
    for split in read_samples(runs[0]).values():
        for s in split:
            meta = json.loads(s["json"])
            images = [e for e in ("jpg", "png", "webp") if e in s]
            assert images == [valid[meta["path"]]], meta
            assert set(s) == {"__key__", "__shard__", "cls", "json", images[0]}
            assert m.classes[int(s["cls"])] == meta["label"] == meta["path"].split("/")[0]
            data = s[images[0]]
            if meta["path"] == "cat/linked.jpg":
                assert data == outside.read_bytes()
            elif images[0] != "png" or meta["path"].lower().endswith(".png"):
                assert data == (src / meta["path"]).read_bytes()  # kept as it is
            rgb = decode_rgb(data)
            assert rgb.mode == "RGB" and rgb.size == (meta["width"], meta["height"])
            if meta["path"] == "cat/rotated.jpg":
                assert (meta["width"], meta["height"]) == (20, 40)


def test_identical_files_are_reported_and_never_straddle(runs):
    m = Manifest.load(runs[0])
    groups = {tuple(d["paths"]): d for d in m.duplicates}
    assert ("with space/twin_a.jpg", "with space/twin_b.jpg") in groups
    cross = groups[("cat/plain_0.jpg", "狗/stray_cat.jpg")]
    assert cross["cross_class"] and cross["classes"] == ["cat", "狗"]
    for d in m.duplicates:
        assert len(set(d["splits"])) == 1 and not d["crosses_splits"]


def test_output_is_byte_identical_whatever_the_worker_count(runs):
    w1, w2, _ = runs
    t1, t2 = tree(w1), tree(w2)
    assert [p for p in t1 if p.endswith(".tar")] and t1.keys() == t2.keys()
    for path in t1:
        if path not in ("manifest.json", "summary.txt") and not path.endswith(".png"):
            assert t1[path] == t2[path], path
    m1, m2 = (json.loads((w / "manifest.json").read_text()) for w in (w1, w2))
    m1.pop("created"), m2.pop("created")
    m1.pop("source"), m2.pop("source")  # the runs ran on the same SRC; this holds its absolute path
    assert m1 == m2
    assert "workers" not in m1["options"] and m1["options"]["seed"] == 7


def test_manifest_shards_and_timm_info_agree(runs):
    out = runs[0]
    m = Manifest.load(out)
    m.verify(checksum=True)
    info = json.loads((out / "_info.json").read_text())
    for split, s in m.splits.items():
        assert len(s.shards) >= 3 or len(s.shards) == s.num_samples
        sizes = [x.samples for x in s.shards]
        assert max(sizes) - min(sizes) <= 1
        assert info["splits"][split]["filenames"] == [f"{split}/{x.name}" for x in s.shards]
        assert info["splits"][split]["shard_lengths"] == sizes
        assert info["splits"][split]["num_samples"] == s.num_samples
        assert all(x.name == f"{split}-{k:06d}.tar" for k, x in enumerate(s.shards))
    assert all(0 < v < 1 for v in m.mean + m.std)
    for name in ("class_distribution.png", "image_sizes.png", "summary.txt"):
        assert (out / name).stat().st_size > 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_stock_webdataset_reads_every_sample(runs):
    wds = pytest.importorskip("webdataset")
    m = Manifest.load(runs[0])
    for split in ("train", "val"):
        urls = [str(p) for p in m.shard_paths(split)]
        seen = 0
        for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
            image = next(sample[e] for e in ("jpg", "png", "webp") if e in sample)
            assert isinstance(image, Image.Image) and isinstance(sample["json"], dict)
            assert int(sample["cls"]) == m.classes.index(sample["json"]["label"])
            seen += 1
        assert seen == m.splits[split].num_samples


def test_summary_on_stdout(runs):
    text = runs[2].stdout
    assert "skipped:" in text and "duplicates:" in text and "across classes" in text
    assert "train RGB mean" in text
    assert "missing from" not in runs[2].stderr  # matplotlib's "Glyph ... missing from font": tofu in the plot


def test_filters_and_cap(corpus, tmp_path):
    src = corpus[0]
    out = tmp_path / "out"
    make_shards(src, out, "--min-side", "2", "--max-aspect", "1.9", "--max-per-class", "5", "--workers", "2")
    m = Manifest.load(out)
    reasons = Counter(s["reason"].split(" (")[0] for s in m.skipped)
    assert reasons["too small"] == 1  # the 1x1
    assert reasons["aspect ratio out of bounds"] == 1  # rotated.jpg, shown as 20x40
    assert all(m.splits["train"].class_counts[c] + m.splits["val"].class_counts[c] <= 5 for c in m.classes)
    assert reasons["over --max-per-class 5"] > 0


def test_resize_short_reencodes_large_images(corpus, tmp_path):
    out = tmp_path / "out"
    make_shards(corpus[0], out, "--resize-short", "64", "--val-fraction", "0")
    for s in read_samples(out)["train"]:
        meta = json.loads(s["json"])
        if meta["path"] == "cat/big.jpg":
            assert Image.open(io.BytesIO(s["jpg"])).size == (92, 64) and (meta["width"], meta["height"]) == (2600, 1800)
            break
    else:
        pytest.fail("big.jpg not found")
    assert Manifest.load(out).splits["val"].num_samples == 0


def test_presplit_layout_is_kept(tmp_path):
    src = tmp_path / "src"
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("a", "b"):
            d = src / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.png").write_bytes(encode(noise((8, 8), seed=hash((split, cls, i)) % 1000), "PNG"))
    out = tmp_path / "out"
    make_shards(src, out, "--min-shards", "2")
    m = Manifest.load(out)
    assert m.classes == ["a", "b"] and m.options["layout"] == "presplit"
    assert m.splits["train"].class_counts == {"a": 6, "b": 6} and m.splits["val"].class_counts == {"a": 2, "b": 2}
    paths = {json.loads(s["json"])["path"] for s in read_samples(out)["val"]}
    assert all(p.startswith("val/") for p in paths) and len(paths) == 4


def test_a_train_and_test_folder_gives_three_splits_that_the_shard_reader_reads(tmp_path):
    """What a user with their own photos has: train/ and test/ of JPEG and PNG files, no val."""
    from trainer.training.data import open_shards, split_reader

    src = image_tree(tmp_path / "src", {"train": {"coat": 12, "shoe": 9}, "test": {"coat": 4, "shoe": 3}})
    out = tmp_path / "out"
    res = make_shards(src, out, "--min-shards", "2", "--val-fraction", "0.25")
    assert "2 classes (presplit); 28 image files found, 28 written" in res.stdout
    assert "splits: train/ -> train and val (val carved from it: --val-fraction 0.25 of each class" in res.stdout
    m = Manifest.load(out)
    counts = {name: (info.num_samples, info.class_counts) for name, info in m.splits.items()}
    assert counts == {
        "train": (16, {"coat": 9, "shoe": 7}),
        "val": (5, {"coat": 3, "shoe": 2}),
        "test": (7, {"coat": 4, "shoe": 3}),
    }
    timm = json.loads((out / "_info.json").read_text())["splits"]["test"]
    assert timm["num_samples"] == 7 and all(f.startswith("test/test-") for f in timm["filenames"])
    reader = split_reader(open_shards(str(out), reads=("test",)), "test")
    paths = sorted(json.loads(reader.read(i)["json"])["path"] for i in range(len(reader)))
    assert paths == sorted(str(p.relative_to(src)) for p in (src / "test").rglob("*.*"))
    assert all(p.startswith("test/") for p in paths) and reader.labels().tolist().count(0) == 4
    assert "summary.txt" in os.listdir(out) and "test: 7 samples in 2 shards" in (out / "summary.txt").read_text()


def test_demo(tmp_path):
    out = tmp_path / "demo"
    make_shards("--demo", out, "--workers", "2")
    m = Manifest.load(out)
    assert m.classes == [str(d) for d in range(10)]
    assert m.splits["train"].num_samples + m.splits["val"].num_samples == 1797
    assert min(len(s.shards) for s in m.splits.values()) >= 8
    assert Path(m.source) == out.absolute() / "images" and len(list((out / "images").rglob("*.png"))) == 1797
    folder = tmp_path / "digits"
    res = subprocess.run([sys.executable, "-m", "launch.demo", str(folder)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and sorted(os.listdir(folder)) == [str(d) for d in range(10)]


# ---------------------------------------------------------------- errors: one line, exit 2, OUT untouched


def test_missing_src(tmp_path):
    assert_one_line_error(make_shards(tmp_path / "nope", tmp_path / "out", check=False), "does not exist")
    assert not (tmp_path / "out").exists()


def test_src_without_class_folders(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "loose.jpg").write_bytes(encode(noise((8, 8)), "JPEG"))
    assert_one_line_error(make_shards(tmp_path / "src", tmp_path / "out", check=False), "no class folders")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_empty_class_stops_unless_skipped(tmp_path):
    src = tmp_path / "src"
    for cls in ("good", "also good"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            (src / cls / f"{i}.png").write_bytes(encode(noise((8, 8), seed=i), "PNG"))
    (src / "hollow").mkdir()
    (src / "hollow" / "notes.txt").write_text("no images here")
    (src / "hollow" / "broken.jpg").write_bytes(b"nope")
    res = make_shards(src, tmp_path / "out", check=False)
    assert_one_line_error(res, "'hollow'", "--skip-empty-classes")
    assert sorted(os.listdir(tmp_path)) == ["src"]
    make_shards(src, tmp_path / "out", "--skip-empty-classes")
    m = Manifest.load(tmp_path / "out")
    assert m.classes == ["also good", "good"]
    assert {s["path"] for s in m.skipped} == {"hollow/broken.jpg"}


def test_no_valid_image_at_all(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(b"")
    res = make_shards(tmp_path / "src", tmp_path / "out", "--skip-empty-classes", check=False)
    assert_one_line_error(res, "no valid image")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_out_not_empty_is_refused_and_left_untouched_then_overwritten(corpus, tmp_path):
    src = corpus[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = tree(out)
    assert_one_line_error(make_shards(src, out, check=False), "not empty", "--overwrite")
    assert tree(out) == before and sorted(os.listdir(tmp_path)) == ["out"]
    # a refused run with --overwrite (bad input) leaves it untouched as well
    assert_one_line_error(make_shards(tmp_path / "missing", out, "--overwrite", check=False))
    assert tree(out) == before
    make_shards(src, out, "--overwrite", "--min-shards", "2")
    assert not (out / "precious.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize(
    "args,words",
    [
        (["--val-fraction", "1.5"], ["--val-fraction"]),
        (["--workers", "0"], ["--workers"]),
        (["--bogus"], ["unrecognized"]),
    ],
)
def test_bad_options(corpus, tmp_path, args, words):
    assert_one_line_error(make_shards(corpus[0], tmp_path / "out", *args, check=False), *words)
    assert not (tmp_path / "out").exists()


def test_out_inside_src_is_refused(corpus, tmp_path):
    assert_one_line_error(make_shards(corpus[0], corpus[0] / "shards", check=False), "inside SRC")
    assert not (corpus[0] / "shards").exists()


def test_ctrl_c_leaves_out_untouched(tmp_path):
    import signal

    from toolbox import failpoints

    work, paused = tmp_path / "work", tmp_path / "paused"
    out = work / "out"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    cmd = [sys.executable, "-m", "launch.make_shards", "--demo", str(out), "--overwrite", "--workers", "2"]
    # It waits after its first shard until interrupted.
    env = dict(os.environ, **failpoints.env(make_shards_pause=paused))
    # As a terminal starts it: a suite run in the background (`cmd &`) passes SIGINT on ignored.
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    try:
        wait_for(paused.exists, timeout=300, process=proc)
        assert list(work.glob(".out.partial-*"))  # mid-run: its staging folder holds a shard, the rest is pending
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "error: interrupted — OUT was left as it was; run the command again"
    ]
    assert os.listdir(out) == ["old.txt"] and sorted(os.listdir(work)) == ["out"]


# ---------------------------------------------------------------- hostile input: skipped, one line each, never a hang


def test_fifo_device_oversized_and_undecodable_names_are_each_one_skip_reason(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            (src / cls / f"{i}.png").write_bytes(encode(noise((8, 8), seed=i), "PNG"))
    os.mkfifo(src / "a" / "x.jpg")  # read whole, it hung make_shards for good
    (src / "a" / "zero.png").symlink_to("/dev/zero")  # read whole, it took 15.8 GB
    (src / "b" / "big.png").write_bytes(encode(noise((300, 300)), "PNG"))
    (src / "b" / os.fsdecode(b"caf\xe9.png")).write_bytes(encode(noise((8, 8)), "PNG"))
    latin1_class = src / os.fsdecode(b"\xe9t\xe9")
    latin1_class.mkdir()
    (latin1_class / "0.png").write_bytes(encode(noise((8, 8)), "PNG"))
    # Bounded, so that a regression fails here instead of taking the machine's memory or hanging.
    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # noqa: E731
    cmd = [sys.executable, "-m", "launch.make_shards", src, out, "--max-file-size", "10KB", "--skip-empty-classes"]
    res = subprocess.run(
        [*cmd, "--min-shards", "1"], cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=cap
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "skipped: " in res.stdout
    m = Manifest.load(out)
    assert m.classes == ["a", "b"] and m.splits["train"].num_samples + m.splits["val"].num_samples == 6
    assert m.options["max_file_size"] == 10_000
    reasons = {s["path"]: s["reason"] for s in m.skipped}
    assert reasons.pop("a/x.jpg") == "not a regular file (a FIFO)"
    assert reasons.pop("a/zero.png") == "not a regular file (a character device, via a symlink)"
    too_large = reasons.pop("b/big.png")
    assert too_large.startswith("too large (") and too_large.endswith(" MB > --max-file-size 10000 bytes)")
    assert reasons.pop("b/caf\\xe9.png").startswith("name not UTF-8 (rename it")
    assert reasons.pop("\\xe9t\\xe9/0.png").startswith("name not UTF-8")
    assert reasons == {}


def test_a_class_folder_whose_name_is_not_utf8_stops_in_one_line_naming_it(tmp_path):
    src = tmp_path / "src"
    for name in ("good", os.fsdecode(b"\xe9t\xe9")):
        (src / name).mkdir(parents=True)
        (src / name / "0.png").write_bytes(encode(noise((8, 8)), "PNG"))
    assert_one_line_error(make_shards(src, tmp_path / "out", check=False), "'\\xe9t\\xe9'", "--skip-empty-classes")


# ---------------------------------------------------------------- OUT: one writer, stale partial builds, writable


def test_a_second_make_shards_on_out_exits_2_naming_the_first_and_a_killed_ones_partial_is_swept(tmp_path):
    import signal

    from toolbox import failpoints

    work, paused = tmp_path / "work", tmp_path / "paused"
    out = work / "out"
    cmd = [sys.executable, "-m", "launch.make_shards", "--demo", str(out), "--workers", "2"]
    env = dict(os.environ, **failpoints.env(make_shards_pause=paused))  # holds OUT after its first shard
    first = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        wait_for(paused.exists, timeout=300, process=first)
        second = make_shards("--demo", out, "--val-fraction", "0.3", check=False)
        assert_one_line_error(second, f"OUT {out} is being written by another make_shards", f"pid {first.pid}, since ")
        os.kill(first.pid, signal.SIGKILL)  # only the main process: its orphaned workers must not keep the lock
        first.communicate(timeout=60)
        (partial,) = work.glob(".out.partial-*")
        assert partial.name == f".out.partial-{first.pid}"
        third = make_shards("--demo", out, "--val-fraction", "0.3")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    assert f"note: deleted {partial}, the partial build of an earlier run (pid {first.pid}, gone)" in third.stderr
    assert sorted(os.listdir(work)) == ["out"] and Manifest.load(out).options["val_fraction"] == 0.3


@pytest.fixture
def read_only_dir(tmp_path):
    with read_only_folder(tmp_path) as folder:
        yield folder


def test_an_out_in_a_folder_that_cannot_be_written_is_refused_before_the_scan(corpus, read_only_dir):
    res = make_shards(corpus[0], read_only_dir / "out", check=False)
    assert_one_line_error(res, f"cannot write OUT {read_only_dir / 'out'}", "not writable")
    assert res.stdout == "" and os.listdir(read_only_dir) == []
