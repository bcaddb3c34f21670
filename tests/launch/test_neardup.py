"""Near-duplicates: the hash catches copies and tells different pictures apart at the default
threshold; the pair search equals brute force; groups join chains and identical files; and
make_shards keeps every group on one side of the split, reports conflicts, and with
--near-duplicates off or report writes the very shards it wrote before."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from launch import make_shards, neardup
from launch.neardup import DEFAULT_THRESHOLD, max_distance, near_groups, near_pairs, perceptual_hash
from launch.parallel import Workers
from shards.manifest import Manifest

REPO = Path(__file__).resolve().parents[2]


def picture(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A colour field with a few shapes: each seed a different picture."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x, y, x + int(rng.integers(15, w // 2)), y + int(rng.integers(15, h // 2)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def copies(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    return {
        "half": img.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
        "jpeg q40": Image.open(io.BytesIO(jpeg(img, 40))),
        "crop 3%": img.crop((round(w * 0.03), round(h * 0.03), round(w * 0.97), round(h * 0.97))),
        "grey": ImageOps.grayscale(img),
        "darker": ImageEnhance.Brightness(img).enhance(0.85),
    }


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def test_the_default_threshold_catches_copies_and_separates_pictures():
    originals = [picture(seed) for seed in range(12)]
    hashes = [perceptual_hash(img) for img in originals]
    for img, h in zip(originals, hashes):
        for name, copy in copies(img).items():
            assert distance(perceptual_hash(copy), h) <= DEFAULT_THRESHOLD, name
    apart = [distance(a, b) for k, a in enumerate(hashes) for b in hashes[k + 1 :]]
    assert min(apart) > DEFAULT_THRESHOLD


def brute_force(values: np.ndarray, t: int) -> set[tuple[int, int]]:
    return {
        (i, j)
        for i in range(len(values))
        for j in range(i + 1, len(values))
        if distance(int(values[i]), int(values[j])) <= t
    }


def planted(n: int, max_flips: int, seed: int = 0) -> np.ndarray:
    """n random hashes and a copy of each with up to max_flips bits flipped: pairs at every distance."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, n, dtype=np.uint64)
    flips = [
        np.uint64(sum(1 << int(b) for b in rng.choice(64, k, replace=False))) for k in rng.integers(0, max_flips, n)
    ]
    return np.unique(np.concatenate([base, base ^ np.array(flips, np.uint64)]))


@pytest.mark.parametrize("block", [1, 7, 1 << 16])
def test_all_pairs_equal_brute_force_whatever_the_block(monkeypatch, block):
    monkeypatch.setattr(neardup, "BLOCK", block)
    values = planted(40, 14)
    want = brute_force(values, 8)
    assert 0 < len(want) < len(values) ** 2 // 4  # planted pairs, not everything
    with Workers(2) as workers:
        for mapper in (map, workers.map):
            i, j = neardup.all_pairs_within(values, 8, mapper)
            assert set(zip(i.tolist(), j.tolist())) == want


@pytest.mark.parametrize("threshold", [0, 3, 8, 10, 15, 16, 20])
@pytest.mark.parametrize("candidates", [1, 5, 1 << 21])
def test_the_multi_index_finds_every_pair_once(monkeypatch, threshold, candidates):
    """Exact at every chunk radius (0..3; from 16 bits it compares all pairs), each pair once, i < j,
    however the candidates are cut into runs. Crowded buckets: 30 hashes share their top 48 bits."""
    monkeypatch.setattr(neardup, "CANDIDATES", candidates)
    crowded = (np.uint64(0xABCDEF012345) << np.uint64(16)) | np.arange(30, dtype=np.uint64)
    values = np.unique(np.concatenate([planted(60, 24, seed=threshold), crowded]))
    want = brute_force(values, threshold)
    with Workers(2) as workers:
        for mapper in (map, workers.map):
            i, j = near_pairs(values, threshold, mapper)
            found = list(zip(i.tolist(), j.tolist()))
            assert len(found) == len(set(found)) and set(found) == want


def test_groups_join_chains_and_identical_files_and_leave_the_rest():
    # 0~1 (3 bits) and 1~2 (3 bits): one chain although 0 and 2 are 6 apart; 3 is identical to 0
    # (same sha256 group), 4 is far from all; 5 is not a candidate (too small) but identical to 4.
    hashes = np.array([0b0, 0b111, 0b111111, 0b0, 2**63 + 2**40 + 2**20 + 12345, 0], np.uint64)
    same = np.array([0, 1, 2, 0, 3, 3])
    group = near_groups(hashes, np.arange(5), same, 4)
    assert group[0] == group[1] == group[2] == group[3]
    assert group[4] == group[5] != group[0]
    assert near_groups(hashes, np.arange(5), same, 2).tolist().count(group[0]) == 2  # 0 and 3 only
    assert max_distance(hashes[:3]) == 6 and max_distance(hashes[:1]) == 0


def write(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        path.write_bytes(jpeg(img.convert("RGB"), 90))
    else:
        img.save(path)


def source_with_copies(src: Path, n: int = 24) -> dict[int, list[str]]:
    """n pictures over classes a and b; of the first n // 2, a half-size PNG copy in the other
    class and a q40 re-encoded copy in the same one -> picture -> its files' paths."""
    groups = {}
    for k in range(n):
        own, other = ("a", "b") if k % 2 else ("b", "a")
        img = picture(k)
        files = {f"{own}/{k}.jpg": img}
        if k < n // 2:
            files[f"{other}/{k}_half.png"] = copies(img)["half"]
            files[f"{own}/{k}_q40.jpg"] = copies(img)["jpeg q40"]
        for rel, image in files.items():
            write(src / rel, image)
        groups[k] = sorted(files)
    return groups


def run(src: Path, out: Path, *extra: str) -> Manifest:
    assert make_shards.main([str(src), str(out), "--workers", "1", "--val-fraction", "0.5", *extra]) == 0
    return Manifest.load(out)


def written_splits(out: Path, m: Manifest) -> dict[str, str]:
    """path -> the split whose shards hold it (read from the tars)."""
    import tarfile

    where = {}
    for split in m.splits:
        for shard in m.shard_paths(split):
            with tarfile.open(shard) as tf:
                for member in tf.getmembers():
                    if member.name.endswith(".json"):
                        where[json.loads(tf.extractfile(member).read())["path"]] = split
    return where


def test_make_shards_groups_copies_across_classes_on_one_side(tmp_path, capsys):
    groups = source_with_copies(tmp_path / "src")
    m = run(tmp_path / "src", tmp_path / "out")
    near = [d for d in m.duplicates if d.get("kind") == "near"]
    assert sorted(d["paths"] for d in near) == sorted(paths for paths in groups.values() if len(paths) > 1)
    where = written_splits(tmp_path / "out", m)
    for d in near:
        assert d["cross_class"] and not d["crosses_splits"] and d["classes"] == ["a", "b"]
        assert len({where[p] for p in d["paths"]}) == 1 and 0 <= d["distance"] <= DEFAULT_THRESHOLD
    assert m.options["near_duplicates"] == "group" and m.options["near_threshold"] == DEFAULT_THRESHOLD
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "near-duplicates: 12 groups" in summary and "12 across classes (label conflict" in summary
    assert "would have straddled it" in summary and "warning: near-duplicate" not in summary


def test_report_mode_finds_the_same_groups_but_leaves_the_split_as_off_does(tmp_path):
    source_with_copies(tmp_path / "src")
    report = run(tmp_path / "src", tmp_path / "report", "--near-duplicates", "report")
    off = run(tmp_path / "src", tmp_path / "off", "--near-duplicates", "off")
    grouped = run(tmp_path / "src", tmp_path / "group")
    assert [d for d in off.duplicates if d.get("kind") == "near"] == []
    assert [d["paths"] for d in report.duplicates] == [d["paths"] for d in grouped.duplicates]
    assert [s.shards for s in report.splits.values()] == [s.shards for s in off.splits.values()]  # same bytes
    leaks = [d for d in report.duplicates if d["crosses_splits"]]
    assert leaks and all(d.get("kind") == "near" for d in leaks)
    summary = (tmp_path / "report" / "summary.txt").read_text()
    assert "warning: near-duplicate images in two splits" in summary and "--near-duplicates group" in summary


def test_near_duplicates_across_given_splits_are_a_leakage_warning(tmp_path):
    src = tmp_path / "src"
    for k in range(6):
        for split in ("train", "val"):
            write(src / split / "ab"[k % 2] / f"{k}.jpg", picture(100 * k + len(split)))
    write(src / "val" / "a" / "copy.png", copies(picture(5))["half"])  # of train/a/0.jpg (seed 100 * 0 + 5)
    m = run(src, tmp_path / "out")
    near = [d for d in m.duplicates if d.get("kind") == "near"]
    assert [(d["paths"], d["splits"]) for d in near] == [(["train/a/0.jpg", "val/a/copy.png"], ["train", "val"])]
    assert near[0]["crosses_splits"] and not near[0]["cross_class"]
    assert (
        "warning: near-duplicate images in two splits (1 group train with val)"
        in (tmp_path / "out" / "summary.txt").read_text()
    )


@pytest.mark.parametrize("min_side", [neardup.MIN_SIDE, 16])
def test_small_images_are_not_compared(tmp_path, monkeypatch, min_side):
    monkeypatch.setattr(neardup, "MIN_SIDE", min_side)
    src = tmp_path / "src"
    for k in range(4):
        write(src / "ab"[k % 2] / f"{k}.png", picture(k).resize((24, 20)))
        write(src / "ab"[k % 2] / f"{k}_copy.png", picture(k).resize((20, 16)))
    m = run(src, tmp_path / "out")
    near = [d for d in m.duplicates if d.get("kind") == "near"]
    assert len(near) == (0 if min_side > 20 else 4)  # the copies are found once compared
    if not near:
        assert "near-duplicates: none" in (tmp_path / "out" / "summary.txt").read_text()


@pytest.mark.parametrize("value", ["-1", "33", "ten"])
def test_threshold_out_of_range_is_one_line(tmp_path, capsys, value):
    assert make_shards.main([str(tmp_path), str(tmp_path / "out"), "--near-threshold", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--near-threshold" in err and "0 to 32" in err


@pytest.mark.e2e
def test_e2e_copies_in_two_classes_and_across_the_split_never_straddle(tmp_path):
    """The real command, two workers (the hash in the scan's pool, the pair search spread over it)."""
    groups = source_with_copies(tmp_path / "src")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "launch.make_shards", str(tmp_path / "src"), str(out), "--workers", "2"]
    res = subprocess.run([*cmd, "--val-fraction", "0.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    m = Manifest.load(out)
    where = written_splits(out, m)
    near = {tuple(d["paths"]): d for d in m.duplicates if d.get("kind") == "near"}
    assert set(near) == {tuple(paths) for paths in groups.values() if len(paths) > 1}
    for paths, d in near.items():
        assert d["cross_class"] and len({where[p] for p in paths}) == 1
    assert "across classes (label conflict: check them)" in res.stdout
