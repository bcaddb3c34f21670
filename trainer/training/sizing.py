"""Settings from the data: `data.image_size: auto` and `model.small_inputs: auto` settled from the
shards' manifest before the run starts, so config.yaml, the checkpoints and wandb hold numbers.

Every rank settles them from the same manifest, so they agree without a collective.
"""

from __future__ import annotations

from dataclasses import replace

from shards.manifest import MAKE_CMD, Manifest
from trainer.training.config import AUTO, Config, ConfigError, eval_size, validate

AUTO_MIN, AUTO_MAX = 16, 384  # pixels: below 16 the dense blocks see almost nothing; above 384 a photo
# folder would train at its camera's resolution, many times the cost of 224 for little gain
FINE_STEP = 8  # for images too small for data.size_step: 28 px stays near 28, not 32 or 0
SMALL_STEM_BELOW = 96  # the ImageNet stem divides by 4 before the first block: at 80 px the last block
# would see 2x2 maps, so smaller images keep their resolution through the stem (CIFAR-style)
FAR_OFF = 2.0  # an explicit size under half or over twice the images' median shorter side gets a note


def auto_image_size(short_median: int, step: int) -> int:
    """The median shorter side rounded to the nearest multiple of data.size_step (ties up), a size
    the progressive-resizing steps and the model's strides divide; to a multiple of 8 instead when
    that is more than 25% off (an 8 px image is not trained at 32); within [AUTO_MIN, AUTO_MAX]."""
    size = int(short_median / step + 0.5) * step
    if abs(size - short_median) > 0.25 * short_median:
        size = int(short_median / FINE_STEP + 0.5) * FINE_STEP
    return min(max(size, AUTO_MIN), AUTO_MAX)


def settle_sizes(config: Config, manifest: Manifest) -> tuple[Config, list[str]]:
    """The config with its `auto` sizes settled, and the start-up lines that say where each came from."""
    data, model = config.data, config.model
    seen = manifest.image_sizes
    median = f"median {seen['median_width']}x{seen['median_height']}" if seen else ""
    notes = []
    if data.image_size == AUTO:
        if not seen:
            raise ConfigError(
                f"data.image_size=auto needs the image sizes that make_shards records, and {data.shards} was made "
                f"before it did — re-run `{MAKE_CMD}`, or set data.image_size (and model.small_inputs) to numbers"
            )
        data = replace(data, image_size=auto_image_size(seen["short_median"], data.size_step))
        size_from = f"auto from the shards: {median}"
        if seen["short_median"] > AUTO_MAX:
            notes.append(
                f"note: the images' median shorter side is {seen['short_median']} px; auto trains at most at "
                f"{AUTO_MAX} — set data.image_size for more detail at more cost"
            )
    else:
        size_from = "config" + (f"; the shards' images: {median}" if seen else "")
        if seen and not 1 / FAR_OFF <= data.image_size / seen["short_median"] <= FAR_OFF:
            notes.append(
                f"note: data.image_size={data.image_size} is far from the images' median shorter side "
                f"({seen['short_median']} px) — data.image_size=auto trains near their size"
            )
    small, stem_from = model.small_inputs, "config"
    if small == AUTO:
        small = data.image_size < SMALL_STEM_BELOW
        stem_from = f"auto: {'below' if small else 'at least'} {SMALL_STEM_BELOW} px"
    settled = replace(config, data=data, model=replace(model, small_inputs=small))
    validate(settled)  # what depends on the size (the ramp's min_size) is checked with the number
    stem = "small stem" if small else "ImageNet stem"
    line = f"image size {data.image_size} train, {eval_size(data)} val ({size_from}); {stem} ({stem_from})"
    return settled, [line, *notes]
