"""The contact sheet every "look at these images" output draws (top losses, label issues)."""

import numpy as np
from PIL import Image

from trainer.training.tracking.plots import SHEET_COLUMNS, contact_sheet


def test_a_grid_of_any_sizes_and_modes_with_captions(tmp_path):
    images = [Image.new("RGB", (20 + i, 30), (i * 20, 0, 0)) for i in range(SHEET_COLUMNS + 3)]
    images += [Image.new("L", (9, 9), 128), np.zeros((5, 7, 3), dtype=np.uint8)]
    captions = [f"猫 -> dog\n0.{i:02d}" for i in range(len(images))]
    out = tmp_path / "sheet.png"
    contact_sheet(images, captions, out, title="top losses")
    width, height = Image.open(out).size
    assert width > height > 0  # two rows of eight columns


def test_a_single_image(tmp_path):
    contact_sheet([Image.new("RGB", (4, 4))], ["a -> b"], tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").size[0] > 0
