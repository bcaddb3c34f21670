"""Calibration and top losses at the end of a real 2-process run on the digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shards.manifest import Manifest
from trainer.rundir import best_eval, read_weights_file
from trainer.trained.load import load_trained
from trainer.training.calibration import fit_temperature
from trainer.training.data import EvalOrder, ShardDataset, make_loader, open_shards, split_reader

pytestmark = pytest.mark.e2e


def evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "eval"]


def val_logits(run_dir: Path, which: str, shards: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights over the whole val split on one process, in the split's order."""
    trained = load_trained(run_dir, which)
    dataset = ShardDataset(split_reader(open_shards(str(shards)), "val"), trained.preset())
    loader = make_loader(dataset, EvalOrder(len(dataset), 64, 0, 1), workers=0, pin_memory=False)
    with torch.no_grad():
        batches = [(trained.model(images), labels) for images, labels, _, _ in loader]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_temperature_scaling_lowers_the_val_ece_and_goes_with_its_weights(uninterrupted, digits_shards):
    records = evals(uninterrupted)
    for record in records:
        assert record["temperature"] > 0 and record["ece_calibrated"] <= record["ece"], record["epoch"]
    for which, record in (("best", best_eval(records)), ("final", records[-1])):
        _, info = read_weights_file(uninterrupted / f"{which}.safetensors")
        assert info.temperature == record["temperature"], which
        # Fitted from the 2 processes' gathered logits; one process over the whole split finds the same T.
        logits, labels = val_logits(uninterrupted, which, digits_shards)
        assert len(labels) == Manifest.load(digits_shards).splits["val"].num_samples
        assert fit_temperature(logits, labels) == pytest.approx(record["temperature"], rel=1e-6)


def test_the_report_shows_the_calibration_and_the_final_top_losses(uninterrupted):
    report = (uninterrupted / "report.md").read_text()
    assert (uninterrupted / "top_losses.png").stat().st_size > 0 and "![top losses](top_losses.png)" in report
    final = evals(uninterrupted)[-1]
    assert f"- calibration of final.safetensors: temperature {final['temperature']:.3f}" in report
