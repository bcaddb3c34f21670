
import pytest
import torch

from trainer.config import OptimConfig, ScheduleConfig
from trainer.optim import lr_factor, make_optimizer, make_scheduler, param_groups


def test_warmup_then_cosine_to_final_factor():
    warmup, total, final = 10, 110, 0.01
    factors = [lr_factor(s, warmup, total, final) for s in range(total + 1)]
    assert factors[0] == pytest.approx(0.1)  # linear from the first step
    assert factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:9], factors[1:10]))
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(final + (1 - final) * 0.5)  # half way through the cosine
    assert factors[110] == pytest.approx(final)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_scheduler_steps_per_optimizer_step_and_scales_each_group():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    optim = OptimConfig(name="sgd", lr=0.1, head_lr_mult=10.0)
    opt = make_optimizer(param_groups(model, optim, head=model[2]), optim)
    sched = make_scheduler(opt, ScheduleConfig(warmup_epochs=1, final_lr_factor=0.1), steps_per_epoch=5, epochs=3)
    lrs = []
    for _ in range(15):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    head = [i for i, g in enumerate(opt.param_groups) if g["params"][0] is model[2].weight][0]
    body = [i for i, g in enumerate(opt.param_groups) if g["params"][0] is model[0].weight][0]
    assert lrs[4][body] == pytest.approx(0.1)  # end of warmup
    assert lrs[4][head] == pytest.approx(1.0)  # head lr x 10
    assert lrs[0][body] == pytest.approx(0.1 / 5)
    assert sched.get_last_lr()[body] == pytest.approx(0.1 * 0.1)  # decayed to lr x final factor


def test_no_weight_decay_on_bn_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    groups = param_groups(model, OptimConfig(weight_decay=0.05))
    for group in groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.05 if p.ndim > 1 else 0.0)
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_choice(name, cls):
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(param_groups(model, OptimConfig(name=name)), OptimConfig(name=name, nesterov=True))
    assert isinstance(opt, cls)
    if name == "sgd":
        assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
