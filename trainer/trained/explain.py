"""predict --explain: where the model looked, as a Grad-CAM heatmap of the predicted class (torchcam).

Grad-CAM at the network's last feature map (the final norm, rectified by the head's ReLU, right
before the global pooling): each image's heatmap is blended over the image as predict preprocessed
it (what the model saw), shown beside it and captioned with the class and its probability as the CSV
gives them. One PNG per readable image, in a folder beside the CSV named after it, <csv stem>-explain/,
each named <row>-<image stem>-<class>.png (the row number keeps equal names from two folders apart);
the CSV's `explain` column holds that file name. The folder is written under a hidden temporary name
and renamed only once the CSV is complete: an interrupted predict leaves neither behind.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchcam.methods import GradCAM
from torchcam.utils import overlay_mask
from torchvision.transforms.v2.functional import to_pil_image

from toolbox.fonts import font_file
from trainer.rundir import Preprocessing

DISPLAY = 224  # px: smaller inputs (32 px, 8 px) are upscaled so that the heatmap can be seen
IMAGE_OPACITY = 0.5  # of the image under the heatmap
UNSAFE = re.compile(r"[^\w.-]+")  # \w is any script's letters and digits: class names stay readable
PNG_LEVEL = 1  # zlib level: PIL's default 6 made writing the PNGs 4x slower, for files only 13% smaller
NAME_PART = 60  # characters of an image stem or class name in a file name


def target_layer(model: torch.nn.Module) -> str:
    """The last module of model.features (norm5 in the SE-DenseNet): its output, made non-negative
    in place by the head's ReLU, is the map the pooling averages and the classifier weighs."""
    name, _ = list(model.features.named_children())[-1]
    return f"features.{name}"


def heatmaps(model: torch.nn.Module, images: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Grad-CAM of each image's given class, (N, H, W) at the input's size, each scaled to [0, 1].
    The model must be in eval mode (eager: the checkpointed dense layers run plainly there)."""
    with torch.enable_grad(), GradCAM(model, target_layer(model)) as cam:
        scores = model(images)
        maps = cam(class_idx=classes, scores=scores)[0]
    return F.interpolate(maps[:, None].float(), images.shape[-2:], mode="bilinear")[:, 0].clamp(0, 1)


def only_the_head_records(model: torch.nn.Module) -> None:
    """Grad-CAM needs the gradient of a class score with respect to the last feature map only: with
    no parameter before it requiring one, the forward keeps no activations for a backward pass
    through the whole network, and costs about what predict's own forward does."""
    model.requires_grad_(False)
    model.get_submodule(target_layer(model)).requires_grad_(True)


class Overlays:
    """Writes each batch's overlays into a hidden folder; `keep` gives it its name beside the CSV."""

    def __init__(self, model: torch.nn.Module, classes: list[str], preprocessing: Preprocessing, folder: Path):
        self.model, self.classes, self.folder = model, classes, folder
        self.mean = torch.tensor(preprocessing.mean)[:, None, None]
        self.std = torch.tensor(preprocessing.std)[:, None, None]
        self.font = ImageFont.truetype(font_file(any(not c.isascii() for c in classes)), 14)
        only_the_head_records(model)

    def __call__(self, images: torch.Tensor, indices: list[int], files: list[Path], top: torch.return_types.topk):
        """-> {file index: overlay file name} for the batch's images (predict's rows, its top-k).
        With --tta flip the class is the averaged prediction's; the map is of the image as given."""
        predicted, probabilities = top.indices[:, 0].tolist(), top.values[:, 0].tolist()
        maps = heatmaps(self.model, images, predicted).cpu()
        seen = images.cpu() * self.std + self.mean  # what the model saw, its normalisation undone
        names = {}
        for n, i in enumerate(indices):
            label, probability = self.classes[predicted[n]], probabilities[n]
            picture = overlay(seen[n], maps[n], f"{label}  {probability:.3f}", self.font)
            names[i] = file_name(i, len(files), files[i], label)
            picture.save(self.folder / names[i], compress_level=PNG_LEVEL)
        return names

    def keep(self, csv: Path) -> Path:
        """The complete folder named after its CSV; an earlier one of that name (from an earlier
        predict to the same --out, or one whose CSV is gone) is replaced. -> where it went."""
        final = explain_folder(csv)
        if final.exists():
            old = final.with_name(f".{final.name}.{os.getpid()}.old")
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(self.folder, final)
        return final


def explain_folder(csv: Path) -> Path:
    return csv.with_name(f"{csv.stem}-explain")


@contextmanager
def writing_overlays(
    model: torch.nn.Module, classes: list[str], preprocessing: Preprocessing, beside: Path
) -> Iterator[Overlays]:
    """Overlays written into a hidden folder in BESIDE, which is removed unless `keep` moved it."""
    folder = beside / f".explain.{os.getpid()}.tmp"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield Overlays(model, classes, preprocessing, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def file_name(index: int, count: int, path: Path, label: str) -> str:
    """<row>-<image stem>-<class>.png, its row zero-padded so that the files sort as the CSV does."""
    stem = os.fsencode(path.stem).decode("utf-8", "backslashreplace")
    parts = (UNSAFE.sub("_", part)[:NAME_PART] for part in (stem, label))
    return f"{index + 1:0{len(str(count))}d}-{'-'.join(parts)}.png"


def overlay(image: torch.Tensor, heat: torch.Tensor, caption: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """The image (3xHxW in [0, 1]) and the heatmap (HxW in [0, 1]) blended over it, side by side,
    the caption under both."""
    side = max(DISPLAY, image.shape[-1])
    scale = side / image.shape[-1]
    size = (side, math.ceil(image.shape[-2] * scale))
    picture = to_pil_image(image.clamp(0, 1)).resize(size, Image.Resampling.BICUBIC)
    blended = overlay_mask(picture, to_pil_image(heat, mode="F"), colormap="jet", alpha=IMAGE_OPACITY)
    band = font.size * 2
    sheet = Image.new("RGB", (2 * size[0], size[1] + band), "white")
    sheet.paste(picture, (0, 0))
    sheet.paste(blended, (size[0], 0))
    ImageDraw.Draw(sheet).text((size[0], size[1] + band // 2), caption, fill="black", font=font, anchor="mm")
    return sheet
