"""trainer/training/state.py: the training state saved and restored whole, the lr changed on resume, the RNGs."""

import pytest
import torch
from accelerate import Accelerator

from toolbox.cli import Console
from trainer.training import checkpoint
from trainer.training.build import build_model
from trainer.training.checkpoint import CheckpointError
from trainer.training.config import OptimConfig, ScheduleConfig, load_config
from trainer.training.optim import make_optimizer, make_scheduler, param_groups
from trainer.training.randomness import rng_state, set_rng_state
from trainer.training.state import TrainState, use_new_lr

TINY = [
    "data.shards=s",
    "run.dir=r",
    "model.block_config=[1,1]",
    "model.growth_rate=4",
    "model.num_init_features=8",
    "model.small_inputs=true",
    "train.epochs=2",
    "train.batch_size=4",
]


def trained_state(seed: int, steps: int) -> TrainState:
    torch.manual_seed(seed)
    config = load_config(None, [*TINY, "train.ema=true"])
    state = TrainState(config, build_model(config, 3), Accelerator(cpu=True), steps_per_epoch=5)
    state.prepare()
    for _ in range(steps):
        loss = state.model(torch.randn(4, 3, 8, 8)).logsumexp(1).mean()
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.scheduler.step()
        state.progress.step += 1
        state.progress.batch += 1
    return state


def test_a_state_loads_back_whole_into_a_fresh_one():
    saved = trained_state(0, steps=3).state_dict(classes=["a", "b", "c"])
    fresh = trained_state(1, steps=0)
    fresh.load_state_dict(saved, batches=5)
    again = fresh.state_dict(classes=["a", "b", "c"])
    assert all(torch.equal(again["model"][k], v) for k, v in saved["model"].items())
    assert again["scheduler"]["last_epoch"] == saved["scheduler"]["last_epoch"] == 3
    assert again["progress"] == saved["progress"] and fresh.progress.step == 3
    assert fresh.optimizer.state_dict()["state"].keys() == saved["optimizer"]["state"].keys()


def test_another_world_size_resumes_after_the_same_samples_at_an_optimizer_step():
    saved = trained_state(0, steps=3).state_dict(classes=["a", "b", "c"])
    saved["world"] = 4  # 3 batches of 4 on 4 processes: 48 samples, 12 batches of 4 on this one
    fresh = trained_state(1, steps=0)
    fresh.load_state_dict(saved, batches=5)
    assert fresh.progress.batch == 5  # capped at the epoch's length


def test_rng_state_round_trip():
    state = rng_state()
    expected = torch.rand(3)
    torch.rand(5)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


def test_a_changed_lr_applies_from_the_checkpoint_on():
    def build(lr):
        model = torch.nn.Linear(2, 2)
        optim = OptimConfig(name="sgd", lr=lr)
        optimizer = make_optimizer(param_groups(model, optim), optim)
        return optimizer, make_scheduler(optimizer, ScheduleConfig(warmup_epochs=1), steps_per_epoch=4, epochs=3)

    optimizer, scheduler = build(0.1)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)

    optimizer, scheduler = build(0.01)  # the user lowered optim.lr, then started the same command
    wanted = [group["initial_lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    use_new_lr(optimizer, scheduler, wanted, Console(speaks=False))
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.01 * factor] * len(wanted))
    assert scheduler.get_last_lr() == [group["lr"] for group in optimizer.param_groups]
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * scheduler.lr_lambdas[0](7))


def save(state: TrainState, root, step: int) -> None:
    parts = (state.state_dict(["a", "b", "c"]), {"rng": rng_state()})
    checkpoint.save(root, step, parts, rank=0, agree=lambda failed: failed, keep=5)


def test_resume_skips_a_damaged_checkpoint_in_one_line_and_takes_the_one_before(tmp_path, capsys):
    trained = trained_state(0, steps=2)
    save(trained, tmp_path, 2)
    trained.progress.step = 3
    save(trained, tmp_path, 3)
    rank_file = tmp_path / "ckpt-000000003" / "rank0.pt"
    size = rank_file.stat().st_size
    rank_file.write_bytes(rank_file.read_bytes()[:10])
    fresh = trained_state(1, steps=0)
    assert fresh.resume(tmp_path, ["a", "b", "c"], batches=5) == tmp_path / "ckpt-000000002"
    assert fresh.progress.step == 2
    assert capsys.readouterr().out.splitlines() == [
        f"note: checkpoint ckpt-000000003: rank0.pt is truncated (10 of {size} bytes) — skipped; "
        "resuming from ckpt-000000002 instead"
    ]


def test_resume_refuses_when_no_checkpoint_there_can_be_used(tmp_path):
    fresh = trained_state(1, steps=0)
    assert fresh.resume(tmp_path, ["a", "b", "c"], batches=5) is None  # nothing there yet: a new run
    save(trained_state(0, steps=1), tmp_path, 1)
    (tmp_path / "ckpt-000000001" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"^no checkpoint in .* can be used \(ckpt-000000001: state.pt is "):
        fresh.resume(tmp_path, ["a", "b", "c"], batches=5)
