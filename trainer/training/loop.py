"""The training loop: setup -> epochs of (train, evaluate, checkpoint) -> final weights, plots, report.

Read top to bottom as a run goes. The Accelerator is made by the entry point and reaches everything
here through the Job; distributed agreement goes through trainer/runtime.py, the files through
trainer/rundir.py, and what is recorded through the Tracker (enabled on the main process only).
"""

from __future__ import annotations

import itertools
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from toolbox import failpoints
from toolbox.cli import Console
from toolbox.errors import UserError
from toolbox.progress import duration, lines_wanted
from trainer.rundir import CHECKPOINTS, Preprocessing, RunDir, best_eval, mean_throughput
from trainer.training import checkpoint
from trainer.training.build import build_model
from trainer.training.calibration import calibration
from trainer.training.config import Config, eval_size, to_dict, to_yaml, train_size, train_sizes
from trainer.training.data import Loaders, build_loaders, loader_workers, open_shards
from trainer.training.early_stop import EarlyStop
from trainer.training.evaluation import SplitLogits, evaluate, shown_rows
from trainer.training.folds import check_same_folds
from trainer.training.heldout import write_heldout
from trainer.training.meters import STARTUP, EpochLines, TrainWindow, images_per_second
from trainer.training.metrics import TopLosses, summarize
from trainer.training.nonfinite import assert_finite, update_ema
from trainer.training.optim import describe_lr
from trainer.training.randomness import mix_seed, rng_state
from trainer.training.runtime import (
    StopFlag,
    agree,
    any_rank,
    average_buffers,
    said_once,
    share_from_main,
)
from trainer.training.state import Progress, TrainState
from trainer.training.tracking.tracker import Tracker
from trainer.training.transforms import DeviceDecode, DeviceNormalize, TrainPreset, batch_mixer, normalization

STOP_CHECK_EVERY = 5  # optimizer steps between the ranks' agreement on a stop signal (one all-reduce)
NAN_STEPS = failpoints.steps("nan-loss")  # empty unless a test turns the failpoint on
HOLD_STEP = failpoints.step("hold-after-step")


@dataclass
class Job:
    """What every stage of a run uses: settled at start-up, the same for the whole run."""

    config: Config
    accelerator: Accelerator
    run: RunDir
    stop: StopFlag
    console: Console  # says a line once, from the main process
    tracker: Tracker | None = None
    classes: list[str] | None = None

    @property
    def early_stop(self) -> EarlyStop:
        return EarlyStop.of(self.config.train)


@dataclass(frozen=True)
class Ending:
    """How fit left the run: the state for status.json, and for a run stopped early, why."""

    state: str  # completed | preempted | finished (it had completed before: nothing was done)
    reason: str | None = None


@dataclass
class TrainInputs:
    """What a training batch goes through between the loader and the model."""

    loader: torch.utils.data.DataLoader
    batches: int  # micro-batches per epoch, whole optimizer steps
    decode: DeviceDecode | None  # data.decode=device: decoding and augmentation on the device
    normalize: DeviceNormalize
    mixer: object | None  # mixup / cutmix
    criterion: torch.nn.Module

    def load(self, images, labels: torch.Tensor, bad: int, device: torch.device):
        if self.decode is not None:
            images, labels, dropped = self.decode(images, labels)
            bad += dropped
        return self.normalize(images), labels.to(device, non_blocking=True), bad

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixer is not None and len(labels):
            return self.mixer(images, labels)
        return images, labels


def fit(job: Job) -> Ending:
    """The whole run: 'completed' (with the reason when it stopped early), 'preempted' when stopped
    by a signal after a checkpoint, or 'finished' when the run had completed before and nothing was done."""
    config, accelerator = job.config, job.accelerator
    started = setup(job)
    if started is None:
        return Ending("finished")
    state, inputs, loaders = started
    progress = state.progress
    while training_left(config, progress):
        loaders.order.set_epoch(progress.epoch, progress.batch)
        trained = train_one_epoch(state, inputs, job)
        if trained is not None:
            progress.epoch, progress.batch = progress.epoch + 1, 0
            if progress.epoch % config.train.eval_every == 0 or progress.epoch == config.train.epochs:
                evaluate_and_log(state, loaders.val, job, trained)
            else:
                job.console.say(f"{epoch_head(job, state, trained)}  time {duration(trained.epoch_seconds())}")
        save_checkpoint(state, job)
        if trained is None or (training_left(config, progress) and any_rank(job.stop.requested, accelerator)):
            job.tracker.finish(preempted=True)
            return Ending("preempted")
    return Ending("completed", finish_run(state, job, loaders))


def stopped_early(config: Config, progress: Progress) -> str | None:
    """Why training ended before train.epochs: the early stop's reason (None: it did not stop early).
    A function of the checkpointed progress, so every rank, and a resumed run, reach the same answer."""
    return EarlyStop.of(config.train).reason(progress.plateau, progress.epoch, config.train.epochs)


def training_left(config: Config, progress: Progress) -> bool:
    return progress.epoch < config.train.epochs and stopped_early(config, progress) is None


def setup(job: Job) -> tuple[TrainState, TrainInputs, Loaders] | None:
    """Shards -> loaders -> model and its state (resumed) -> run dir files -> tracker. None for a run
    that had completed all its epochs: it is left exactly as it was."""
    config, accelerator = job.config, job.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(mix_seed(config.train.seed, rank))
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    with said_once(accelerator):  # the same data error on every rank is one line, not one per rank
        source = open_shards(config.data.shards, config.data)
        manifest = source.manifest
        job.classes = manifest.classes
        mean, std = normalization(config.data, manifest.mean, manifest.std)
        loaders = build_loaders(config, source, mean, std, rank, world, accelerator.device.type == "cuda")
        if note := loader_workers(config.data.workers)[1]:
            job.console.say(note)
        if not loaders.train.dataset.reader.has_index:
            job.console.say(
                f"note: the shards at {source.shown} have no sample index, so every loader process scans their tar "
                "headers (slow and memory-hungry for big datasets) — re-run make_shards to add one"
            )
        inputs = train_inputs(config, loaders, manifest, (mean, std), accelerator.device, world)
        model = build_model(config, len(job.classes), job.console)  # model.pretrained's errors: one line too
    state = TrainState(
        config,
        model,
        accelerator,
        inputs.batches // config.train.grad_accum,
        job.console,
        manifest.sha256,
    )
    resumed = state.resume(job.run.file(CHECKPOINTS), job.classes, inputs.batches) if config.train.resume else None
    # Only now, with the resume accepted, does anything in the run dir change: a refused one, or
    # the same command on a completed run, leaves its config.yaml and status.json as they were.
    if resumed is not None and completed_before(job, state):
        return None
    changes = resumed_changes(job, state, resumed, manifest.sha256) if resumed is not None else {}
    preprocessing = Preprocessing(mean, std, eval_size(config.data), config.data.crop_pct, config.data.image_size)
    if accelerator.is_main_process:
        if aside := job.run.prepare(to_yaml(config), job.classes, preprocessing, config.train.resume):
            job.console.say(f"note: train.resume=false: the earlier run's files were moved to {aside}")
        job.run.set_status("running")
    accelerator.wait_for_everyone()
    state.prepare()
    step = state.progress.step if state.progress.step or state.progress.epoch else None
    job.tracker = Tracker(config, job.run, job.classes, preprocessing, job.console, step, source)
    if changes:
        job.tracker.log_config_change(state.progress.epoch, state.progress.step, changes)
    announce(job, state, source, loaders.order)
    if loaders.fold is not None:
        job.console.say(loaders.fold.describe())
    return state, inputs, loaders


def resumed_changes(job: Job, state: TrainState, resumed: Path, dataset: str) -> dict[str, tuple]:
    """Where a resume goes on and what changed since its checkpoint, said; a change of folds refused."""
    config = job.config
    changes = config_changes(state.resumed_config, to_dict(config))
    check_same_folds(changes)
    if state.resumed_dataset not in (None, "", dataset):  # allowed by the config
        changes["data (manifest sha256)"] = (state.resumed_dataset, dataset)
    job.console.say(resuming_line(resumed, state.progress, config.train.epochs, stopped_early(config, state.progress)))
    if changes:
        job.console.say(
            "note: resuming with changed settings: "
            + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
        )
    return changes


def completed_before(job: Job, state: TrainState) -> bool:
    """The checkpoint holds every epoch (or an early stop) and the run ended completed: nothing to do,
    said in a line."""
    config, progress = job.config, state.progress
    if training_left(config, progress) or job.run.status().get("state") != "completed":
        return False  # a run killed while writing its final weights goes on to write them
    best = f"best val top-1 {progress.best_top1:.4f} (epoch {progress.best_epoch})"
    if (stopped := stopped_early(config, progress)) is not None:
        further = (
            f"raise train.early_stop_patience above {config.train.early_stop_patience} (0 turns early stopping off)"
        )
        job.console.say(
            f"run {config.run.dir} is complete: {stopped}; {best}; nothing was changed — to train further "
            f"{further}, to start over choose another run.dir"
        )
        return True
    job.console.say(
        f"run {config.run.dir} is complete: {progress.epoch} epochs, {best}; nothing was changed — to train "
        f"further raise train.epochs above {progress.epoch}, to start over choose another run.dir"
    )
    return True


def resuming_line(resumed: Path, progress: Progress, epochs: int, stopped: str | None = None) -> str:
    """Where training goes on. A checkpoint after the last epoch, or after an early stop (`stopped`:
    its reason), of a run that did not end completed (stopped while writing its final weights) leaves
    no epoch to go on to, only the ending."""
    if stopped is not None:
        return (
            f"resuming from {resumed}: training had ended ({stopped}), but the run stopped before it ended — "
            "writing its final weights and report"
        )
    if progress.epoch >= epochs:
        return (
            f"resuming from {resumed}: all {progress.epoch} epochs were trained, but the run stopped before it "
            "ended — writing its final weights and report"
        )
    return f"resuming from {resumed} (epoch {progress.epoch + 1}, step {progress.step})"


def config_changes(before: dict | None, now: dict) -> dict[str, tuple]:
    """section.key -> (the checkpoint's value, this start's) for every setting that differs."""
    if before is None:  # a checkpoint from before checkpoints held the config
        return {}
    changes = {}
    for section, values in now.items():
        for key, value in values.items():
            if key not in before.get(section, {}):  # a key newer than the checkpoint: not a change of the user's
                continue
            old = before[section][key]
            if json.dumps(old, sort_keys=True) != json.dumps(value, sort_keys=True):
                changes[f"{section}.{key}"] = (old, value)
    return changes


def train_inputs(
    config: Config, loaders: Loaders, manifest, norm: tuple[list, list], device, world: int
) -> TrainInputs:
    """The epoch's length in whole optimizer steps, and the device stages: decode (data.decode=device),
    normalise, mix, and the loss."""
    order = loaders.order
    batches = order.steps_per_epoch // config.train.grad_accum * config.train.grad_accum
    if batches == 0:
        raise UserError(
            f"the train split ({order.num_samples} samples) is smaller than one step "
            f"({world} processes x batch {config.train.batch_size} x accumulation {config.train.grad_accum}) — "
            "lower train.batch_size"
        )
    decode = None
    if config.data.decode == "device":  # the workers hand over encoded images
        decode = DeviceDecode(TrainPreset(config.data, *norm).augment, device, config.data.skip_bad_samples)
    normalize = DeviceNormalize(*norm, device, config.train.channels_last)
    criterion = torch.nn.CrossEntropyLoss(
        label_smoothing=config.optim.label_smoothing, weight=class_weights(config, manifest)
    ).to(device)
    return TrainInputs(
        loaders.train, batches, decode, normalize, batch_mixer(config.data, len(manifest.classes)), criterion
    )


def class_weights(config: Config, manifest) -> torch.Tensor | None:
    """data.balance=loss: weight each class by total / (classes x its count)."""
    if config.data.balance != "loss":
        return None
    counts = manifest.splits["train"].class_counts
    counts = torch.tensor([counts.get(c, 0) for c in manifest.classes], dtype=torch.float)
    return counts.sum() / (len(counts) * counts.clamp(min=1))


def announce(job: Job, state: TrainState, source, order) -> None:
    """The start-up lines: what trains, on what, at which rate, and where the shards come from."""
    config, say = job.config, job.console.say
    steps = order.steps_per_epoch // config.train.grad_accum
    say(
        f"training {config.run.name or Path(config.run.dir).name}: {job.accelerator.num_processes} process(es) on "
        f"{job.accelerator.device.type}, {sum(p.numel() for p in state.model.parameters()):,} parameters, "
        f"{steps} steps/epoch, global batch {state.global_batch}, {describe_lr(config.optim, state.global_batch)}"
    )
    if job.early_stop.on:
        say(job.early_stop.describe(config.train.eval_every))
    if config.data.min_size is not None:
        say(describe_ramp(config, compiled=config.train.compile not in (None, "none")))
    if (repeats := config.data.aug_repeats) > 1:
        world = job.accelerator.num_processes
        spread = "each copy on another process" if repeats <= world else f"more copies than the {world} process(es)"
        say(
            f"aug repeats {repeats}: every sample {repeats} times per epoch, differently augmented ({spread}); "
            f"an epoch keeps its {steps} steps and so covers 1/{repeats} of the split"
        )
    if source.cache is not None:
        say(f"shards from {source.shown} through the node cache {source.describe_cache()}")
        if order.blocks is not None and order.blocks.samples_per_block() < order.read_ahead:
            say(
                f"note: a cache block holds ~{order.blocks.samples_per_block()} samples but the loaders read "
                f"{order.read_ahead} ahead, so shards will be fetched more than once an epoch — raise data.cache_limit"
            )


def describe_ramp(config: Config, compiled: bool) -> str:
    """Progressive resizing's start-up line: the train crop side for each run of epochs (1-based)."""
    sizes = train_sizes(config)
    spans = []
    for size, epochs in itertools.groupby(range(1, len(sizes) + 1), key=lambda epoch: sizes[epoch - 1]):
        first, *rest = epochs
        spans.append(f"epochs {first}-{rest[-1]}: {size}" if rest else f"epoch {first}: {size}")
    line = f"progressive resizing: train crop {', '.join(spans)}; validation at {eval_size(config.data)}"
    if compiled:
        line += f" (compiled: one graph per train size, {len(set(sizes))} compiles, each at its first step)"
    return line


def train_one_epoch(state: TrainState, inputs: TrainInputs, job: Job) -> TrainWindow | None:
    """Runs the epoch from progress.batch on -> its window (the epoch's train loss and time); None when
    stopped by a signal (after a whole step)."""
    config, accelerator, progress = job.config, job.accelerator, state.progress
    train_mode(state)
    accum = config.train.grad_accum
    window = TrainWindow(accelerator.device, inputs.loader.dataset.fetched_bytes())
    lines = EpochLines(
        job.console.say,
        progress.epoch + 1,
        config.train.epochs,
        inputs.batches // accum,
        progress.batch // accum,
        state.global_batch,
        job.console.speaks and lines_wanted(),  # a log file's progress; a terminal has the bar
    )
    bar = job.tracker.bar(inputs.loader, total=inputs.batches - progress.batch, desc=f"epoch {progress.epoch + 1}")
    for images, labels, _, bad in bar:
        if progress.batch % accum == 0:
            state.guard.start()
        loss, logits, labels, bad = forward_backward(state, inputs, images, labels, bad)
        window.add(loss, logits, labels, bad)
        progress.batch += 1
        if progress.batch % accum:
            continue
        optimizer_step(state, state.guard.check(loss))  # clips; a non-finite step is skipped on the device
        if not after_step(state, inputs, job, window, lines):
            return None
    return window


def train_mode(state: TrainState) -> None:
    state.model.train()
    if state.config.model.freeze_features:  # frozen features keep their BN statistics too
        state.net.features.eval()


def forward_backward(state: TrainState, inputs: TrainInputs, images, labels: torch.Tensor, bad: int):
    """One micro-batch at progress.batch: onto the device, mixed, forward, loss, backward (the ranks'
    gradients meet on the step's last micro-batch only) -> (loss, logits, labels, bad samples).
    Training and the learning-rate finder both step through here."""
    config, accelerator, progress = state.config, state.accelerator, state.progress
    images, labels, bad = inputs.load(images, labels, bad, accelerator.device)
    # Model-side randomness (dropout, mixup) is a function of the step too, like the data's.
    torch.manual_seed(mix_seed(config.train.seed, progress.epoch, progress.batch, accelerator.process_index))
    images, targets = inputs.mix(images, labels)
    accum = config.train.grad_accum
    sync = progress.batch % accum == accum - 1
    with nullcontext() if sync else accelerator.no_sync(state.model):
        logits = state.model(images)
        loss = inputs.criterion(logits, targets)
        if progress.step + 1 in NAN_STEPS and accelerator.is_main_process:
            loss = loss * float("nan")
        accelerator.backward(loss / accum)
    return loss, logits, labels, bad


def optimizer_step(state: TrainState, good: torch.Tensor) -> None:
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    if state.ema is not None:
        update_ema(state.ema, state.net, state.config.train.ema_decay, good)
    state.progress.step += 1


def after_step(state: TrainState, inputs: TrainInputs, job: Job, window: TrainWindow, lines: EpochLines) -> bool:
    """Progress lines, records, mid-epoch checkpoints and the ranks' stop agreement; False when the
    epoch stops here."""
    config, accelerator, progress = job.config, job.accelerator, state.progress
    STARTUP.step_done(accelerator.device)
    if progress.step == HOLD_STEP and accelerator.is_main_process:
        failpoints.wait_for_release("held", lambda: job.stop.requested)
    ends_epoch = progress.batch == inputs.batches
    records = progress.step % config.train.log_every == 0 or ends_epoch
    lines.step_done(progress.batch // config.train.grad_accum, records, window.local_loss)  # before the window restarts
    if records:
        log_train(state, job, window, inputs.loader.dataset.fetched_bytes())
    if progress.step % STOP_CHECK_EVERY == 0 or ends_epoch:
        stopping, streak = agree(job.stop.requested, state.guard.streak, accelerator)
        state.guard.fail_if_stuck(streak, config.train.max_bad_steps, progress.step)
        if stopping and not ends_epoch:
            return False  # fit writes the checkpoint: one for this step, not a periodic one and then another
    every = config.train.checkpoint_every
    if every and progress.step % every == 0 and not ends_epoch:
        save_checkpoint(state, job)
    return True


def log_train(state: TrainState, job: Job, window: TrainWindow, fetched: int) -> None:
    accelerator, progress = job.accelerator, state.progress
    skipped = state.guard.take_skipped().double().reshape(1) / accelerator.num_processes  # the same on every rank
    totals = accelerator.reduce(torch.cat([window.counts(fetched), skipped]), "sum").tolist()
    loss, correct, seen, bad, fetched_now, skipped_steps = totals
    window.recorded(loss, seen)
    record = {
        "kind": "train",
        "epoch": progress.epoch + 1,
        "step": progress.step,
        "loss": loss / max(seen, 1),
        "acc": correct / max(seen, 1),
        "lr": state.scheduler.get_last_lr()[0],
        "img_per_s": images_per_second(seen, window.seconds()),
        "epoch_time": window.epoch_seconds(),
        "world_size": accelerator.num_processes,
        "image_size": train_size(job.config.data, progress.epoch, job.config.train.epochs),
    }
    if bad:
        record["skipped_bad_samples"] = int(bad)
    if skipped_steps:  # optimizer steps skipped for a non-finite loss or gradient since the last record
        record["skipped_steps"] = round(skipped_steps)
    if fetched_now:  # shards downloaded into the nodes' caches since the last record, all ranks
        record["fetched_mb"] = fetched_now / 1e6
    if (startup := STARTUP.take()) is not None:
        record["startup_s"] = startup
    if accelerator.device.type == "cuda":
        record["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    job.tracker.log(record)
    window.restart(fetched)


def evaluate_and_log(state: TrainState, loader, job: Job, trained: TrainWindow) -> None:
    config, accelerator, progress, tracker = job.config, job.accelerator, state.progress, job.tracker
    net = state.eval_net
    assert_finite(net.state_dict(), "weights", progress.step)  # on every rank alike, before any is written
    average_buffers(net, accelerator)
    rows = config.wandb.sample_predictions if config.wandb.mode != "disabled" else 0
    logits, worst = SplitLogits(), TopLosses()
    sums, shown = evaluate(
        net, loader, len(job.classes), accelerator, rows, config.train.eval_tta, logits_out=logits, worst=worst
    )
    record = {"kind": "eval", "epoch": progress.epoch, "step": progress.step, **summarize(sums, job.classes)}
    record["image_size"], record["tta"] = eval_size(config.data), config.train.eval_tta
    record.update(calibrate(logits, accelerator))  # the temperature goes with these weights
    if config.train.ema:
        record["weights"] = "ema"
    improved = progress.record_eval(record)
    if job.early_stop.on:
        # The main process's value on every rank: ranks that judged numbers differing in the last bit
        # could stop at different steps and leave the others waiting in a collective for ever.
        job.early_stop.update(
            progress.plateau, share_from_main(record[job.early_stop.metric], accelerator), progress.epoch
        )
    tracker.log(record)
    norm = (tracker.preprocessing.mean, tracker.preprocessing.std)
    tracker.log_predictions(shown_rows(shown, job.classes, *norm, accelerator), progress.step)
    if not training_left(config, progress):  # the final evaluation: report.md shows its worst predictions
        tracker.top_losses(shown_rows(worst, job.classes, *norm, accelerator))
    if improved:
        tracker.save_weights("best", net, record)
        if training_left(config, progress):  # the last evaluation's best goes with the final weights
            tracker.log_model(progress.step, ["best"], record)
    job.console.say(
        f"{epoch_head(job, state, trained)}  val top-1 {record['top1']:.4f}  top-5 {record['top5']:.4f}  "
        f"loss {record['loss']:.4f}  ({record['num_samples']} samples)  time {duration(trained.epoch_seconds())}"
        + ("  best" if improved else "")
    )
    tracker.plots()


def epoch_head(job: Job, state: TrainState, trained: TrainWindow) -> str:
    """The epoch's summary line up to its evaluation: which epoch, the step, its mean train loss."""
    progress = state.progress
    return (
        f"epoch {progress.epoch}/{job.config.train.epochs}  step {progress.step}  train loss {trained.epoch_loss():.4f}"
    )


def calibrate(logits: SplitLogits, accelerator: Accelerator) -> dict:
    """The eval record's calibration fields (trainer/training/calibration.py), temperature fitted on
    the whole split's logits on the main process and shared: every rank records the same."""
    found = logits.gathered(accelerator)
    return share_from_main(calibration(*found) if found is not None else None, accelerator)


def save_checkpoint(state: TrainState, job: Job) -> None:
    accelerator, progress = job.accelerator, state.progress
    shared = state.state_dict(job.classes)
    # Every rank holds the same weights and optimizer state, so every rank reaches the same verdict.
    assert_finite({k: shared[k] for k in ("model", "optimizer", "ema")}, "weights or optimizer state", progress.step)
    path = checkpoint.save(
        job.run.file(CHECKPOINTS),
        progress.step,
        (shared, {"rng": rng_state()}),
        accelerator.process_index,
        lambda failed: any_rank(failed, accelerator),
        job.config.train.keep_checkpoints,
    )
    if path is not None:
        job.console.say(f"checkpoint {path} (epoch {progress.epoch + (progress.batch > 0)}, step {progress.step})")


def finish_run(state: TrainState, job: Job, loaders: Loaders) -> str | None:
    """Final weights, summary, plots, report, the held-out predictions, wandb's end -> why training
    stopped early (None: it did not)."""
    config, progress, tracker = job.config, state.progress, job.tracker
    stopped = stopped_early(config, progress)
    if stopped is not None:
        job.console.say(
            f"early stop after epoch {progress.epoch} of {config.train.epochs}: "
            f"{job.early_stop.verdict(progress.plateau)}"
        )
    net = state.eval_net
    assert_finite(net.state_dict(), "final weights", progress.step)
    tracker.save_weights("final", net, progress.last_eval)
    # One model version for the final step, which is the best one too when the last evaluation was.
    aliases = ["final", "best"] if progress.best_epoch == progress.last_eval.get("epoch") else ["final"]
    tracker.log_model(progress.step, aliases, progress.last_eval)
    summary = run_summary(state, job, job.run.records())
    if loaders.fold is not None:
        summary.update(loaders.fold.summary())
    tracker.summarize(summary)
    tracker.plots()
    tracker.write_report(summary)
    job.console.say(write_heldout(net, loaders.val.dataset, job.run, job.accelerator, config))
    early = f"; stopped early at epoch {progress.epoch} of {config.train.epochs}" if stopped else ""
    job.console.say(
        f"done: best val top-1 {progress.best_top1:.4f} (epoch {progress.best_epoch}){early}; run dir {config.run.dir}"
    )
    tracker.finish()
    return stopped


def run_summary(state: TrainState, job: Job, records: list[dict]) -> dict:
    """summary.json and wandb's summary: the columns of a runs table."""
    progress, accelerator = state.progress, job.accelerator
    best, cuda = best_eval(records), accelerator.device.type == "cuda"
    stopped = stopped_early(job.config, progress)
    startup = [r["startup_s"] for r in records if r["kind"] == "train" and "startup_s" in r]  # per process start
    return {
        "best_top1": progress.best_top1,
        "best_top5": best.get("top5"),
        "best_epoch": progress.best_epoch,
        "final_top1": progress.last_eval.get("top1"),
        "final_top5": progress.last_eval.get("top5"),
        "num_val_samples": progress.last_eval.get("num_samples"),
        "parameters": sum(p.numel() for p in state.eval_net.parameters()),
        "epochs": job.config.train.epochs,
        "stopped_early": stopped is not None,
        "stopped_epoch": progress.epoch if stopped else None,  # epochs trained, when fewer than train.epochs
        "stop_reason": stopped,
        "steps": progress.step,
        "world_size": accelerator.num_processes,
        "gpu_type": torch.cuda.get_device_name(accelerator.device) if cuda else None,
        "gpu_count": accelerator.num_processes if cuda else 0,  # one per process
        "img_per_s": mean_throughput(records),
        "startup_s": startup,
        "time_to_first_step_s": startup[0] if startup else None,
    }
