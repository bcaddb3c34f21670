"""data.decode=device computes what the workers compute: the same crops and flips from the same
seeds, on images decoded by torchvision instead of PIL. Run here on the CPU device; on a GPU the
same code decodes with nvJPEG."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from shards.format import EXIF_ORIENTATION, decode_rgb, finish_rgb, open_image
from shards.reader import SplitReader
from shards.source import SplitFiles
from toolbox.errors import DataError
from trainer.training.config import DataConfig
from trainer.training.data import ShardDataset, device_ready
from trainer.training.samples import EncodedBatch, collate
from trainer.training.transforms import DeviceDecode, TrainPreset

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
SEEDS = [11, 12, 13, 14, 15, 16]


def smooth_image(width: int, height: int, shift: int) -> Image.Image:
    """Gradients and a square: resampling differences stay small, crops stay recognisable."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y + shift) % 256], -1).astype(np.uint8)
    rgb[height // 4 : height // 2, width // 3 : width // 2] = (250, 30, 30)
    return Image.fromarray(rgb)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(smooth_image(90, 70, 3), "JPEG", quality=95, exif=exif)


# (field, bytes, decoded on the device)
SAMPLES = [
    ("jpg", encode(smooth_image(96, 72, 0), "JPEG", quality=95), True),
    ("jpg", encode(smooth_image(80, 100, 1).convert("L"), "JPEG", quality=95), True),
    ("jpg", rotated_jpeg(), False),
    ("jpg", encode(smooth_image(64, 64, 2).convert("CMYK"), "JPEG", quality=95), False),
    ("png", encode(smooth_image(70, 50, 4), "PNG"), False),
    ("webp", encode(smooth_image(60, 80, 5), "WEBP", lossless=True), False),
]


def write_shard(path, images: list[tuple[str, bytes]]) -> SplitReader:
    with tarfile.open(path, "w") as tar:
        for i, (field, data) in enumerate(images):
            for ext, payload in ((field, data), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return SplitReader(SplitFiles.from_paths([path], [len(images)]))


def data_config(**overrides) -> DataConfig:
    return DataConfig(**{"shards": "unused", "image_size": 32, "scale_min": 0.3, **overrides})


def on_device(index: SplitReader, items: list[tuple[int, int, int | None]], skip_bad: bool = False):
    dataset = ShardDataset(index, None, skip_bad)
    batch, labels, _, bad = collate([dataset[item] for item in items])
    decode = DeviceDecode(TrainPreset(data_config(), MEAN, STD).augment, torch.device("cpu"), skip_bad)
    images, labels, dropped = decode(batch, labels)
    return images, labels, bad + dropped


def test_jpegs_go_to_the_device_encoded_and_the_rest_decoded():
    for field, data, encoded in SAMPLES:
        ready = device_ready(data)
        assert ready.dtype == torch.uint8
        assert ready.dim() == (1 if encoded else 3), field
        if not encoded:
            assert ready.shape[0] == 3


@pytest.mark.parametrize(
    "config, size",
    [
        ({}, None),
        ({"color_jitter": 0.4, "rotation": 10.0}, None),
        ({"auto_augment": "trivialaugment"}, None),
        ({"jpeg_draft": False}, 16),
    ],
)
def test_device_decode_gives_the_workers_crops_from_the_same_seeds(tmp_path, config, size):
    """size: an epoch's crop side under progressive resizing, below data.image_size (32); jpeg_draft off
    there, as the draft decode at 1/2 scale would differ from the full decode by more than the resampler."""
    index = write_shard(tmp_path / "s.tar", [(field, data) for field, data, _ in SAMPLES])
    items = [(i, seed, size) for i, seed in zip(range(len(SAMPLES)), SEEDS)]
    workers = ShardDataset(index, TrainPreset(data_config(**config), MEAN, STD))
    expected = torch.stack([workers[item][0] for item in items])
    labels_expected = torch.tensor([workers[item][1] for item in items])

    dataset = ShardDataset(index, None)
    batch, labels, _, _ = collate([dataset[item] for item in items])
    decode = DeviceDecode(TrainPreset(data_config(**config), MEAN, STD).augment, torch.device("cpu"), False)
    images, labels, dropped = decode(batch, labels)

    assert dropped == 0 and torch.equal(labels, labels_expected)
    assert images.dtype == torch.uint8 and images.shape == expected.shape == (len(SAMPLES), 3, size or 32, size or 32)
    # Same decode (libjpeg-turbo both), resampling by torch instead of PIL: a few levels apart.
    error = (images.float() - expected.float()).abs().mean((1, 2, 3))
    print(f"mean abs difference per image: {error.tolist()}")
    assert error.max() < 2, error
    # Other seeds give other crops: far more apart, so the test above does see the crop.
    shuffled = EncodedBatch(batch.images, [s + 100 for s in batch.seeds], batch.names, batch.size)
    other, _, _ = decode(shuffled, labels)
    assert (other.float() - expected.float()).abs().mean((1, 2, 3)).min() > 3 * error.max()


@pytest.mark.parametrize("chunk", [32, 2])
def test_unreadable_jpeg_is_dropped_with_its_label_or_named(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(DeviceDecode, "CHUNK", chunk)  # 2: the bad file sits in the second of two decode calls
    good = SAMPLES[0][1]
    truncated = good[: len(good) // 2]  # the header parses; decoding fails
    index = write_shard(tmp_path / "s.tar", [("jpg", good), ("png", SAMPLES[4][1]), ("jpg", truncated), ("jpg", good)])
    items = [(0, 1, None), (1, 2, None), (2, 3, None), (3, 4, None)]

    images, labels, bad = on_device(index, items, skip_bad=True)
    assert bad == 1 and images.shape[0] == 3 and labels.tolist() == [0, 1, 0]

    with pytest.raises(DataError, match=r"sample s002 in shard .*s\.tar cannot be read .*data\.skip_bad_samples=true"):
        on_device(index, items, skip_bad=False)


def test_not_an_image_is_caught_in_the_worker(tmp_path):
    index = write_shard(tmp_path / "s.tar", [("jpg", b"not a jpeg at all"), ("jpg", SAMPLES[0][1])])
    images, labels, bad = on_device(index, [(0, 1, None), (1, 2, None)], skip_bad=True)
    assert bad == 1 and images.shape[0] == 1 and labels.tolist() == [1]
    with pytest.raises(DataError, match="s000"):
        ShardDataset(index, None)[(0, 1, None)]


def big_photo(width: int, height: int, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(smooth_image(width, height, 7), "JPEG", quality=92, exif=exif)


@pytest.mark.parametrize("orientation", [1, 6])
def test_jpeg_draft_decodes_big_photos_smaller_and_crops_the_same_region(orientation):
    """A 1600x1200 photo cropped to 32 px: decoded at up to 1/8 scale, yet the same region as a
    full decode (DCT scaling instead of an antialiased resize: a few levels apart)."""
    data = big_photo(1600, 1200, orientation)
    full, draft = (TrainPreset(data_config(jpeg_draft=on, scale_min=0.05), MEAN, STD) for on in (False, True))

    def crops(preset: TrainPreset, seeds: list[int]) -> torch.Tensor:
        out = []
        for seed in seeds:
            torch.manual_seed(seed)
            out.append(preset(preset.decode(data)).float())
        return torch.stack(out)

    expected, got = crops(full, SEEDS), crops(draft, SEEDS)
    error = (got - expected).abs().mean((1, 2, 3))
    print(f"mean abs difference per crop: {error.tolist()}")
    assert got.shape == expected.shape == (len(SEEDS), 3, 32, 32)
    assert error.max() < 6
    other = (crops(draft, [s + 100 for s in SEEDS]) - expected).abs().mean((1, 2, 3))
    assert other.min() > 2 * error.max()  # another seed's crop is much further off
    # The decoder really runs smaller: libjpeg's 1/8 scale (upright, so turned when rotated).
    assert finish_rgb(open_image(data, lambda w, h: (w // 8, h // 8))).size == (
        (200, 150) if orientation == 1 else (150, 200)
    )


def test_jpeg_draft_changes_nothing_when_the_crop_needs_full_resolution():
    data = SAMPLES[0][1]  # 96 x 72: a 64 px output never allows a smaller decode
    full, draft = (TrainPreset(data_config(jpeg_draft=on, image_size=64), MEAN, STD) for on in (False, True))
    for seed in SEEDS:
        torch.manual_seed(seed)
        expected = full(full.decode(data))
        torch.manual_seed(seed)
        assert torch.equal(draft(draft.decode(data)), expected)


def test_workers_augment_like_the_plain_pil_pipeline():
    """The workers' fast paths (torchvision's decoder and uint8 resampler for plain JPEGs, JPEG
    draft for big ones) against torchvision's reference recipe on PIL: same crops, same flips."""
    from torchvision.transforms import v2

    preset = TrainPreset(data_config(), MEAN, STD)
    reference = v2.Compose(
        [v2.RandomResizedCrop(32, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()]
    )
    for (field, data, _), seed in zip([*SAMPLES, ("jpg", big_photo(1600, 1200), True)], SEEDS + [17]):
        torch.manual_seed(seed)
        fast = preset(preset.decode(data))
        torch.manual_seed(seed)
        plain = reference(decode_rgb(data))
        assert (fast.float() - plain.float()).abs().mean() < 3, field


@pytest.mark.parametrize("decode_on_device", [False, True])
def test_a_label_outside_the_classes_is_a_bad_sample_not_a_silent_one(tmp_path, decode_on_device):
    index = write_shard(tmp_path / "s.tar", [(field, data) for field, data, _ in SAMPLES[:3]])  # labels 0, 1, 2
    preset = None if decode_on_device else TrainPreset(data_config(), MEAN, STD)
    dataset = ShardDataset(index, preset, num_classes=2)
    size = 32 if decode_on_device else None
    dataset[(1, 0, size)]  # label 1 of 2: fine
    with pytest.raises(
        DataError, match=r"sample s002 in shard .* cannot be read \(ValueError: label 2 is not one of the 2 classes\)"
    ):
        dataset[(2, 0, size)]
    assert ShardDataset(index, preset, skip_bad=True, num_classes=2)[(2, 0, size)] is None
