"""manifest.json is checked like a config when it is read: names stay inside the dataset, counts
add up (with each other and with the sample index), and its size is bounded before it is parsed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shards.manifest import MAX_BYTES, Manifest
from shards.source import CacheOptions, ShardSource
from tests.conftest import http_server
from toolbox.errors import DataError
from trainer.training.data import open_shards, split_reader


@pytest.fixture
def dataset(digits_shards, tmp_path) -> Path:
    """A copy of the digits shards whose manifest a test may change."""
    out = tmp_path / "shards"
    shutil.copytree(digits_shards, out, ignore=shutil.ignore_patterns("images"))
    return out


def edit(out: Path, change) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def refused(out: Path) -> str:
    with pytest.raises(DataError) as caught:
        Manifest.load(out)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"{out / 'manifest.json'} is not a valid manifest (")
    assert line.endswith("— re-run `python -m launch.make_shards SRC OUT`")
    return line


def test_make_shards_output_is_valid(digits_shards):
    manifest = Manifest.load(digits_shards)
    assert manifest.splits["val"].num_samples == 179 and manifest.prefix == ""


@pytest.mark.parametrize("prefix", ["/etc/", "/", "../", "build-1/../../", "s3://elsewhere/", "build-1"])
def test_a_prefix_outside_the_dataset_is_refused(dataset, prefix):
    edit(dataset, lambda m: m.update(prefix=prefix))
    assert "prefix" in refused(dataset)


def test_a_build_prefix_is_accepted(dataset):
    edit(dataset, lambda m: m.update(prefix="build-0123abcd/"))
    assert Manifest.load(dataset).shard_paths("val")[0] == dataset / "build-0123abcd" / "val" / "val-000000.tar"


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/x.tar", "s3://bucket/x.tar", "..", ""])
def test_a_shard_name_outside_its_folder_is_refused(dataset, name):
    edit(dataset, lambda m: m["splits"]["val"]["shards"][3].update(name=name))
    assert "splits.val.shards[3].name" in refused(dataset)


def test_a_split_name_or_index_name_outside_the_dataset_is_refused(dataset):
    edit(dataset, lambda m: m["splits"].update({"../x": m["splits"].pop("val")}))
    assert "splits has '../x'" in refused(dataset)


def test_a_sha256_that_is_no_hash_is_refused(dataset):  # it names the file in the node cache
    edit(dataset, lambda m: m["splits"]["val"]["index"].update(sha256="../../../home/x"))
    assert "splits.val.index.sha256" in refused(dataset)


def test_a_negative_count_is_refused_even_when_the_totals_agree(dataset):
    def negative(m):  # the case: 179 val samples, 79 of them evaluated with exit 0
        val = m["splits"]["val"]
        val["shards"][0]["samples"] -= 100
        val["num_samples"] -= 100
        val["index"]["samples"] -= 100

    edit(dataset, negative)
    assert "splits.val.shards[0].samples is -77, not a count" in refused(dataset)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda val: val.update(num_samples=100), "splits.val.num_samples is 100 but its shards hold 179"),
        (lambda val: val["shards"][2].update(samples=5), "splits.val.num_samples is 179 but its shards hold"),
        (lambda val: val["class_counts"].update({"3": 1}), "splits.val.class_counts"),
        (lambda val: val["class_counts"].update({"cat": 0}), "splits.val.class_counts"),
        (lambda val: val["index"].update(samples=100), "splits.val.index is 100 samples"),
        (lambda val: val["index"].update(bytes=16), "splits.val.index is 179 samples in 16 bytes"),
        (lambda val: val["shards"][0].update(bytes=-1), "splits.val.shards[0].bytes is -1"),
        (lambda val: val["shards"][0].update(samples="22"), "splits.val.shards[0].samples is '22'"),
        (lambda val: val["shards"][0].update(samples=22.5), "splits.val.shards[0].samples is 22.5"),
    ],
)
def test_counts_that_disagree_are_refused(dataset, change, field):
    edit(dataset, lambda m: change(m["splits"]["val"]))
    assert field in refused(dataset)


def test_an_index_file_that_disagrees_with_the_counts_is_refused_before_any_read(dataset):
    shutil.copy(dataset / "train" / "index.npy", dataset / "val" / "index.npy")  # 1,618 records, not 179
    with pytest.raises(
        DataError, match=r"val/index\.npy cannot be used \(it holds 1618 records, the manifest says 179\)"
    ):
        split_reader(open_shards(str(dataset)), "val")


def test_a_huge_value_is_not_repeated_in_the_message(dataset):
    edit(dataset, lambda m: m.update(mean=["x" * 10_000_000, 0, 0]))
    line = refused(dataset)
    assert "mean is" in line and len(line) < 400


def test_an_oversized_local_manifest_is_refused_without_parsing(tmp_path):
    with open(tmp_path / "manifest.json", "wb") as f:
        f.write(b'{"classes": ["')
        f.truncate(MAX_BYTES + 1)  # sparse: a 64 MB file that costs no disk
    with pytest.raises(DataError, match=r"manifest\.json is larger than a manifest can be \(64 MB\) — .*re-run"):
        Manifest.load(tmp_path)


def test_an_oversized_remote_manifest_is_refused_after_reading_at_most_the_limit(tmp_path):
    huge = "pipe:head -c 300000000 /dev/zero #{path}"  # 300 MB for a manifest.json
    with pytest.raises(DataError, match=r"^pipe:head \.\.\. is larger than a manifest can be \(64 MB\) — "):
        ShardSource(huge, CacheOptions(dir=str(tmp_path / "cache"), allow_pipe=True))


def test_an_oversized_manifest_over_http_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "manifest.json", "wb") as f:
        f.truncate(MAX_BYTES + (20 << 20))
    with http_server(tmp_path / "data") as url:
        with pytest.raises(DataError, match=r"manifest\.json is larger than a manifest can be"):
            ShardSource(url, CacheOptions(dir=str(tmp_path / "cache")))


def test_a_remote_manifest_is_validated_too(digits_shards, tmp_path):
    shutil.copytree(digits_shards, tmp_path / "data", ignore=shutil.ignore_patterns("images"))
    edit(tmp_path / "data", lambda m: m.update(prefix="/etc/"))
    with http_server(tmp_path / "data") as url:
        with pytest.raises(DataError, match=r"/manifest\.json is not a valid manifest \(prefix '/etc/'"):
            ShardSource(url, CacheOptions(dir=str(tmp_path / "cache")))
        (tmp_path / "data" / "manifest.json").unlink()
        with pytest.raises(DataError, match="has no manifest.json"):  # the diagnosis of a missing one still works
            ShardSource(url, CacheOptions(dir=str(tmp_path / "cache"), retries=0))


def test_a_zero_std_is_read_but_a_negative_or_nan_one_is_refused(dataset):
    edit(dataset, lambda m: m.update(std=[0.3, 0.3, 0.0]))  # make_shards wrote this before MIN_STD
    assert Manifest.load(dataset).std == [0.3, 0.3, 0.0]
    for std in ([0.3, 0.3, -0.1], [0.3, 0.3, float("nan")]):
        edit(dataset, lambda m, std=std: m.update(std=std))
        assert "std is" in refused(dataset)


def test_a_shard_of_another_size_is_refused_before_any_read(dataset):
    shard = sorted((dataset / "val").glob("*.tar"))[0]
    with open(shard, "ab") as f:
        f.write(b"\0" * 512)  # a tar still, one block longer: not the file the manifest describes
    with pytest.raises(
        DataError, match=rf"shard .*{shard.name} is [\d,]+ bytes but the manifest says [\d,]+ \(truncated or replaced\)"
    ):
        split_reader(open_shards(str(dataset)), "val")


def test_an_index_record_outside_its_shard_is_refused_not_allocated(dataset):
    last = Manifest.load(dataset).splits["val"].shards[0].samples - 1  # no record after it in its shard
    index = np.load(dataset / "val" / "index.npy")
    index[last]["length"] = 4_000_000_000  # would have read (and allocated) 4 GB
    np.save(dataset / "val" / "index.npy", index)
    reader = split_reader(open_shards(str(dataset)), "val")
    with pytest.raises(DataError, match=r"places a sample at bytes [\d,]+\+4,000,000,000, outside the shard's"):
        reader.read(last)
    assert reader.read(0)["__key__"]


def test_a_shard_replaced_by_another_of_the_same_size_is_found_by_data_verify_sha256(dataset):
    first = sorted((dataset / "val").glob("*.tar"))[0]
    data = bytearray(first.read_bytes())
    data[-600] ^= 1  # one flipped bit in the tar's padding: the same size, and every sample still reads
    first.write_bytes(bytes(data))
    split_reader(open_shards(str(dataset)), "val")  # the size check (the default) cannot tell
    with pytest.raises(DataError, match=rf"shard .*{first.name} does not match the manifest's sha256"):
        split_reader(open_shards(str(dataset)), "val", verify="sha256")


def test_a_repeated_index_record_is_refused_before_any_read(dataset):
    """A record duplicated over the next one: that sample would be read twice and the other never,
    and evaluation would count a class's support wrong without a word."""
    index = np.load(dataset / "val" / "index.npy")
    index[5] = index[4]
    np.save(dataset / "val" / "index.npy", index)
    with pytest.raises(DataError, match=r"val/index\.npy cannot be used \(record 5 overlaps the one before it"):
        split_reader(open_shards(str(dataset)), "val")


def test_the_train_images_sizes_are_recorded_for_auto_sizing(digits_shards, dataset):
    assert Manifest.load(digits_shards).image_sizes == {
        "median_width": 8,
        "median_height": 8,
        "short_p10": 8,
        "short_median": 8,
        "short_p90": 8,
    }
    edit(dataset, lambda m: m.pop("image_sizes"))  # shards made before the sizes were recorded
    assert Manifest.load(dataset).image_sizes == {}
    edit(dataset, lambda m: m.update(image_sizes={"short_median": -3}))
    assert "image_sizes.short_median" in refused(dataset)


def test_recorded_sizes_are_those_written_after_resize_short():
    from launch.report import image_sizes

    width, height = np.array([4000, 300, 200]), np.array([3000, 400, 100])
    assert image_sizes(width, height, None)["short_median"] == 300
    resized = image_sizes(width, height, 256)  # 4000x3000 -> 341x256, 300x400 -> 256x341, 200x100 kept
    assert (resized["median_width"], resized["median_height"], resized["short_median"]) == (256, 256, 256)
    assert image_sizes(np.array([]), np.array([]), None) == {}
