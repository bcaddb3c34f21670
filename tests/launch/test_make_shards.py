"""make_shards: invariants of the format, the split and the writer, then the real CLI end to end
on a corpus of every awkward kind of file a user's folder holds."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from launch import outdir
from launch.pack import encode_image
from launch.scan import TRANSCODE, inspect_file
from launch.split import NONE, TRAIN, VAL, assign_splits, duplicate_groups, plan_shards, same_bytes_groups, shard_count
from shards.format import IMAGE_EXTS, decode_rgb, image_field, sample_key, to_rgb
from shards.manifest import Manifest, ShardInfo, SplitInfo
from shards.writer import ShardWriter, publish, staging
from tests.conftest import wait_for
from toolbox.errors import DataError, UserError

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers


@contextmanager
def read_only_folder(tmp_path: Path):
    """A folder this process cannot write: chmod 555, or as root (whom modes do not stop) a
    read-only tmpfs; the test is skipped where neither can be had."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]).returncode:
        pytest.skip("a read-only folder for root needs mount")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    with read_only_folder(tmp_path) as folder:
        yield folder


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 200, w * h * 3).reshape(h, w, 3) + rng.integers(0, 55, (h, w, 3))
    img = Image.fromarray(base.astype(np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def bomb_png() -> bytes:
    """A real PNG of 90 M pixels (over Pillow's 89.5 M default) in about 11 KB."""
    return encode(Image.new("1", (10000, 9000)), "PNG")


# ---------------------------------------------------------------- decode_rgb on every mode


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "CMYK", "P", "RGBA", "LA", "I;16", "I", "F", "YCbCr"])
def test_decode_rgb_gives_8bit_rgb_for_every_mode(mode):
    src = noise((9, 7))
    img = src.convert(mode) if mode not in ("I;16", "I", "F") else src.convert("L").convert(mode)
    fmt = {"CMYK": "JPEG", "YCbCr": "JPEG", "F": "TIFF", "I": "TIFF", "I;16": "PNG"}.get(mode, "PNG")
    out = decode_rgb(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (9, 7)


def test_decode_rgb_passes_rgb_through_without_copy():
    img = noise((5, 4))
    assert to_rgb(img) is img


def test_16bit_is_scaled_not_clipped():
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)  # I;16
    out = np.asarray(decode_rgb(encode(img, "PNG")))
    assert out[0, :, 0].tolist() == [0, 100, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black
    out = decode_rgb(encode(rgba, "PNG"))
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    out = decode_rgb(encode(p, "PNG", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 255, 0)


def test_exif_orientation_is_honoured():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 10, 20))  # left quarter black
    data = with_orientation(img, 6)  # "rotate 90 CW to display"
    out = decode_rgb(data)
    assert out.size == (20, 40)
    assert out.getpixel((10, 2))[0] < 60 and out.getpixel((10, 37))[0] > 200  # black moved to the top
    assert out.size == ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size


def test_image_field():
    assert image_field({"__key__": "k", "png": b"", "cls": b"1"}) == "png"
    with pytest.raises(KeyError):
        image_field({"__key__": "k", "cls": b"1"})


# ---------------------------------------------------------------- keys


def test_sample_key_is_stable_unique_and_has_no_dot_or_slash():
    paths = [f"cls{c}/sub/img.{i}.v2.jpg" for c in range(20) for i in range(500)] + ["狗/照片 1.jpg", "a b/c d.png"]
    keys = [sample_key(p) for p in paths]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k and k.isascii() for k in keys)
    assert sample_key("狗/照片 1.jpg") == sample_key("狗/照片 1.jpg")
    assert sample_key("cat/IMG_001.JPG") == "IMG_001_" + hashlib.sha256(b"cat/IMG_001.JPG").hexdigest()[:16]


# ---------------------------------------------------------------- split


def _toy(n_per_class=(50, 30, 7, 1), dup_every=5, seed=0):
    """labels and same-bytes group ids where about every dup_every-th file repeats an earlier
    one (some across classes)."""
    rng = random.Random(seed)
    labels, group = [], []
    for c, n in enumerate(n_per_class):
        for _ in range(n):
            labels.append(c)
            group.append(rng.choice(group) if group and rng.random() < 1 / dup_every else len(group))
    return np.array(labels), np.array(group)


def test_same_bytes_groups_and_duplicate_groups():
    digests = np.zeros((5, 32), np.uint8)
    digests[[1, 3], -1] = 7  # rows 0 and 2 stay all zero bytes, which numpy "S32" strips to b""
    digests[4, 0] = 1
    ids = same_bytes_groups(digests)
    assert ids[0] == ids[2] and ids[1] == ids[3] and len(set(ids.tolist())) == 3
    assert [g.tolist() for g in duplicate_groups(ids, np.arange(5))] == [[0, 2], [1, 3]]
    assert [g.tolist() for g in duplicate_groups(ids, np.array([0, 1, 3]))] == [[1, 3]]


def test_split_is_stratified_deterministic_and_keeps_duplicates_together():
    labels, group = _toy()
    names = ["a", "b", "c", "d"]
    idx = np.arange(len(labels))
    s1, _ = assign_splits(labels, group, idx, names, 0.2, seed=1)
    s2, _ = assign_splits(labels, group, idx, names, 0.2, seed=1)
    s3, _ = assign_splits(labels, group, idx, names, 0.2, seed=2)
    assert (s1 == s2).all() and (s1 != s3).any()
    assert set(s1.tolist()) == {TRAIN, VAL}  # every file lands in exactly one split
    for g in set(group.tolist()):
        assert len(set(s1[group == g].tolist())) == 1, "identical files straddle train and val"
    for c, n in enumerate((50, 30, 7, 1)):
        n_val = int(((labels == c) & (s1 == VAL)).sum())
        assert abs(n_val - 0.2 * n) <= 2.5  # duplicates move whole units, so +-a unit
        assert ((labels == c) & (s1 == TRAIN)).any()  # every class keeps a training image


def test_split_of_a_class_does_not_depend_on_other_classes():
    labels, group = _toy(dup_every=10**9)
    full, _ = assign_splits(labels, group, np.arange(len(labels)), ["a", "b", "c", "d"], 0.3, seed=0)
    only_a = np.flatnonzero(labels == 0)
    part, _ = assign_splits(labels, group, only_a, ["a", "b", "c", "d"], 0.3, seed=0)
    assert (full[only_a] == part[only_a]).all() and (part[labels != 0] == NONE).all()


def test_cap_and_given_split():
    labels, group = _toy(n_per_class=(40, 10), dup_every=10**9)
    idx = np.arange(len(labels))
    split, capped = assign_splits(labels, group, idx, ["a", "b"], 0.25, seed=0, max_per_class=20)
    assert ((labels == 0) & (split != NONE)).sum() == 20 and len(capped) == 20
    assert ((labels == 1) & (split != NONE)).sum() == 10 and (split[capped] == NONE).all()
    given = idx % 2
    split, capped = assign_splits(labels, group, idx, ["a", "b"], 0.25, seed=0, max_per_class=5, given=given)
    kept = split != NONE
    assert (split[kept] == given[kept]).all()
    assert ((labels == 0) & (split == TRAIN)).sum() == 5  # cap on train only
    assert ((labels == 0) & (split == VAL)).sum() == 20


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 1000, 1617])
def test_shards_are_balanced_and_never_empty(n):
    k = shard_count(n, n * 1000, None, 256_000_000, 16)
    shards = plan_shards(list(range(n)), k, seed=0, split="train")
    assert k == min(n, 16) and sorted(i for s in shards for i in s) == list(range(n))
    assert all(shards) and (not shards or max(map(len, shards)) - min(map(len, shards)) <= 1)
    assert shard_count(1000, 10**9, 100, 256_000_000, 4) == 10
    assert shard_count(1000, 10**9, None, 100_000_000, 4) == 10


# ---------------------------------------------------------------- inspect, transcode, writer, manifest


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_inspect_reasons(tmp_path):
    good = encode(noise((60, 40)), "JPEG")
    files = {
        "ok.jpg": good,
        "empty.jpg": b"",
        "fake.jpg": b"just some text, not a picture\n",
        "cut.jpg": good[: len(good) // 2],
        "bomb.png": bomb_png(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    res = {name: inspect_file(str(tmp_path / name), 89_478_485) for name in files}
    assert res["ok.jpg"][6] is None and res["ok.jpg"][2:5] == (60, 40, IMAGE_EXTS.index("jpg"))
    assert res["ok.jpg"][0] == hashlib.sha256(good).digest()
    assert res["empty.jpg"][6] == "empty file"
    assert res["fake.jpg"][6].startswith("not an image")
    assert res["cut.jpg"][6].startswith("truncated or corrupt")
    assert res["bomb.png"][6].startswith("decompression bomb")


@pytest.mark.parametrize("fmt,mode", [("GIF", "P"), ("BMP", "RGB"), ("TIFF", "I;16"), ("TIFF", "RGBA"), ("TIFF", "1")])
def test_transcoding_to_png_is_lossless(fmt, mode):
    src = noise((13, 11))
    src = src.convert("L").convert(mode) if mode in ("I;16", "1") else src.convert(mode)
    ext, data = encode_image(encode(src, fmt), TRANSCODE, None)
    back = Image.open(io.BytesIO(data))
    assert ext == "png" and back.format == "PNG"
    orig = Image.open(io.BytesIO(encode(src, fmt)))
    assert np.array_equal(np.asarray(back.convert("RGBA")), np.asarray(orig.convert("RGBA")))


def test_kept_bytes_and_resize_short():
    data = encode(noise((300, 200)), "JPEG")
    assert encode_image(data, IMAGE_EXTS.index("jpg"), None) == ("jpg", data)
    assert encode_image(data, IMAGE_EXTS.index("jpg"), 500) == ("jpg", data)  # already small enough
    ext, small = encode_image(data, IMAGE_EXTS.index("jpg"), 100)
    assert ext == "jpg" and Image.open(io.BytesIO(small)).size == (150, 100)


def test_writer_is_deterministic_and_readable(tmp_path):
    infos = []
    for name in ("a.tar", "b.tar"):
        with ShardWriter(tmp_path / name) as w:
            for k in range(3):
                w.add(f"key{k}", {"json": b"{}", "cls": str(k).encode(), "png": bytes(range(k * 200 % 256)) * 3})
            infos.append(w.close())
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert infos[0].sha256 == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    assert infos[0].bytes == (tmp_path / "a.tar").stat().st_size and infos[0].samples == 3
    with tarfile.open(tmp_path / "a.tar") as tf:
        assert tf.getnames()[:3] == ["key0.cls", "key0.json", "key0.png"]


def test_staging_and_publish(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staging(out) as stage:
        (stage / "new.txt").write_text("new")
        raise RuntimeError("crash mid-write")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (out / "old.txt").read_text() == "old"
    with staging(out) as stage:
        (stage / "new.txt").write_text("new")
        publish(stage, out)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["new.txt"]


def _manifest() -> Manifest:
    shard = ShardInfo("train-000000.tar", 2, 10240, "0" * 64)
    return Manifest(
        classes=["a", "狗"],
        splits={"train": SplitInfo(2, {"a": 1, "狗": 1}, [shard]), "val": SplitInfo(0, {"a": 0, "狗": 0}, [])},
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        options={"seed": 0},
        skipped=[{"path": "a/x.jpg", "reason": "empty file"}],
    )


def test_manifest_round_trip_and_errors(tmp_path):
    m = _manifest()
    m.write(tmp_path)
    back = Manifest.load(tmp_path)
    assert back == m and back.shard_paths("train") == [tmp_path / "train" / "train-000000.tar"]
    info = json.loads((tmp_path / "_info.json").read_text())
    assert info["splits"]["train"]["filenames"] == ["train/train-000000.tar"]
    with pytest.raises(DataError, match="shard .* is missing"):
        back.verify()
    with pytest.raises(DataError, match=r"manifest\.json"):
        Manifest.load(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json is not a valid manifest .* re-run"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": []}))
    with pytest.raises(DataError, match="missing field 'splits'"):
        Manifest.load(tmp_path)


# ---------------------------------------------------------------- OUT's lock, stale partial builds, writability


def dead_pid() -> int:
    """A pid that just ended (not reused within the test, as pids count up)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_second_claim_on_out_names_the_holder_and_a_finished_one_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with outdir.claim(out) as notes:
        assert notes == [] and outdir.lock_path(out).exists()
        with pytest.raises(UserError) as e, outdir.claim(out):
            pass
        line = str(e.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in line and " — wait for it" in line
        assert "\n" not in line
    assert os.listdir(tmp_path) == []  # the lock file goes with its holder
    with outdir.claim(out):  # and is free again
        pass


def test_the_lock_is_not_kept_by_a_process_forked_while_it_is_held(tmp_path):
    out, forked = tmp_path / "out", tmp_path / "forked"
    holder = os.fork()
    if holder == 0:  # a make_shards that forks a worker, then is killed: no release, no unlink
        try:
            with outdir.claim(out):
                if os.fork() == 0:
                    forked.write_text(str(os.getpid()))
                    time.sleep(30)
                    os._exit(0)
                wait_for(forked.exists, timeout=30)
                os._exit(0)  # inside the claim: as SIGKILL ends it
        finally:
            os._exit(1)
    assert os.waitpid(holder, 0)[1] == 0
    worker = int(forked.read_text())
    try:
        assert outdir.lock_path(out).exists()  # left by the killed holder, its orphaned worker alive
        with outdir.claim(out):
            pass
    finally:
        os.kill(worker, signal.SIGKILL)


def test_stale_partial_builds_are_swept_and_live_or_foreign_ones_left(tmp_path):
    out = tmp_path / "out"
    gone, other = dead_pid(), dead_pid()
    partial = lambda pid: tmp_path / f".out.partial-{pid}"  # noqa: E731
    for pid in (gone, other, os.getppid()):
        partial(pid).mkdir()
        (partial(pid) / "train-000000.tar").write_bytes(b"x" * 1000)
    (partial(other) / outdir.BUILDER).write_text(json.dumps({"host": "elsewhere", "pid": other}))
    (tmp_path / ".other.partial-1").mkdir()  # another OUT's, whatever its pid
    with outdir.claim(out) as notes:
        assert not partial(gone).exists() and partial(other).exists() and partial(os.getppid()).exists()
        assert (tmp_path / ".other.partial-1").exists()
    assert len(notes) == 3
    assert f"note: deleted {partial(gone)}, the partial build of an earlier run (pid {gone}, gone)" in notes
    assert any(f"left {partial(other)} alone, a partial build by host elsewhere, pid {other}" in n for n in notes)
    assert any(f"left {partial(os.getppid())} alone, a partial build by pid {os.getppid()} on this" in n for n in notes)


def test_a_partial_build_names_its_builder_until_it_is_published(tmp_path):
    out = tmp_path / "out"
    with staging(out) as stage:
        outdir.mark(stage)
        who = json.loads((stage / outdir.BUILDER).read_text())
        assert (who["host"], who["pid"]) == (socket.gethostname(), os.getpid())
        outdir.unmark(stage)
        publish(stage, out)
    assert os.listdir(out) == []


def test_an_out_whose_folder_cannot_be_written_is_one_line_before_any_work(read_only_dir):
    out = read_only_dir / "out"
    with pytest.raises(UserError) as e, outdir.claim(out):
        pytest.fail("claimed a read-only folder")
    assert str(e.value).startswith(f"cannot write OUT {out}: its folder {read_only_dir} is not writable (")
    assert "\n" not in str(e.value) and not out.exists()


def test_folders_made_for_the_lock_go_again_when_the_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), outdir.claim(tmp_path / "new" / "deeper" / "out"):
        raise RuntimeError("bad SRC")
    assert os.listdir(tmp_path) == []


def test_a_remote_out_is_built_in_a_local_folder_of_its_own():
    a, b = outdir.scratch("s3://data/digits"), outdir.scratch("s3://data/other")
    assert a == outdir.scratch("s3://data/digits") and a != b and str(os.getuid()) in a.name


def test_a_channel_without_variance_gets_the_floor_std_and_a_note():
    from launch.report import flat_channels_note, mean_std
    from shards.manifest import MIN_STD

    pixels = np.zeros((4, 4, 3), dtype=np.int64)
    pixels[..., 0] = np.arange(16).reshape(4, 4) * 10  # red varies, green is flat at 0, blue flat at 0
    stats = np.array([[*pixels.sum((0, 1)), *(pixels**2).sum((0, 1)), 16]])
    mean, std = mean_std(stats)
    assert std[0] > MIN_STD and std[1] == std[2] == MIN_STD
    note = flat_channels_note(std)
    assert note.startswith("the green and blue channels of the train images do not vary: std set to 0.003922")
    assert flat_channels_note([0.2, 0.2, 0.2]) is None


def test_an_older_manifests_zero_std_is_read_and_floored_by_the_trainer():
    from shards.manifest import MIN_STD
    from trainer.training.config import load_config
    from trainer.training.transforms import IMAGENET_STD, normalization

    data = load_config(None, ["data.shards=s", "run.dir=r"]).data
    assert normalization(data, [0.3, 0.3, 0.0], [0.37, 0.37, 0.0])[1] == [0.37, 0.37, MIN_STD]
    data.normalize = "imagenet"
    assert normalization(data, [0.3, 0.3, 0.0], [0.37, 0.37, 0.0])[1] == list(IMAGENET_STD)


def test_a_file_deleted_while_shards_are_written_is_left_out_and_said(tmp_path, monkeypatch):
    """Deleted after the scan, before its shard is written: skipped with the reason, counts that add
    up, not the end of the run."""
    from launch import make_shards, pack

    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(6):
            (src / c / f"{i}.png").write_bytes(encode(noise((12, 12), seed=10 * ord(c) + i), "PNG"))
    doomed = src / "b" / "3.png"
    real_read = pack.read_source

    def read_source(path, max_bytes):
        if path == str(doomed):
            doomed.unlink()  # as a user's `rm` between the scan and this shard
        return real_read(path, max_bytes)

    monkeypatch.setattr(pack, "read_source", read_source)
    out = tmp_path / "out"
    assert make_shards.main([str(src), str(out), "--workers", "1", "--val-fraction", "0.25"]) == 0
    manifest = Manifest.load(out)
    assert {"path": "b/3.png", "reason": "gone since the scan (deleted or moved)"} in manifest.skipped
    total = sum(split.num_samples for split in manifest.splits.values())
    assert total == 11 == sum(s.samples for split in manifest.splits.values() for s in split.shards)
    assert sum(sum(split.class_counts.values()) for split in manifest.splits.values()) == 11


# ---------------------------------------------------------------- split folders


def image_tree(src: Path, layout: dict[str, dict[str, int]], size=(12, 10)) -> Path:
    """src/<folder>/<class>/<i>.png|jpg for ``layout``: folder -> class -> image count (every file distinct)."""
    for f, (folder, classes) in enumerate(layout.items()):
        for c, (cls, n) in enumerate(classes.items()):
            (src / folder / cls).mkdir(parents=True)
            for i in range(n):
                fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
                image = noise(size, seed=10_000 * f + 100 * c + i)
                (src / folder / cls / f"{i}.{ext}").write_bytes(
                    encode(image, fmt, **({"quality": 95} if ext == "jpg" else {}))
                )
    return src


@pytest.mark.parametrize(
    "names, expected",
    [
        (["cat", "dog"], None),
        (["bus", "car", "train"], None),  # a class called train: vehicles have trains
        (["cat", "test"], None),
        (["train"], {"train": "train"}),
        (["train", "test"], {"train": "train", "test": "test"}),
        (["test", "train", "val"], {"train": "train", "val": "val", "test": "test"}),
        (["Train", "Valid"], {"train": "Train", "val": "Valid"}),
        (["TRAIN", "validation", "Test"], {"train": "TRAIN", "val": "validation", "test": "Test"}),
    ],
)
def test_split_folders_are_read_without_regard_to_case(names, expected):
    from shards.splits import split_folders

    assert split_folders(names) == expected


@pytest.mark.parametrize(
    "names, message",
    [
        (["val", "test"], "has test/, val/ but no train/"),
        (["test"], "has test/ but no train/"),
        (["training", "testing"], "has testing/, training/, but testing/, training/ are not split names"),
        (["train", "testing"], "has testing/, train/, but testing/ is not a split name"),
        (["train", "val", "valid"], "has 2 val folders (val/, valid/), not one"),
        (["train", "test", "cat"], "has split folders (test/, train/) beside other folders (cat/)"),
    ],
)
def test_split_like_folders_in_another_mix_are_refused_saying_what_was_found(names, message):
    from shards.splits import LayoutError, split_folders

    with pytest.raises(LayoutError) as e:
        split_folders(names)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "folders, message",
    [
        (("val", "test"), "has test/, val/ but no train/"),
        (("training", "testing"), "are not split names"),
        (("train", "val", "validation"), "has 2 val folders"),
        (("train", "val", "cat"), "beside other folders (cat/)"),
    ],
)
def test_make_shards_refuses_a_split_mix_in_one_line_and_writes_nothing(tmp_path, capsys, folders, message):
    from launch import make_shards

    src = image_tree(tmp_path / "src", {f: {"a": 2, "b": 2} for f in folders})
    code = make_shards.main([str(src), str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert "lay it out as SRC/train/<class>/ with SRC/val/<class>/ (or valid/, validation/)" in err
    assert not (tmp_path / "out").exists()


def test_a_split_folder_without_class_folders_is_one_line(tmp_path, capsys):
    from launch import make_shards

    src = image_tree(tmp_path / "src", {"train": {"a": 2, "b": 2}})
    (src / "test").mkdir()
    (src / "test" / "0.png").write_bytes((src / "train" / "a" / "1.png").read_bytes())
    assert make_shards.main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 2
    assert (
        f"SRC {src}/test holds no class folders — put its images in {src}/test/<class name>/" in capsys.readouterr().err
    )


def test_a_test_folder_is_a_third_split_and_val_is_carved_from_train(tmp_path):
    from launch import make_shards

    src = image_tree(tmp_path / "src", {"train": {"a": 10, "b": 10}, "Test": {"a": 3, "b": 2}})
    out = tmp_path / "out"
    assert make_shards.main([str(src), str(out), "--workers", "1", "--min-shards", "2", "--val-fraction", "0.2"]) == 0
    m = Manifest.load(out)
    assert list(m.splits) == ["train", "val", "test"] and m.options["split_folders"] == {
        "train": "train",
        "test": "Test",
    }
    assert m.splits["val"].class_counts == {"a": 2, "b": 2} and m.splits["train"].class_counts == {"a": 8, "b": 8}
    assert m.splits["test"].class_counts == {"a": 3, "b": 2} and len(m.splits["test"].shards) == 2
    summary = (out / "summary.txt").read_text()
    assert "test: 5 samples in 2 shards" in summary and "per class train/val/test: a 8/2/3, b 8/2/2" in summary
    assert "splits: train/ -> train and val (val carved from it: --val-fraction 0.2" in summary
    assert "Test/ -> test" in summary


def test_the_cap_spares_test_and_a_class_only_in_test_is_refused_as_one_only_in_val(tmp_path, capsys):
    from launch import make_shards

    src = image_tree(tmp_path / "src", {"train": {"a": 6, "b": 6}, "test": {"a": 4, "b": 4}})
    out = tmp_path / "out"
    assert make_shards.main([str(src), str(out), "--workers", "1", "--max-per-class", "3"]) == 0
    m = Manifest.load(out)
    assert m.splits["test"].class_counts == {"a": 4, "b": 4}
    assert sum(m.splits[s].class_counts["a"] for s in ("train", "val")) == 3
    image_tree(src / "test", {"c": {"x": 1}})  # test/c/x/0.jpg: a class the training folder lacks
    assert make_shards.main([str(src), str(tmp_path / "out2"), "--workers", "1"]) == 2
    assert "class 'c': training folder has no valid image" in capsys.readouterr().err
    args = [str(src), str(tmp_path / "out3"), "--workers", "1", "--skip-empty-classes"]
    assert make_shards.main(args) == 0 and Manifest.load(tmp_path / "out3").classes == ["a", "b"]


def test_identical_files_in_test_and_train_are_a_leakage_warning(tmp_path):
    from launch import make_shards

    src = image_tree(tmp_path / "src", {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}})
    (src / "test" / "b" / "copy.png").write_bytes((src / "train" / "b" / "1.png").read_bytes())
    (src / "val" / "a" / "copy.png").write_bytes((src / "train" / "a" / "3.png").read_bytes())
    out = tmp_path / "out"
    assert make_shards.main([str(src), str(out), "--workers", "1"]) == 0
    summary = (out / "summary.txt").read_text()
    assert "warning: identical images in two splits (1 group test with train/val, 1 group train with val)" in summary
    assert "splits: train/ -> train, val/ -> val, test/ -> test" in summary
    groups = {tuple(d["splits"]) for d in Manifest.load(out).duplicates}
    assert groups == {("train", "test"), ("train", "val")}
