"""Train and eval presets (torchvision references' habit: small classes, built from the config)."""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from shards.format import decode_rgb, finish_rgb, open_image, plain_jpeg
from shards.manifest import MIN_STD
from toolbox.errors import DataError
from trainer.training.config import DataConfig
from trainer.training.samples import EncodedBatch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(data: DataConfig, manifest_mean: list[float], manifest_std: list[float]) -> tuple[list, list]:
    if data.normalize == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return list(manifest_mean), [max(s, MIN_STD) for s in manifest_std]


class TrainPreset:
    """Random resized crop, flip and the optional augmentations, then a uint8 CHW tensor.

    In the loader workers `decode` reads the bytes and takes the random crop, `__call__` does
    the rest. With data.jpeg_draft a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that
    still gives the crop its full output resolution: the crop (its first random draw) is chosen
    from the image's size before decoding, so a seed picks the same region either way.
    Training batches stay uint8 until they are on the device (`DeviceNormalize`): a quarter of
    the bytes through shared memory, the pin-memory copy and the host-to-device transfer.
    `augment` takes a CHW uint8 tensor on any device (`DeviceDecode`). Both take the crop's
    output side, which progressive resizing changes per epoch (the crop's random draws do not
    depend on it).
    """

    def __init__(self, data: DataConfig, mean: list[float], std: list[float]):
        self.crop = v2.RandomResizedCrop(data.image_size, scale=(data.scale_min, 1.0), antialias=True)
        self.size, self.draft = data.image_size, data.jpeg_draft
        steps: list = []
        if data.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(data.hflip))
        if data.color_jitter > 0:
            steps.append(v2.ColorJitter(data.color_jitter, data.color_jitter, data.color_jitter))
        if data.rotation > 0:
            steps.append(v2.RandomRotation(data.rotation))
        if data.auto_augment == "randaugment":
            steps.append(v2.RandAugment())
        elif data.auto_augment == "trivialaugment":
            steps.append(v2.TrivialAugmentWide())
        self.steps = v2.Compose(steps or [v2.Identity()])
        self.rest = v2.Compose([self.steps, v2.PILToTensor()])

    def resized_crop(self, image, drawn: dict, size: int):
        return v2.functional.resized_crop(image, **drawn, size=[size, size], antialias=True)

    def augment(self, image: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """A decoded CHW uint8 image -> the random crop at `size` (default image_size), then the rest."""
        return self.steps(self.resized_crop(image, self.crop.make_params([image]), size or self.size))

    def decode(self, data: bytes, size: int | None = None) -> Image.Image | torch.Tensor:
        """Encoded bytes -> the randomly cropped image resized to `size` (default image_size): a
        uint8 CHW tensor when the JPEG is decoded at full size (torchvision's decoder and uint8
        resampler, faster than PIL's), else an RGB PIL image."""
        size = size or self.size
        drawn: dict = {}

        def shrink(width: int, height: int) -> tuple[int, int]:
            placeholder = torch.empty(1, 1, 1, dtype=torch.uint8).expand(3, height, width)  # a size, no pixels
            drawn.update(self.crop.make_params([placeholder]), full=(width, height))
            if not self.draft:
                return width, height
            return math.ceil(width * size / drawn["width"]), math.ceil(height * size / drawn["height"])

        image = open_image(data, shrink)
        if not drawn:  # not a JPEG: the crop is drawn from the decoded size
            image = finish_rgb(image)
            return self.resized_crop(image, self.crop.make_params([image]), size)
        full = drawn.pop("full")
        if plain_jpeg(image) and image.size == full:
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return self.resized_crop(decode_jpeg(encoded, mode=ImageReadMode.RGB), drawn, size)
        image = finish_rgb(image)
        if image.size != full:  # decoded smaller: the same region in its pixels
            sx, sy = image.width / full[0], image.height / full[1]
            drawn = {
                "top": round(drawn["top"] * sy),
                "left": round(drawn["left"] * sx),
                "height": max(1, round(drawn["height"] * sy)),
                "width": max(1, round(drawn["width"] * sx)),
            }
        return self.resized_crop(image, drawn, size)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """The cropped image from `decode` -> flip and the other augmentations -> uint8 CHW."""
        return self.rest(image)


class DeviceDecode:
    """data.decode=device: a batch of JPEG bytes -> augmented uint8 NCHW on the training device.

    The JPEGs are decoded together (nvJPEG on a GPU); then each image gets the workers' own
    augmentation under its own seed, so a sample's crop and flip do not depend on where it was
    decoded. What nvJPEG cannot read is decoded with PIL; what PIL cannot read either is a bad
    sample, dropped with its label when skipping, else a one-line error.
    """

    CHUNK = 32  # images decoded per call: full-size decodes of camera photos take ~36 MB each

    def __init__(self, augment, device: torch.device, skip_bad: bool):
        self.augment, self.device, self.skip_bad = augment, device, skip_bad

    def __call__(self, batch: EncodedBatch, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(uint8 images on the device, their labels, how many were dropped as bad)."""
        augmented: list[torch.Tensor | None] = []
        for start in range(0, len(batch.images), self.CHUNK):
            positions = range(start, min(start + self.CHUNK, len(batch.images)))
            for i, image in zip(positions, self.decode(batch, positions)):
                augmented.append(None if image is None else self.augment_one(image, batch.seeds[i], batch.size))
        keep = [i for i, image in enumerate(augmented) if image is not None]
        if not keep:
            return torch.empty(0, 3, 0, 0, dtype=torch.uint8, device=self.device), labels[:0], len(augmented)
        return torch.stack([augmented[i] for i in keep]), labels[keep], len(augmented) - len(keep)

    def augment_one(self, image: torch.Tensor, seed: int, size: int | None) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.augment(image, size)

    def decode(self, batch: EncodedBatch, positions: range) -> list[torch.Tensor | None]:
        images = {
            i: batch.images[i].to(self.device, non_blocking=True) for i in positions if batch.images[i].dim() == 3
        }
        jpegs = [i for i in positions if batch.images[i].dim() == 1]
        if jpegs:
            try:
                decoded = decode_jpeg([batch.images[i] for i in jpegs], mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one unreadable file fails the whole call: find it
                decoded = [self.decode_one(batch, i) for i in jpegs]
            images.update(zip(jpegs, decoded))
        return [images[i] for i in positions]

    def decode_one(self, batch: EncodedBatch, i: int) -> torch.Tensor | None:
        data = batch.images[i]
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            return v2.functional.pil_to_tensor(decode_rgb(data.numpy().tobytes())).to(self.device)
        except Exception as e:
            if self.skip_bad:
                return None
            raise DataError(
                f"sample {batch.names[i]} cannot be read ({type(e).__name__}: {e}) — "
                "re-run make_shards, or set data.skip_bad_samples=true to skip such samples"
            ) from e


class DeviceNormalize:
    """A uint8 NCHW batch -> float, normalised, on the device, in the model's memory format."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool):
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) / std_t
        self.device, self.channels_last = device, channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images.float().mul_(self.scale).sub_(self.shift)


class EvalPreset:
    """Resize the short side to size / crop_pct, centre crop; or letterbox: pad to square first."""

    def __init__(self, image_size: int, crop_pct: float, mean: list[float], std: list[float], letterbox: bool = False):
        resize = round(image_size / crop_pct)
        steps: list = (
            [LetterboxToSquare(), v2.Resize(image_size, antialias=True)]
            if letterbox
            else [
                v2.Resize(resize, antialias=True),
                v2.CenterCrop(image_size),
            ]
        )
        steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        self.transform = v2.Compose(steps)

    decode = staticmethod(decode_rgb)  # encoded bytes -> RGB image, as the loader asks every preset

    def __call__(self, image):
        return self.transform(image)


class LetterboxToSquare:
    """Pad the shorter side symmetrically (black) so nothing of the image is cropped away."""

    def __call__(self, image):
        width, height = image.size
        side = max(width, height)
        left, top = (side - width) // 2, (side - height) // 2
        return v2.functional.pad(image, [left, top, side - width - left, side - height - top], fill=0)


def batch_mixer(data: DataConfig, num_classes: int):
    """MixUp and/or CutMix on whole batches (one chosen at random per batch), or None."""
    mixers = []
    if data.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=data.mixup_alpha, num_classes=num_classes))
    if data.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=data.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
