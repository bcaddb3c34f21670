"""The built-in demo data: scikit-learn's handwritten digits written out as an image folder.

1,797 8x8 grey images in ten classes "0".."9", shipped inside scikit-learn (no download),
so a new user can run the whole pipeline on any machine.

    python -m launch.demo DIR        # DIR/<digit>/<digit>_<index>.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: Path) -> Path:
    """Write the digits as 8-bit grey PNGs under ``out`` (created); -> ``out``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    out = Path(out)
    for d in range(10):
        (out / str(d)).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(pixels, digits.target)):
        Image.fromarray(img).save(out / str(label) / f"{label}_{i:04d}.png", optimize=False)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m launch.demo DIR   (writes scikit-learn's digits as DIR/<digit>/*.png)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: {out} exists and is not an empty folder — pass a new folder", file=sys.stderr)
        return 2
    write_digits(out)
    print(f"wrote 1797 digit images in 10 class folders under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
