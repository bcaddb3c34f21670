"""What `predict --explain` adds to predict, per 1,000 images: the Grad-CAM pass and the overlay PNGs.

Times, in CPU seconds of this process (steadier than wall time on a shared machine), predict's own
forward pass, the Grad-CAM pass as predict runs it (only the head records a graph) and, for
comparison, with the whole network recording one, and the overlays' drawing and writing.

    python -m bench.explain RUN_DIR IMAGE_FOLDER [--images 512] [--checkpoint best]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import ImageFont

from toolbox.fonts import font_file
from trainer.trained.explain import PNG_LEVEL, heatmaps, only_the_head_records, overlay
from trainer.trained.images import image_files, read_image
from trainer.trained.load import load_trained

BATCH = 64  # predict's default --batch-size


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--images", type=int, default=512, dest="count")
    parser.add_argument("--checkpoint", default="best")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trained = load_trained(args.run_dir, args.checkpoint)
    files, preset = image_files(args.images)[: args.count], trained.preset()
    batches = [torch.stack([preset(read_image(f)) for f in files[i : i + BATCH]]) for i in range(0, len(files), BATCH)]
    model, n = trained.model, len(files)
    forward = sum(cpu_seconds(lambda b=b: torch.no_grad()(model)(b)) for b in batches)
    whole_graph = sum(cpu_seconds(lambda b=b: heatmaps(model, b, [0] * len(b))) for b in batches)
    only_the_head_records(model)
    head_only = sum(cpu_seconds(lambda b=b: heatmaps(model, b, [0] * len(b))) for b in batches)
    mean, std = (torch.tensor(v)[:, None, None] for v in (trained.preprocessing.mean, trained.preprocessing.std))
    font, maps = ImageFont.truetype(font_file(False), 14), heatmaps(model, batches[0], [0] * len(batches[0]))
    with tempfile.TemporaryDirectory() as out:
        pngs = cpu_seconds(
            lambda: [
                overlay(image * std + mean, heat, "3  0.912", font).save(f"{out}/{k}.png", compress_level=PNG_LEVEL)
                for k, (image, heat) in enumerate(zip(batches[0], maps))
            ]
        )
    per_1000 = {
        "predict forward": forward / n,
        "Grad-CAM, head only (predict --explain)": head_only / n,
        "Grad-CAM, whole graph": whole_graph / n,
        "overlay PNGs": pngs / len(batches[0]),
    }
    print(
        json.dumps({"images": n, "cpu_seconds_per_1000_images": {k: round(1000 * v, 2) for k, v in per_1000.items()}})
    )


if __name__ == "__main__":
    main()
