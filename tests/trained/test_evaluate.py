"""trainer/trained/evaluate.py without a trained run: the precision it runs in, said as its own choice."""

from dataclasses import replace

import pytest

from trainer.trained.evaluate import full_precision
from trainer.training.config import load_config
from trainer.training.runtime import make_accelerator

REQUIRED = ["data.shards=s", "run.dir=r", "train.device=cpu"]


@pytest.mark.parametrize(
    "trained_in, said",
    [
        ("no", "precision no (evaluate always), compile none (evaluate always)"),
        ("bf16", "precision no (evaluate always; the run trained in bf16), compile none (evaluate always)"),
    ],
)
def test_evaluate_runs_in_full_precision_and_says_whose_choice_it_is(trained_in, said, monkeypatch, capsys):
    """Under `accelerate launch --mixed_precision bf16 --dynamo_backend inductor` too: evaluate's own
    choice applies, and is not called the config's (evaluate used to say `precision no (config)`)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    config = load_config(None, [*REQUIRED, f"train.mixed_precision={trained_in}"])  # as the run's config.yaml says
    evaluating = replace(config, train=replace(config.train, mixed_precision="no", compile="none"))
    accelerator = make_accelerator(evaluating, full_precision(config.train))
    assert accelerator.mixed_precision == "no" and accelerator.state.dynamo_plugin.backend.value == "NO"
    assert capsys.readouterr().out.splitlines() == [said]
