import pytest
import torch

from trainer.training.config import OptimConfig, ScheduleConfig, load_config
from trainer.training.optim import (
    config_lr,
    describe_lr,
    lr_factor,
    make_optimizer,
    make_scheduler,
    param_groups,
    scaled_lr,
)


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
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    model(torch.zeros(1, 3, 5, 5))
    groups = param_groups(model, OptimConfig(weight_decay=0.05))
    for group in groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.05 if p.ndim > 1 else 0.0)
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}


@pytest.mark.parametrize(
    "name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]
)
def test_optimizer_choice(name, cls):
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(param_groups(model, OptimConfig(name=name)), OptimConfig(name=name, nesterov=True))
    assert isinstance(opt, cls)
    if name == "sgd":
        assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_lr_is_used_as_given_without_a_base_size():
    optim = OptimConfig(name="sgd", lr=0.1)
    assert [scaled_lr(optim, batch) for batch in (1, 128, 4096)] == [0.1, 0.1, 0.1]
    assert describe_lr(optim, 128) == "lr 0.1"


@pytest.mark.parametrize(
    "name, scale, global_batch, expected",
    [
        ("sgd", "linear", 512, 0.2),
        ("sgd", "linear", 64, 0.025),
        ("sgd", "sqrt", 1024, 0.2),
        ("adamw", "sqrt", 64, 0.05),
        ("adamw", "linear", 1024, 0.4),
        ("sgd", "auto", 1024, 0.4),  # auto: linear for sgd
        ("adamw", "auto", 1024, 0.2),  # auto: sqrt for adam and adamw
        ("adam", "auto", 64, 0.05),
        ("adamw", "auto", 256, 0.1),  # the base batch itself: lr unchanged
    ],
)
def test_lr_scales_from_the_base_size_to_the_global_batch(name, scale, global_batch, expected):
    optim = OptimConfig(name=name, lr=0.1, lr_base_size=256, lr_base_scale=scale)
    assert scaled_lr(optim, global_batch) == pytest.approx(expected)


@pytest.mark.parametrize("base", [None, 64, 256])
@pytest.mark.parametrize("scale", ["linear", "sqrt"])
def test_config_lr_is_the_setting_that_scales_back_to_the_rate(base, scale):
    """find_lr's rate at the actual global batch, written as the config's optim.lr."""
    for global_batch in (32, 256, 1024):
        written = config_lr(OptimConfig(name="adamw", lr_base_size=base, lr_base_scale=scale), global_batch, 0.003)
        optim = OptimConfig(name="adamw", lr=written, lr_base_size=base, lr_base_scale=scale)
        assert scaled_lr(optim, global_batch) == pytest.approx(0.003)
    assert config_lr(OptimConfig(name="adamw", lr_base_size=64), 32, 0.001) == pytest.approx(0.001 * 2**0.5)


def test_scaled_lr_reaches_every_group_with_the_head_multiplier():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    optim = OptimConfig(name="sgd", lr=0.1, lr_base_size=256, head_lr_mult=10.0)
    lr = scaled_lr(optim, 1024)
    opt = make_optimizer(param_groups(model, optim, head=model[2], lr=lr), optim, lr)
    head = {id(p) for p in model[2].parameters()}
    for group in opt.param_groups:
        is_head = id(group["params"][0]) in head
        assert group["lr"] == pytest.approx(4.0 if is_head else 0.4)
    assert opt.defaults["lr"] == pytest.approx(0.4)
    sched = make_scheduler(opt, ScheduleConfig(), steps_per_epoch=5, epochs=1)
    assert sorted(sched.base_lrs) == pytest.approx([0.4, 0.4, 4.0, 4.0])  # the schedule scales the resolved lr


@pytest.mark.parametrize("processes, expected", [(32, 1.6), (1, 0.05), (2, 0.1)])
def test_imagenet_recipe_resolves_per_cluster(processes, expected):
    """0.1 per 256 images, linear: the DenseNet paper's rate per image on any cluster."""
    config = load_config("configs/densenet121-imagenet.yaml", ["data.shards=s", "run.dir=r"])
    global_batch = config.train.batch_size * processes * config.train.grad_accum
    assert scaled_lr(config.optim, global_batch) == pytest.approx(expected)
    assert describe_lr(config.optim, global_batch) == f"lr {expected:g} (0.1 per 256 images, linear)"


@pytest.mark.parametrize("config, processes", [("demo", 2), ("cifar-style", 1)])
def test_shipped_configs_keep_their_lr_at_their_usual_launch(config, processes):
    config = load_config(f"configs/{config}.yaml", ["data.shards=s", "run.dir=r"])
    assert scaled_lr(config.optim, config.train.batch_size * processes * config.train.grad_accum) == config.optim.lr
