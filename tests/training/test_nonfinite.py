"""A non-finite step changes nothing: weights, optimizer state, BN statistics and EMA stay as they were."""

import copy

import pytest
import torch
from accelerate import Accelerator

from trainer.training.config import OptimConfig
from trainer.training.model import se_densenet
from trainer.training.nonfinite import NonFiniteError, StepGuard, assert_finite, nonfinite_names, update_ema
from trainer.training.optim import make_ema, make_optimizer, param_groups


def tiny():
    torch.manual_seed(0)
    return se_densenet(121, 3, growth_rate=4, num_init_features=8, block_config=[2, 2], se_reduction=2)


def snapshot(model, optimizer, ema):
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()})


def step(model, optimizer, guard, ema, images, labels, poison=False):
    guard.start()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    if poison:
        loss = loss * float("nan")
    loss.backward()
    good = guard.check(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, model, 0.9, good)
    return good


@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_nonfinite_step_changes_nothing_and_a_finite_one_goes_on(name, grad_clip):
    accelerator = Accelerator(cpu=True)
    model = tiny()
    optim = OptimConfig(name=name, lr=0.1)
    optimizer = make_optimizer(param_groups(model, optim), optim)
    ema = make_ema(model, 0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    guard = StepGuard(model, optimizer, accelerator, grad_clip)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])

    assert step(model, optimizer, guard, ema, images, labels, poison=True).item() is False  # the very first step
    assert guard.streak.item() == 1
    assert step(model, optimizer, guard, ema, images, labels).item() is True
    before = snapshot(model, optimizer, ema)
    assert guard.streak.item() == 0
    for n in (1, 2):
        assert step(model, optimizer, guard, ema, images, labels, poison=True).item() is False
        assert guard.streak.item() == n
    after = snapshot(model, optimizer, ema)
    assert not nonfinite_names(after)
    for part in before:
        for key, value in before[part].items() if part != "optimizer" else before[part]["state"].items():
            other = after[part][key] if part != "optimizer" else after[part]["state"][key]
            if isinstance(value, dict):
                assert all(torch.equal(value[k], other[k]) for k in value), (part, key)
            else:
                assert torch.equal(value, other), (part, key)
    assert guard.take_skipped().item() == 3
    step(model, optimizer, guard, ema, images, labels)
    assert not torch.equal(model.state_dict()["classifier.weight"], before["model"]["classifier.weight"])


def test_ema_matches_averaged_models_own_update_on_finite_steps():
    model = tiny()
    ours, theirs = make_ema(model, 0.9), make_ema(model, 0.9)
    good = torch.tensor(True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        update_ema(ours, model, 0.9, good)
        theirs.update_parameters(model)
    for (name, a), b in zip(ours.module.named_parameters(), theirs.module.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert ours.n_averaged.item() == theirs.n_averaged.item() == 3


def test_nonfinite_values_are_named_and_never_written():
    state = {
        "model": {"w": torch.ones(3), "n": torch.tensor(4)},
        "optimizer": {
            "state": {0: {"exp_avg": torch.tensor([1.0, float("inf")])}},
            "param_groups": [{"lr": float("nan")}],
        },
    }
    assert nonfinite_names(state) == ["optimizer.state.0.exp_avg", "optimizer.param_groups.0.lr"]
    with pytest.raises(NonFiniteError, match="optimizer.state.0.exp_avg and 1 more"):
        assert_finite(state, "weights", 7)
    assert_finite({"model": {"w": torch.ones(3)}}, "weights", 7)


def test_a_stuck_run_names_the_step_the_loss_and_what_to_try():
    accelerator = Accelerator(cpu=True)
    model = tiny()
    optim = OptimConfig(name="adamw", lr=0.1)
    optimizer = accelerator.prepare(make_optimizer(param_groups(model, optim), optim))
    guard = StepGuard(model, optimizer, accelerator, 0.0, streak=4)
    guard.fail_if_stuck(4, 5, 12)
    guard.loss = torch.tensor(float("nan"))
    with pytest.raises(NonFiniteError, match=r"5 optimizer steps in a row .* \(step 13, loss nan\) — lower optim.lr"):
        guard.fail_if_stuck(5, 5, 13)
