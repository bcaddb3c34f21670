"""Decode + train augmentation on one CPU core, data.jpeg_draft off against on, side by side.

What a loader worker does per sample (bytes -> random resized crop -> flip -> uint8 tensor), for
JPEGs of a few sizes, the two settings interleaved in one process. The ratio is what matters:

    python bench/decode.py                       # 500x375 (ImageNet-like), 1600x1200, 4000x3000 (12 MP)
    python bench/decode.py --sizes 4000x3000 --image-size 224 --seconds 5
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.config import DataConfig  # noqa: E402
from trainer.transforms import TrainPreset  # noqa: E402


def photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG with photo-like content: smooth shading plus noise, quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / 97 + seed) * 60 + 120, np.cos(y / 71) * 60 + 120, (x + y) / (width + height) * 200], -1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rate(preset: TrainPreset, files: list[bytes], seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.manual_seed(done)
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
    presets = {on: TrainPreset(DataConfig(shards="-", image_size=args.image_size, jpeg_draft=on), [0.5] * 3, [0.5] * 3)
               for on in (False, True)}
    print(f"one core, torch {torch.__version__}, PIL {Image.__version__}, output {args.image_size} px\n")
    print("| JPEG size | KB | jpeg_draft=false img/s | jpeg_draft=true img/s | ratio |\n|---|---|---|---|---|")
    for size in args.sizes.split(","):
        width, height = map(int, size.split("x"))
        files = [photo(width, height, seed) for seed in range(args.files)]
        rates = {False: 0.0, True: 0.0}
        for _ in range(2):  # interleaved halves: drift in machine speed hits both settings alike
            for on in (False, True):
                rates[on] += rate(presets[on], files, args.seconds / 2) / 2
        kb = sum(map(len, files)) / len(files) / 1024
        print(f"| {size} | {kb:.0f} | {rates[False]:,.1f} | {rates[True]:,.1f} | {rates[True] / rates[False]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
