"""Which perceptual hash, and which Hamming threshold, finds near-duplicate images: precision and
recall on a synthetic set with known answers, for imagehash's phash (DCT) and dhash (gradient).

    python -m bench.near_duplicates                  # 300 originals, 11 copies each, 64 digits
    python -m bench.near_duplicates --originals 100 --json nd.json

The set: generated "photos" (a smooth colour field, shapes, a little grain; 240..420 px a side)
and, of each, copies resized (1/2, 1/4, x1.5), re-encoded (JPEG q 30, PNG -> WebP q 50),
lightly cropped (4% off every side, 8% off two sides), recoloured (brighter, less contrast,
greyscale, warmer) and resized + re-encoded + cropped together. Unrelated pairs: every pair of
different originals with all their copies (about 5 M pairs at 300 originals), and the digits
(8x8, upscaled as a user's tiny images are): different handwritten digits that look alike, which
a size floor keeps out (shown so the floor is justified).
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable

import imagehash
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from launch.neardup import hash_bits, pair_distances

HASHES: dict[str, Callable[[Image.Image], imagehash.ImageHash]] = {
    "phash": imagehash.phash,
    "dhash": imagehash.dhash,
}


def original(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(240, 421, 2))
    coarse = rng.integers(0, 256, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    grain = rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + grain, 0, 255).astype(np.uint8))


def _encoded(img: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _scaled(img: Image.Image, f: float) -> Image.Image:
    return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.LANCZOS)


def _cropped(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * left), round(h * top), round(w * (1 - right)), round(h * (1 - bottom))))


def _warmer(img: Image.Image) -> Image.Image:
    r, g, b = img.split()
    return Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.15))), g, b.point(lambda v: int(v * 0.85))))


COPIES: dict[str, tuple[str, Callable[[Image.Image], Image.Image]]] = {
    "resize 1/2": ("resize", lambda im: _scaled(im, 0.5)),
    "resize 1/4": ("resize", lambda im: _scaled(im, 0.25)),
    "resize x1.5": ("resize", lambda im: _scaled(im, 1.5)),
    "jpeg q30": ("re-encode", lambda im: _encoded(im, "JPEG", quality=30)),
    "webp q50": ("re-encode", lambda im: _encoded(im, "WEBP", quality=50)),
    "crop 4% all sides": ("crop", lambda im: _cropped(im, 0.04, 0.04, 0.04, 0.04)),
    "crop 8% left+top": ("crop", lambda im: _cropped(im, 0.08, 0.08, 0, 0)),
    "brighter 25%": ("recolour", lambda im: ImageEnhance.Brightness(im).enhance(1.25)),
    "contrast 0.7": ("recolour", lambda im: ImageEnhance.Contrast(im).enhance(0.7)),
    "greyscale": ("recolour", lambda im: ImageOps.grayscale(im).convert("RGB")),
    "warmer": ("recolour", _warmer),
    "1/2 + jpeg q60 + crop 3%": (
        "combined",
        lambda im: _encoded(_cropped(_scaled(im, 0.5), 0.03, 0.03, 0.03, 0.03), "JPEG", quality=60),
    ),
}


def digits(n: int) -> list[Image.Image]:
    from sklearn.datasets import load_digits

    pixels = np.rint(load_digits().images[:n] * (255 / 16)).astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


def measure(n: int, n_digits: int, thresholds: list[int]) -> dict:
    originals = [original(seed) for seed in range(n)]
    images, source, kinds = [], [], []
    for k, img in enumerate(originals):
        images.append(img)
        source.append(k)
        kinds.append("original")
        for name, (_, make) in COPIES.items():
            images.append(make(img))
            source.append(k)
            kinds.append(name)
    source, kinds = np.array(source), np.array(kinds)
    out = {"originals": n, "copies_each": len(COPIES), "hashes": {}}
    for hname, fn in HASHES.items():
        h = np.array([hash_bits(fn(im)) for im in images], np.uint64)
        d = pair_distances(h)  # (M, M) Hamming distances
        same = source[:, None] == source[None, :]
        upper = np.triu(np.ones_like(same), 1)
        unrelated = d[upper & ~same]
        to_original = {name: d[kinds == "original"][:, kinds == name].diagonal() for name in COPIES}
        dig = np.array([hash_bits(fn(im)) for im in digits(n_digits)], np.uint64)
        dd = pair_distances(dig)[np.triu(np.ones((len(dig), len(dig)), bool), 1)]
        rows = {}
        for t in thresholds:
            rows[t] = {
                "recall": {name: float(np.mean(v <= t)) for name, v in to_original.items()},
                "false_pairs": int(np.sum(unrelated <= t)),
                "unrelated_pairs": int(unrelated.size),
                "digit_false_pairs": int(np.sum(dd <= t)),
                "digit_pairs": int(dd.size),
            }
        out["hashes"][hname] = {
            "rows": rows,
            "copy_distance_max": {name: int(v.max()) for name, v in to_original.items()},
            "unrelated_distance_min": int(unrelated.min()),
        }
    return out


def show(res: dict) -> None:
    for hname, r in res["hashes"].items():
        print(f"\n{hname}: unrelated pairs' smallest distance {r['unrelated_distance_min']} bits")
        print(
            "  largest distance of a copy to its original: "
            + ", ".join(f"{k} {v}" for k, v in r["copy_distance_max"].items())
        )
        names = list(COPIES)
        print("  t  | " + " | ".join(f"{n[:12]:>12}" for n in names) + " | false pairs | digit false pairs")
        for t, row in r["rows"].items():
            rec = " | ".join(f"{row['recall'][n]:12.3f}" for n in names)
            print(
                f"  {t:2d} | {rec} | {row['false_pairs']:5d}/{row['unrelated_pairs']} | "
                f"{row['digit_false_pairs']}/{row['digit_pairs']}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--originals", type=int, default=300)
    p.add_argument("--digits", type=int, default=200, help="digit images (8x8) for the small-image false pairs")
    p.add_argument("--thresholds", default="4,6,8,10,12,14,16")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    res = measure(args.originals, args.digits, [int(t) for t in args.thresholds.split(",")])
    show(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
