"""Decode + train augmentation on one CPU core: our loader worker against the plain recipe.

What a loader worker does per sample (bytes -> random resized crop -> flip -> uint8 tensor), for
JPEGs of a few sizes, interleaved in one process: torchvision's reference recipe on PIL
(decode, v2.RandomResizedCrop, flip, PILToTensor), and our TrainPreset with data.jpeg_draft off
and on (torchvision's decoder and uint8 resampler for full-size JPEGs; DCT-scaled decoding with
PIL where the crop allows). The ratios are what matter:

    python -m bench.decode                       # 500x375 (ImageNet-like), 1600x1200, 4000x3000 (12 MP)
    python -m bench.decode --sizes 4000x3000 --image-size 224 --seconds 5
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from shards.format import decode_rgb
from trainer.training.config import DataConfig
from trainer.training.transforms import TrainPreset


def photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG with photo-like content: smooth shading plus noise, quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / 97 + seed) * 60 + 120, np.cos(y / 71) * 60 + 120, (x + y) / (width + height) * 200], -1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class PlainRecipe:
    """torchvision's reference training transforms on a PIL image, as most trainers run them."""

    def __init__(self, size: int) -> None:
        self.transform = v2.Compose(
            [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()]
        )

    def decode(self, data: bytes) -> Image.Image:
        return decode_rgb(data)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)


def rate(preset, files: list[bytes], seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.default_generator.manual_seed(done)  # as the loader seeds each sample (torch.manual_seed is slower)
        preset(preset.decode(files[done % len(files)]))
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="500x375,1600x1200,4000x3000")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--files", type=int, default=8, help="distinct JPEGs per size")
    p.add_argument("--seconds", type=float, default=3.0, help="per setting and size, in two halves")
    args = p.parse_args()
    torch.set_num_threads(1)
    presets = {
        "plain": PlainRecipe(args.image_size),
        "draft off": TrainPreset(
            DataConfig(shards="-", image_size=args.image_size, jpeg_draft=False), [0.5] * 3, [0.5] * 3
        ),
        "draft on": TrainPreset(
            DataConfig(shards="-", image_size=args.image_size, jpeg_draft=True), [0.5] * 3, [0.5] * 3
        ),
    }
    print(
        f"one core, torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {Image.__version__}, "
        f"output {args.image_size} px\n"
    )
    print(
        "| JPEG size | KB | plain PIL recipe img/s | ours, jpeg_draft=false | ours, jpeg_draft=true | ratios vs plain |"
    )
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        width, height = map(int, size.split("x"))
        files = [photo(width, height, seed) for seed in range(args.files)]
        rates = dict.fromkeys(presets, 0.0)
        for _ in range(2):  # interleaved halves: drift in machine speed hits every setting alike
            for name, preset in presets.items():
                rates[name] += rate(preset, files, args.seconds / 2) / 2
        kb = sum(map(len, files)) / len(files) / 1024
        off, on = rates["draft off"] / rates["plain"], rates["draft on"] / rates["plain"]
        print(
            f"| {size} | {kb:.0f} | {rates['plain']:,.1f} | {rates['draft off']:,.1f} | {rates['draft on']:,.1f} "
            f"| {off:.2f}x, {on:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
