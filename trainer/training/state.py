"""The training state: model, optimizer, scheduler, EMA, loss scaler, the non-finite guard and where
the run stands. One object, saved and restored through state_dict / load_state_dict, so a resume is
`state.resume(...)` and the loop takes the state, not a dozen of its parts (dinov2's do_train)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from toolbox.cli import Console
from trainer.training import checkpoint
from trainer.training.checkpoint import CheckpointError
from trainer.training.config import Config, to_dict
from trainer.training.early_stop import Plateau
from trainer.training.nonfinite import StepGuard
from trainer.training.optim import make_ema, make_optimizer, make_scheduler, param_groups, scaled_lr
from trainer.training.randomness import set_rng_state
from trainer.training.runtime import any_rank, gather_to_main, share_from_main


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0
    batch: int = 0  # next micro-batch of the epoch
    step: int = 0  # optimizer steps done
    best_top1: float = -1.0
    best_epoch: int = -1
    last_eval: dict = field(default_factory=dict)
    bad_streak: int = 0  # non-finite steps in a row (train.max_bad_steps)
    plateau: Plateau = field(default_factory=Plateau)  # early stopping's count

    @classmethod
    def from_dict(cls, values: dict) -> Progress:
        """A checkpoint's progress; one from before early stopping has no plateau and starts a count."""
        values = dict(values)
        plateau = Plateau(**values.pop("plateau", {}))
        return cls(**values, plateau=plateau)

    def record_eval(self, record: dict) -> bool:
        """Keeps the evaluation's headline; True when it is the best top-1 so far (the first of equals)."""
        self.last_eval = {k: record[k] for k in ("epoch", "step", "top1", "top5", "loss", "num_samples")}
        if "temperature" in record:  # the final weights' calibration, through a resume too
            self.last_eval["temperature"] = record["temperature"]
        improved = record["top1"] > self.best_top1
        if improved:
            self.best_top1, self.best_epoch = record["top1"], record["epoch"]
        return improved


class TrainState:
    """Built unprepared (plain model and optimizer, so a checkpoint loads into them), then prepare()d
    for the accelerator; the loop reads and steps its parts."""

    def __init__(
        self,
        config: Config,
        model: torch.nn.Module,
        accelerator: Accelerator,
        steps_per_epoch: int,
        console: Console | None = None,
        dataset: str = "",
    ):
        self.config, self.accelerator = config, accelerator
        self.console = console or Console(accelerator.is_main_process)
        self.global_batch = config.train.batch_size * accelerator.num_processes * config.train.grad_accum
        lr = scaled_lr(config.optim, self.global_batch)  # optim.lr per optim.lr_base_size images, if set
        self.model = model
        self.optimizer = make_optimizer(param_groups(model, config.optim, model.classifier, lr), config.optim, lr)
        self.scheduler = make_scheduler(self.optimizer, config.schedule, steps_per_epoch, config.train.epochs)
        self.ema = make_ema(model, config.train.ema_decay) if config.train.ema else None
        self.progress = Progress()
        self.guard: StepGuard | None = None
        self.dataset = dataset  # the shards' manifest sha256: a resume on other data is refused
        self.resumed_config: dict | None = None  # the config the resumed checkpoint was trained with
        self.resumed_dataset: str | None = None  # the manifest the resumed checkpoint was trained on

    def prepare(self) -> None:
        """Wraps model and optimizer for the processes (DDP, precision, compile); after any resume."""
        a = self.accelerator
        self.model, self.optimizer = a.prepare(self.model, self.optimizer)
        if self.ema is not None:
            self.ema.to(a.device)
        self.guard = StepGuard(self.model, self.optimizer, a, self.config.optim.grad_clip, self.progress.bad_streak)

    @property
    def net(self) -> torch.nn.Module:
        """The plain model, without DDP or compile wrappers."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def eval_net(self) -> torch.nn.Module:
        """The weights that are evaluated and exported: the EMA's when train.ema is on."""
        return self.ema.module if self.ema is not None else self.net

    def state_dict(self, classes: list[str]) -> dict:
        """What rank 0 writes: everything but the RNG states, which each rank saves for itself."""
        scaler = self.accelerator.scaler
        if self.guard is not None:
            self.progress.bad_streak = int(self.guard.streak.item())
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "progress": asdict(self.progress),
            "epoch": self.progress.epoch,
            "world": self.accelerator.num_processes,
            "batch_size": self.config.train.batch_size,
            "fingerprint": self.net.fingerprint(),
            "classes": classes,
            "config": to_dict(self.config),
            "dataset": self.dataset,
        }

    def load_state_dict(self, state: dict, batches: int) -> None:
        """batches: micro-batches per epoch now; a checkpoint of another world size resumes after the
        same samples, re-split over the new world at an optimizer step."""
        self.model.load_state_dict(state["model"])
        wanted = [group["initial_lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scheduler.base_lrs != wanted:
            use_new_lr(self.optimizer, self.scheduler, wanted, self.console)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.accelerator.scaler is not None and state.get("scaler") is not None:  # fp16 loss scale
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.progress = Progress.from_dict(state["progress"])
        self.resumed_config, self.resumed_dataset = state.get("config"), state.get("dataset")
        world, batch_size = self.accelerator.num_processes, self.config.train.batch_size
        if state["world"] != world:
            consumed = self.progress.batch * state["world"] * state["batch_size"]
            batch = min(batches, consumed // (world * batch_size))
            self.progress.batch = batch // self.config.train.grad_accum * self.config.train.grad_accum

    def resume(self, root: Path, classes: list[str], batches: int) -> Path | None:
        """Loads the newest checkpoint under root that every rank can read and verify; returns its
        path (None: there is none yet). The ranks agree on each candidate before any loads it, so
        one damaged rank file moves them all back together; each one skipped is one line."""
        a = self.accelerator

        def agree(path: Path, why: str | None) -> str | None:
            reasons = gather_to_main([why] if why else [], a)  # the main process says why
            return (reasons[0] if reasons else path.name) if any_rank(why is not None, a) else None

        names = share_from_main([p.name for p in reversed(checkpoint.complete_checkpoints(root))], a)
        read = lambda path: checkpoint.read(path, a.process_index)
        path, found, skipped = checkpoint.newest_usable([root / name for name in names], read, agree)
        if path is None:
            if skipped:  # checkpoints there, none usable: starting over silently would bury them
                raise CheckpointError(
                    f"no checkpoint in {root} can be used ({'; '.join(skipped)}) — restore one from a copy, "
                    "or set train.resume=false to start over (they are moved aside, not deleted)"
                )
            return None
        state, own = found
        try:
            check_compatible(state, self.model.fingerprint(), classes, path)
            if state.get("dataset") not in (None, "", self.dataset) and not self.config.train.resume_on_new_data:
                raise CheckpointError(
                    f"the shards at {self.config.data.shards} are not the ones checkpoint {path} was trained on "
                    f"(manifest sha256 {state['dataset'][:12]}..., now {self.dataset[:12]}...): its val split may "
                    "hold samples it trained on — resume on the shards it started with, use a new run.dir, or set "
                    "train.resume_on_new_data=true to go on anyway (recorded in metrics.jsonl)"
                )
        except CheckpointError as e:
            e.agreed = True  # every rank read the same verified file: the main process alone says so
            raise
        self.load_state_dict(state, batches)
        if own is not None:
            set_rng_state(own["rng"])
        for why in skipped:
            self.console.say(f"note: checkpoint {why} — skipped; resuming from {path.name} instead")
        return path


def use_new_lr(optimizer, scheduler, wanted: list[float], console: Console) -> None:
    """The lr changed since the checkpoint (a new optim.lr, or a new global batch with
    optim.lr_base_size): the schedule goes on from where it was, at the new rate."""
    console.say(
        f"the learning rate differs from the checkpoint's ({scheduler.base_lrs[0]:.6g}): continuing at {wanted[0]:.6g}"
    )
    scheduler.base_lrs = list(wanted)
    for group, lr, factor in zip(optimizer.param_groups, wanted, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def check_compatible(state: dict, fingerprint: str, classes: list[str], path: Path) -> None:
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} is of another model ({state.get('fingerprint')}, this run: {fingerprint}) — "
            "use a new run.dir, or set train.resume=false to start over in this one"
        )
    if state.get("classes") != classes:
        raise CheckpointError(
            f"checkpoint {path} was trained on other classes ({len(state.get('classes') or [])} vs {len(classes)} now) — "
            "use a new run.dir for this dataset"
        )
