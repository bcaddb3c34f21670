import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from trainer.training.metrics import EvalSums, summarize


def test_metrics_match_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    classes = ["a", "b", "c", "d", "e", "f", "g"]
    logits = torch.randn(300, len(classes), generator=generator)
    labels = torch.randint(0, len(classes), (300,), generator=generator)
    labels[:5] = 6  # make sure every class is present
    logits[:, 3] -= 10  # class d is never predicted: zero_division path
    sums = EvalSums.zeros(len(classes), "cpu")
    for chunk in range(0, 300, 64):  # accumulated in pieces, as ranks and batches do
        sums.add(logits[chunk : chunk + 64], labels[chunk : chunk + 64])
    record = summarize(sums, classes)
    y, p = labels.numpy(), logits.argmax(1).numpy()
    assert record["confusion"] == confusion_matrix(y, p, labels=range(len(classes))).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=range(len(classes)), zero_division=0)
    for i, name in enumerate(classes):
        assert record["per_class"][name]["precision"] == pytest.approx(precision[i])
        assert record["per_class"][name]["recall"] == pytest.approx(recall[i])
        assert record["per_class"][name]["f1"] == pytest.approx(f1[i])
        assert record["per_class"][name]["support"] == support[i]
        negatives = y != i
        assert record["per_class"][name]["specificity"] == pytest.approx(np.mean(p[negatives] != i))
    assert record["macro"]["f1"] == pytest.approx(f1.mean())
    assert record["top1"] == pytest.approx(np.mean(y == p))
    assert record["top5"] == pytest.approx(top_k_accuracy_score(y, logits.numpy(), k=5, labels=range(len(classes))))
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert record["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert record["num_samples"] == 300


def test_confusion_plot_renders_chinese_class_names(tmp_path):
    import warnings

    from trainer.training.tracking.plots import plot_confusion

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion([[3, 1], [0, 4]], ["猫 cat", "狗 dog"], tmp_path / "cm.png")
    assert not [w for w in caught if "missing from" in str(w.message)]  # matplotlib's tofu warning
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_flip_tta_averages_the_softmax_of_an_image_and_its_mirror():
    from trainer.training.metrics import predict_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).eval()
    images = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(predict_logits(model, images), model(images))
        flip = predict_logits(model, images, "flip")
        expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
        assert torch.allclose(flip.softmax(1), expected, atol=1e-6) and torch.allclose(flip.exp().sum(1), torch.ones(3))
        assert torch.allclose(predict_logits(model, images.flip(-1), "flip"), flip, atol=1e-6)  # mirror-invariant


def test_evaluation_counts_skipped_samples_and_passes_over_a_batch_of_none():
    from accelerate import Accelerator

    from trainer.training.evaluation import evaluate
    from trainer.training.samples import Batch

    long = torch.long
    batches = [
        Batch(torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]), 1),
        Batch(torch.empty(0), torch.empty(0, dtype=long), torch.empty(0, dtype=long), 3),  # all unreadable
    ]
    sums, _ = evaluate(torch.nn.Linear(4, 3), batches, 3, Accelerator(cpu=True))
    record = summarize(sums, ["a", "b", "c"])
    assert record["num_samples"] == 2 and record["skipped_bad_samples"] == 4
    assert "skipped_bad_samples" not in summarize(EvalSums.zeros(3, "cpu"), ["a", "b", "c"])
