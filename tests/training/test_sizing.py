"""data.image_size: auto and model.small_inputs: auto, settled from the manifest's image sizes."""

import pytest

from shards.manifest import Manifest, SplitInfo
from trainer.training.config import ConfigError, load_config
from trainer.training.sizing import AUTO_MAX, auto_image_size, settle_sizes


def manifest(short: int | None, width: int | None = None) -> Manifest:
    sizes = {}
    if short is not None:
        width = width or short
        sizes = {"median_width": width, "median_height": short, "short_p10": short, "short_median": short}
        sizes["short_p90"] = short
    return Manifest(["a", "b"], {"train": SplitInfo(0, {}, [])}, [0.5] * 3, [0.2] * 3, image_sizes=sizes)


def config(*overrides: str):
    return load_config("configs/own-images.yaml", ["data.shards=x", *overrides])


@pytest.mark.parametrize(
    "median, step, size",
    [(8, 32, 16), (28, 32, 32), (28, 16, 32), (48, 32, 48), (80, 16, 80), (80, 32, 96), (100, 32, 96), (224, 32, 224)]
    + [(250, 32, 256), (3000, 32, AUTO_MAX)],
)
def test_auto_size_is_the_median_rounded_within_bounds(median, step, size):
    assert auto_image_size(median, step) == size
    assert size % 8 == 0


def test_auto_settles_size_and_stem_and_says_where_they_came_from():
    settled, lines = settle_sizes(config(), manifest(80, width=107))
    assert (settled.data.image_size, settled.model.small_inputs) == (80, True)
    assert lines == [
        "image size 80 train, 80 val (auto from the shards: median 107x80); small stem (auto: below 96 px)"
    ]
    settled, lines = settle_sizes(config(), manifest(500))
    assert (settled.data.image_size, settled.model.small_inputs) == (AUTO_MAX, False)
    assert "ImageNet stem (auto: at least 96 px)" in lines[0]
    assert lines[1].startswith("note: the images' median shorter side is 500 px; auto trains at most at 384")


def test_an_explicit_size_far_from_the_images_gets_a_note():
    _, lines = settle_sizes(config("data.image_size=16"), manifest(80))
    assert "image size 16 train, 16 val (config; the shards' images: median 80x80)" in lines[0]
    assert lines[1].startswith("note: data.image_size=16 is far from the images' median shorter side (80 px)")
    assert len(settle_sizes(config("data.image_size=64", "data.val_size=72"), manifest(80))[1]) == 1
    _, lines = settle_sizes(config("data.image_size=224", "model.small_inputs=false"), manifest(None))
    assert lines == ["image size 224 train, 224 val (config); ImageNet stem (config)"]


def test_auto_needs_shards_that_recorded_their_sizes():
    with pytest.raises(ConfigError, match="made before it did — re-run `python -m launch.make_shards SRC OUT`"):
        settle_sizes(config(), manifest(None))


def test_what_depends_on_the_size_is_checked_once_it_is_settled():
    with pytest.raises(ConfigError, match="data.min_size=64 is above data.image_size=32"):
        settle_sizes(config("data.min_size=64"), manifest(30))
