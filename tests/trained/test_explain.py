"""predict --explain's Grad-CAM without a trained run: the map is the right one, points where the
class's evidence is, and its folder appears complete or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.rundir import Preprocessing
from trainer.trained.explain import (
    file_name,
    heatmaps,
    only_the_head_records,
    overlay,
    target_layer,
    writing_overlays,
)
from trainer.training.model import se_densenet


def class_activation_map(model, images: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Zhou et al.'s CAM from the classifier's weights: for a head that is ReLU -> global average
    pool -> linear, Grad-CAM at the last feature map must be exactly this."""
    with torch.no_grad():
        features = F.relu(model.forward_features(images))
        weights = model.classifier.weight[classes]  # (N, C)
        cam = torch.einsum("nc,nchw->nhw", weights, features).relu()
        cam -= cam.amin((1, 2), keepdim=True)
        cam /= cam.amax((1, 2), keepdim=True) + 1e-8
        return F.interpolate(cam[:, None], images.shape[-2:], mode="bilinear")[:, 0]


@pytest.mark.parametrize("efficient", [False, True])
def test_the_heatmap_is_the_class_activation_map_at_the_input_size(efficient):
    torch.manual_seed(0)
    model = se_densenet(16, num_classes=3, small_inputs=True, efficient=efficient).eval()
    images = torch.randn(4, 3, 16, 16)
    classes = [0, 1, 2, 0]
    heat = heatmaps(model, images, classes)
    assert heat.shape == (4, 16, 16) and heat.isfinite().all() and heat.min() >= 0 and heat.max() <= 1
    torch.testing.assert_close(heat, class_activation_map(model, images, classes), atol=1e-5, rtol=1e-4)
    assert not torch.equal(heatmaps(model, images, [1, 2, 0, 1]), heat)  # another class, another map


def test_recording_only_the_head_changes_no_map():
    torch.manual_seed(0)
    model = se_densenet(16, num_classes=3, small_inputs=True).eval()
    images = torch.randn(2, 3, 16, 16)
    before = heatmaps(model, images, [0, 1])
    only_the_head_records(model)
    assert target_layer(model) == "features.norm5"
    assert not any(p.requires_grad for name, p in model.named_parameters() if not name.startswith("features.norm5"))
    torch.testing.assert_close(heatmaps(model, images, [0, 1]), before)


class Brightness(nn.Module):
    """A hand-made classifier: class 0 is 'something bright', class 1 'something dark'; its one
    feature map is the image's brightness."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 1, 1, bias=False))
        self.classifier = nn.Linear(1, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(1 / 3)
            self.classifier.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.classifier.bias.zero_()

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def test_the_heatmap_lights_up_the_region_that_drives_the_class():
    image = torch.zeros(1, 3, 16, 16)
    image[..., :4, :4] = 1.0  # one bright corner: the only evidence for class 0
    model = Brightness().eval()
    bright = heatmaps(model, image, [0])[0]
    assert bright[:3, :3].min() > 0.9 and bright[8:, :].max() < 0.05 and bright[:, 8:].max() < 0.05
    assert heatmaps(model, image, [1])[0].max() == 0  # nothing in the image speaks for 'dark'


def test_overlay_is_the_image_and_its_heatmap_side_by_side_at_a_visible_size():
    from PIL import ImageFont

    from toolbox.fonts import font_file

    font = ImageFont.truetype(font_file(False), 14)
    sheet = overlay(torch.rand(3, 8, 8), torch.rand(8, 8), "7  0.931", font)
    assert sheet.size == (2 * 224, 224 + 28) and sheet.mode == "RGB"


def test_file_names_keep_equal_stems_apart_and_stay_in_one_folder():
    names = [
        file_name(0, 120, Path("a/cat.png"), "dog"),
        file_name(1, 120, Path("b/cat.png"), "dog"),
        file_name(2, 120, Path("c/../x y.png"), "a/b\\c"),
        file_name(3, 120, Path(os.fsdecode(b"caf\xe9.png")), "\u732b"),
    ]
    assert names == ["001-cat-dog.png", "002-cat-dog.png", "003-x_y-a_b_c.png", "004-caf_xe9-\u732b.png"]
    assert len(file_name(0, 1, Path("n" * 500 + ".png"), "c" * 500)) < 130


PREPROCESSING = Preprocessing(mean=[0.5] * 3, std=[0.25] * 3, image_size=16, crop_pct=1.0, train_image_size=16)


def test_overlays_are_kept_beside_the_csv_replacing_an_earlier_folder(tmp_path):
    model = se_densenet(16, num_classes=3, small_inputs=True).eval()
    (tmp_path / "pred-explain").mkdir()
    (tmp_path / "pred-explain" / "old.png").write_bytes(b"from an earlier predict")
    images = torch.randn(2, 3, 16, 16)
    with writing_overlays(model, ["a", "b", "c"], PREPROCESSING, tmp_path) as explain:
        top = model(images).softmax(1).topk(2, dim=1)
        named = explain(images, [0, 2], [Path("x.png"), Path("bad.png"), Path("y.png")], top)
        assert list(named) == [0, 2] and named[0].startswith("1-x-") and named[2].startswith("3-y-")
        assert explain.keep(tmp_path / "pred.csv") == tmp_path / "pred-explain"
    assert sorted(p.name for p in (tmp_path / "pred-explain").iterdir()) == sorted(named.values())
    assert [p.name for p in tmp_path.iterdir()] == ["pred-explain"]  # no hidden folder left


def test_an_interrupted_predict_leaves_no_overlays(tmp_path):
    model = se_densenet(16, num_classes=3, small_inputs=True).eval()
    with pytest.raises(KeyboardInterrupt), writing_overlays(model, ["a", "b", "c"], PREPROCESSING, tmp_path) as explain:
        images = torch.randn(1, 3, 16, 16)
        explain(images, [0], [Path("x.png")], model(images).softmax(1).topk(1, dim=1))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
