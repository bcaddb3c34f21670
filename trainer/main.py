"""Train an SE-DenseNet on make_shards output.

    accelerate launch trainer/main.py --config configs/demo.yaml [section.key=value ...]

This file owns the Accelerator: everything it calls gets rank, world size or the accelerator as
arguments. It reads as a training run does: setup -> data -> model -> resume -> epochs of
(train, evaluate, checkpoint) -> final weights, plots and report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch trainer/main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin

from shards.manifest import Manifest, ManifestError
from shards.reader import ShardError
from shards.source import SourceError
from trainer import checkpoint
from trainer.checkpoint import CheckpointError
from trainer.config import Config, ConfigError, load_config, to_dict, to_yaml
from trainer.data import (
    EvalOrder,
    ShardBlocks,
    ShardDataset,
    TrainOrder,
    close_loaders,
    make_loader,
    mix_seed,
    open_shards,
    split_index,
)
from trainer.metrics import EvalSums, ShownSamples, summarize
from trainer.model import load_weights, se_densenet
from trainer.nonfinite import NonFiniteError, StepGuard, assert_finite, update_ema
from trainer.optim import describe_lr, make_ema, make_optimizer, make_scheduler, param_groups, scaled_lr
from trainer.report import write_report
from trainer.rundir import PeerFailed, RunDir, RunDirBusy, RunDirError, disk_error_line, is_disk_error, writing
from trainer.tracking import Tracker, TrackingError, read_records
from trainer.transforms import DeviceDecode, DeviceNormalize, EvalPreset, TrainPreset, batch_mixer, normalization

PROCESS_START = time.perf_counter()  # at import (torch loaded): accelerate start-up, compilation and the
# first batches all count towards the time to the first step, logged once per process

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on a signal; start the same command again to resume
EXIT_USAGE = 2
EXIT_FAILURE = 1  # a failure, not a preemption: a job script must not requeue it
EXIT_INTERRUPTED = 130
PREPROCESSING = "preprocessing.json"
STOP_CHECK_EVERY = 5  # optimizer steps between the ranks' agreement on a stop signal (one all-reduce)
# Test-only hooks, off unless set. The main process's loss is NaN at these optimizer steps (1-based):
NAN_STEPS = {int(s) for s in os.environ.get("TRAINER_TEST_NAN_AT_STEPS", "").split(",") if s}
# The main process holds after this optimizer step until checkpoint.RELEASE_ENV's file exists or it
# is asked to stop, so that a test signals or kills a run at a known step instead of racing it.
HOLD_STEP = int(os.environ.get("TRAINER_TEST_HOLD_AFTER_STEP", "0"))


class SetupError(RuntimeError):
    """The machine or run directory cannot run this config (one-line message)."""


USAGE_ERRORS = (
    ConfigError,
    ManifestError,
    ShardError,
    SourceError,
    CheckpointError,
    SetupError,
    TrackingError,
    RunDirBusy,
    RunDirError,
)


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


class StopFlag:
    """SIGTERM/SIGUSR1 only set a flag; the loop checkpoints at the next step all ranks agree on.

    A second SIGTERM exits at once, but only a deliberate one: under Slurm each trainer gets the
    same SIGTERM twice within milliseconds (from slurmstepd and from torch's launcher).
    """

    REPEAT_AFTER_S = 1.0

    def __init__(self):
        self.requested = False
        self.first_term = None
        self.before_exit = None  # says in status.json why the process is about to vanish
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if signum == signal.SIGTERM:
            if self.first_term is not None and now - self.first_term > self.REPEAT_AFTER_S:
                if self.before_exit is not None:
                    self.before_exit()
                os._exit(128 + signum)
            self.first_term = self.first_term or now
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.1")
    args = parser.parse_args(argv)
    config = None
    try:
        config = load_config(args.config, args.overrides)
        return train(config)
    except BaseException as e:
        explained = explain(e, Path(config.run.dir) if config else None)
        if explained is None:  # a bug: its traceback is the report
            raise
        code, line = explained
        if line:
            print(f"error: {line}", file=sys.stderr, flush=True)
        return code
    finally:
        close_loaders()


def explain(e: BaseException, run_dir: Path | None) -> tuple[int, str] | None:
    """The exit code and one line for an expected failure; None for anything else."""
    if isinstance(e, USAGE_ERRORS):
        return EXIT_USAGE, one_line(e)
    if isinstance(e, PeerFailed):
        return e.code, ""
    then = resume_hint(run_dir)
    if isinstance(e, NonFiniteError):
        return EXIT_FAILURE, f"{one_line(e)}, then start the same command: {then}"
    if is_disk_error(e):
        return EXIT_FAILURE, disk_error_line(e, run_dir, then)
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f"interrupted — start the same command again: {then}"
    if isinstance(e, RuntimeError) and torch.distributed.is_initialized():  # a collective failed
        text = str(e).lower()
        if "timed out" in text:
            return EXIT_FAILURE, (
                f"no answer from another process of the job for train.collective_timeout_s (a frozen node or a "
                f"stuck file system?) — this process stops; start the same command: {then}"
            )
        if any(sign in text for sign in ("connection closed by peer", "connection reset by peer", "broken pipe")):
            return (
                EXIT_FAILURE,
                f"another process of the job went away (see its own error) — start the same command: {then}",
            )
    return None


def resume_hint(run_dir: Path | None) -> str:
    done = checkpoint.complete_checkpoints(run_dir / "checkpoints") if run_dir else []
    return f"it resumes from {done[-1].name}" if done else "it starts again (no checkpoint was complete yet)"


def one_line(e: Exception) -> str:
    """A loader worker re-raises our error with its traceback in the message: keep our line."""
    lines = str(e).strip().splitlines()
    for line in reversed(lines):
        if "Error: " in line and line.split("Error: ", 1)[0].endswith(type(e).__name__.removesuffix("Error")):
            return line.split("Error: ", 1)[1]
    return lines[-1] if lines else type(e).__name__


def train(config: Config) -> int:
    stop = StopFlag()  # first: a preemption warning during setup must not kill the process
    accelerator = make_accelerator(config)
    run = claim_run_dir(Path(config.run.dir), accelerator)
    stop.before_exit = lambda: run.set_status("failed", "killed by a second SIGTERM before its checkpoint was written")
    try:
        state = fit(config, accelerator, run, stop)
    except BaseException as e:
        explained = explain(e, run.path)
        line = explained[1] if explained and explained[1] else one_line(e)
        run.set_status("failed", line if explained else f"{type(e).__name__}: {line}")
        if isinstance(e, (NonFiniteError, PeerFailed)) or getattr(e, "agreed", False):
            # Every rank failed here together: none leaves (and gets the main one killed by the
            # launcher) before status.json is written, and the main process alone says why.
            accelerator.wait_for_everyone()
            if not accelerator.is_main_process:
                raise PeerFailed() from None
        raise
    run.set_status(state)
    accelerator.wait_for_everyone()  # no rank leaves while the main one still writes
    return 0 if state == "completed" else EXIT_PREEMPTED


def claim_run_dir(run_dir: Path, accelerator: Accelerator) -> RunDir:
    """One trainer per run dir: the main process locks it before anything is written, and every
    rank learns whether it did."""
    run, error = RunDir(run_dir), None
    if accelerator.is_main_process:
        try:
            note = run.lock()
            if note:
                print(note, flush=True)
        except (RunDirBusy, RunDirError, OSError) as e:
            error = e
    if any_rank(error is not None, accelerator):
        raise error or PeerFailed(EXIT_USAGE)
    return run


def fit(config: Config, accelerator: Accelerator, run: RunDir, stop: StopFlag) -> str:
    """Setup, then epochs of (train, evaluate, checkpoint): 'completed' or 'preempted'."""
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(mix_seed(config.train.seed, rank))
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dataset = open_shards(config.data.shards, config.data)
    manifest = dataset.manifest
    classes = manifest.classes
    run_dir = Path(config.run.dir)
    mean, std = normalization(config.data, manifest.mean, manifest.std)
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, config, classes, mean, std)
        run.set_status("running")
    accelerator.wait_for_everyone()

    train_loader, val_loader, order = build_loaders(
        config, dataset, mean, std, rank, world, accelerator.device.type == "cuda"
    )
    if accelerator.is_main_process and not train_loader.dataset.index.has_index:
        print(
            f"note: the shards at {dataset.shown} have no sample index, so every loader process scans their tar "
            "headers (slow and memory-hungry for big datasets) — re-run make_shards to add one",
            flush=True,
        )
    decode, normalize = device_stages(config, mean, std, accelerator.device)
    batches = order.steps_per_epoch // config.train.grad_accum * config.train.grad_accum
    steps_per_epoch = batches // config.train.grad_accum
    if steps_per_epoch == 0:
        raise SetupError(
            f"the train split ({order.num_samples} samples) is smaller than one step "
            f"({world} processes x batch {config.train.batch_size} x accumulation {config.train.grad_accum}) — "
            "lower train.batch_size"
        )
    model = build_model(config, len(classes))
    global_batch = config.train.batch_size * accelerator.num_processes * config.train.grad_accum
    lr = scaled_lr(config.optim, global_batch)  # optim.lr per optim.lr_base_size images, if set
    optimizer = make_optimizer(param_groups(model, config.optim, model.classifier, lr), config.optim, lr)
    scheduler = make_scheduler(optimizer, config.schedule, steps_per_epoch, config.train.epochs)
    ema = make_ema(model, config.train.ema_decay) if config.train.ema else None
    progress = resume(config, model, optimizer, scheduler, ema, classes, accelerator, batches)
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    criterion = torch.nn.CrossEntropyLoss(
        label_smoothing=config.optim.label_smoothing, weight=class_weights(config, manifest)
    )
    criterion = criterion.to(accelerator.device)
    tracker = Tracker(
        config,
        classes,
        accelerator.is_main_process,
        progress.step if progress.step or progress.epoch else None,
        dataset,
    )
    announce(config, model, dataset, order, steps_per_epoch, global_batch, world, accelerator, tracker)
    mixer = batch_mixer(config.data, len(classes))
    guard = StepGuard(model, optimizer, accelerator, config.optim.grad_clip, progress.bad_streak)

    while progress.epoch < config.train.epochs:
        order.set_epoch(progress.epoch, progress.batch)
        finished = train_one_epoch(
            config,
            model,
            optimizer,
            scheduler,
            ema,
            criterion,
            mixer,
            decode,
            normalize,
            train_loader,
            batches,
            progress,
            accelerator,
            tracker,
            stop,
            guard,
        )
        if finished:
            progress.epoch, progress.batch = progress.epoch + 1, 0
            if progress.epoch % config.train.eval_every == 0 or progress.epoch == config.train.epochs:
                evaluate_and_log(config, model, ema, val_loader, classes, progress, accelerator, tracker)
        save_checkpoint(config, model, optimizer, scheduler, ema, progress, classes, accelerator, tracker, guard)
        if not finished or (progress.epoch < config.train.epochs and any_rank(stop.requested, accelerator)):
            tracker.finish()
            return "preempted"

    finish_run(config, model, ema, classes, progress, accelerator, tracker)
    return "completed"


def announce(config, model, dataset, order, steps_per_epoch, global_batch, world, accelerator, tracker) -> None:
    """The start-up lines: what trains, on what, at which rate, and where the shards come from."""
    tracker.print(
        f"training {config.run.name or Path(config.run.dir).name}: {world} process(es) on {accelerator.device.type}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {steps_per_epoch} steps/epoch, "
        f"global batch {global_batch}, {describe_lr(config.optim, global_batch)}"
    )
    if dataset.cache is not None:
        tracker.print(f"shards from {dataset.shown} through the node cache {dataset.describe_cache()}")
        if order.blocks is not None and order.blocks.samples_per_block() < order.read_ahead:
            tracker.print(
                f"note: a cache block holds ~{order.blocks.samples_per_block()} samples but the loaders read "
                f"{order.read_ahead} ahead, so shards will be fetched more than once an epoch — raise data.cache_limit"
            )


def make_accelerator(config: Config) -> Accelerator:
    has_gpu = torch.cuda.is_available()
    if config.train.device == "cuda" and not has_gpu:
        raise SetupError("train.device=cuda but no GPU is visible here — run on a GPU node or set train.device=cpu")
    use_cpu = config.train.device == "cpu" or not has_gpu
    from trainer.config import resolve_launch

    launch = resolve_launch(config.train, os.environ)
    # Written back before config.yaml and wandb's config are: they say what the run used.
    config.train.mixed_precision, config.train.compile = launch.mixed_precision, launch.compile
    if use_cpu and launch.mixed_precision == "fp16":
        asked = "train.mixed_precision=fp16" if launch.precision_from == "config" else "accelerate launch's fp16"
        raise SetupError(f"{asked} needs a GPU — use bf16 or no on the CPU")
    # Always a plugin of our own: with none, Accelerate would compile whatever the launcher asked for.
    dynamo = TorchDynamoPlugin(backend="no")
    if launch.backend != "no":
        dynamo = TorchDynamoPlugin(backend=launch.backend, mode=launch.compile)
        use_run_dir_compile_cache(Path(config.run.dir))
        # torch reminds whoever passes a checkpoint policy not to mutate tensors inside the region;
        # the efficient dense layer keeps its ReLUs out of place, so the reminder is only noise.
        logging.getLogger("torch._higher_order_ops.wrap").addFilter(
            lambda r: "context_fn is passed" not in r.getMessage()
        )
    # cpu=True makes Accelerate form a gloo group when launched with several processes.
    # A rank that stops answering (a frozen node, a stuck file system) fails the others' next
    # collective after this long, instead of NCCL's or gloo's default wait.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.train.collective_timeout_s))
    accelerator = Accelerator(
        cpu=use_cpu, mixed_precision=launch.mixed_precision, dynamo_plugin=dynamo, kwargs_handlers=[timeout]
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise SetupError(
            f"{launched} processes were launched but they formed a group of {accelerator.num_processes} — "
            "on machines without a GPU set ACCELERATE_USE_CPU=true (or train.device=cpu)"
        )
    if accelerator.is_main_process:
        print_launch(launch, accelerator)
    return accelerator


def print_launch(launch, accelerator: Accelerator) -> None:
    """The conflict notes, then what Accelerate itself will do (its state, not the config)."""
    for note in launch.notes:
        print(note, flush=True)
    backend = accelerator.state.dynamo_plugin.backend.value.lower()
    compiled = "none" if backend == "no" else launch.compile + ("" if backend == "inductor" else f" ({backend})")
    print(
        f"precision {accelerator.mixed_precision} ({launch.precision_from}), compile {compiled} ({launch.compile_from})",
        flush=True,
    )


def use_run_dir_compile_cache(run_dir: Path) -> None:
    """Compiled kernels go beside the checkpoints, so that a job requeued onto another node
    reuses them instead of compiling for minutes again. Importing torch._dynamo already set
    the variable to inductor's default (the node's /tmp); a value of the user's own is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(run_dir.resolve() / "compile_cache")


def prepare_run_dir(run_dir: Path, config: Config, classes: list[str], mean: list[float], std: list[float]) -> None:
    """Fail now, not after an epoch, when the run dir cannot take checkpoints."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-probe"
        probe.write_bytes(b"\0" * 1024)
        probe.unlink()
    except OSError as e:
        raise SetupError(f"cannot write to run.dir {run_dir} ({e.strerror}) — choose a writable run.dir") from None
    free_mb = shutil.disk_usage(run_dir).free / 2**20
    if free_mb < 256:
        raise SetupError(f"run.dir {run_dir} has only {free_mb:.0f} MB free — free space or choose another run.dir")
    old = run_dir / "checkpoints"
    if not config.train.resume and old.exists():  # starting over: set the old run aside, never delete it
        os.replace(old, run_dir / f"checkpoints-replaced-{int(time.time())}")
    (run_dir / "config.yaml").write_text(to_yaml(config))
    (run_dir / "classes.json").write_text(json.dumps(classes, ensure_ascii=False, indent=1))
    # What evaluate/predict/export need to preprocess like training did, without the shards.
    preprocessing = {"mean": mean, "std": std, "image_size": config.data.image_size, "crop_pct": config.data.crop_pct}
    (run_dir / PREPROCESSING).write_text(json.dumps(preprocessing, indent=1))


def build_loaders(config: Config, dataset, mean: list, std: list, rank: int, world: int, pin: bool):
    train_index, val_index = split_index(dataset, "train"), split_index(dataset, "val")
    labels = train_index.labels() if config.data.balance == "sampler" else None
    files = train_index.files
    # A cache smaller than the data: read the epoch block by block (data/ShardBlocks)
    budget = dataset.block_budget
    blocks = ShardBlocks(files.counts, files.sizes, budget) if budget is not None else None
    order = TrainOrder(
        len(train_index), config.train.batch_size, rank, world, config.train.seed, labels, blocks, files.prefetcher()
    )
    # data.decode=device: the workers hand over encoded images; DeviceDecode augments on the device
    train_preset = TrainPreset(config.data, mean, std) if config.data.decode == "workers" else None
    train_set = ShardDataset(train_index, train_preset, config.data.skip_bad_samples)
    val_set = ShardDataset(val_index, EvalPreset(config.data.image_size, config.data.crop_pct, mean, std))
    val_order = EvalOrder(len(val_index), config.train.batch_size, rank, world)
    workers = config.data.workers
    return make_loader(train_set, order, workers, pin), make_loader(val_set, val_order, workers, pin), order


def device_stages(
    config: Config, mean: list, std: list, device: torch.device
) -> tuple[DeviceDecode | None, DeviceNormalize]:
    """What a training batch goes through on the device: decoding and augmentation when
    data.decode=device, then normalisation."""
    decode = None
    if config.data.decode == "device":
        decode = DeviceDecode(TrainPreset(config.data, mean, std).augment, device, config.data.skip_bad_samples)
    return decode, DeviceNormalize(mean, std, device, config.train.channels_last)


def build_model(config: Config, num_classes: int) -> torch.nn.Module:
    m = config.model
    model = se_densenet(
        m.depth,
        num_classes,
        growth_rate=m.growth_rate,
        num_init_features=m.num_init_features,
        bn_size=m.bn_size,
        compression=m.compression,
        drop_rate=m.drop_rate,
        se=m.se,
        se_reduction=m.se_reduction,
        efficient=m.efficient,
        small_inputs=m.small_inputs,
        block_config=tuple(m.block_config) if m.block_config else None,
        shared_bn=m.shared_bn,
    )
    if m.pretrained:
        report = load_weights(model, m.pretrained, strict=False)
        expected = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
        loaded = len(expected) - len(report.missing)
        if loaded == 0:  # nothing matched: a wrong file, not a starting point
            raise SetupError(
                f"model.pretrained {m.pretrained} shares no weights with this model — give a DenseNet weights file"
            )
        print(
            f"initialised from {m.pretrained}: {loaded} tensors loaded, {len(report.missing)} left at init "
            f"(new head or SE), {len(report.unexpected)} ignored",
            flush=True,
        )
    if m.freeze_features:
        model.features.requires_grad_(False)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def class_weights(config: Config, manifest: Manifest) -> torch.Tensor | None:
    """data.balance=loss: weight each class by total / (classes x its count)."""
    if config.data.balance != "loss":
        return None
    counts = torch.tensor(
        [manifest.splits["train"].class_counts.get(c, 0) for c in manifest.classes], dtype=torch.float
    )
    return counts.sum() / (len(counts) * counts.clamp(min=1))


def resume(config, model, optimizer, scheduler, ema, classes, accelerator, batches) -> Progress:
    root = Path(config.run.dir) / "checkpoints"
    if not config.train.resume:
        return Progress()
    found = checkpoint.load_newest(root, accelerator.process_index)
    if found is None:
        return Progress()
    path, state, rank_state = found
    checkpoint.check_compatible(state, model.fingerprint(), classes, path)
    model.load_state_dict(state["model"])
    wanted = [group["initial_lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scheduler.base_lrs != wanted:
        use_new_lr(optimizer, scheduler, wanted, accelerator.is_main_process)
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    if accelerator.scaler is not None and state.get("scaler") is not None:  # fp16 loss scale
        accelerator.scaler.load_state_dict(state["scaler"])
    if rank_state is not None:
        checkpoint.set_rng_state(rank_state["rng"])
    progress = Progress(**state["progress"])
    if state["world"] != accelerator.num_processes:  # same samples consumed, re-split over the new world
        consumed = progress.batch * state["world"] * state["batch_size"]
        batch = min(batches, consumed // (accelerator.num_processes * config.train.batch_size))
        progress.batch = batch // config.train.grad_accum * config.train.grad_accum  # at an optimizer step
    if accelerator.is_main_process:
        print(f"resuming from {path} (epoch {progress.epoch + 1}, step {progress.step})", flush=True)
    return progress


def use_new_lr(optimizer, scheduler, wanted: list[float], verbose: bool) -> None:
    """The lr changed since the checkpoint (a new optim.lr, or a new global batch with
    optim.lr_base_size): the schedule goes on from where it was, at the new rate."""
    if verbose:
        print(
            f"the learning rate differs from the checkpoint's ({scheduler.base_lrs[0]:.6g}): continuing at "
            f"{wanted[0]:.6g}",
            flush=True,
        )
    scheduler.base_lrs = list(wanted)
    for group, lr, factor in zip(optimizer.param_groups, wanted, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def train_one_epoch(
    config,
    model,
    optimizer,
    scheduler,
    ema,
    criterion,
    mixer,
    decode,
    normalize,
    loader,
    batches,
    progress,
    accelerator,
    tracker,
    stop,
    guard,
) -> bool:
    """Runs the epoch from progress.batch on; False when stopped by a signal (after a whole step)."""
    model.train()
    if config.model.freeze_features:  # frozen features keep their BN statistics too
        accelerator.unwrap_model(model, keep_torch_compile=False).features.eval()
    accum = config.train.grad_accum
    # Summed on the device and read only when logged: a .item() per step would stall the GPU queue.
    window = {
        "sums": torch.zeros(2, dtype=torch.float64, device=accelerator.device),
        "seen": 0,
        "bad": 0,
        "start": time.perf_counter(),
        "fetched": loader.dataset.fetched_bytes,
        "fetched_before": loader.dataset.fetched_bytes(),
    }
    epoch_start = time.perf_counter()
    bar = tracker.progress(loader, total=batches - progress.batch, desc=f"epoch {progress.epoch + 1}")
    for images, labels, _, bad in bar:
        micro = progress.batch % accum
        if micro == 0:
            guard.start()
        if decode is not None:
            images, labels, dropped = decode(images, labels)
            bad += dropped
        window["bad"] += bad
        images = normalize(images)
        labels = labels.to(accelerator.device, non_blocking=True)
        # Model-side randomness (dropout, mixup) is a function of the step too, like the data's.
        torch.manual_seed(mix_seed(config.train.seed, progress.epoch, progress.batch, accelerator.process_index))
        targets = labels
        if mixer is not None and len(labels):
            images, targets = mixer(images, labels)
        sync = micro == accum - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            logits = model(images)
            loss = criterion(logits, targets)
            if progress.step + 1 in NAN_STEPS and accelerator.is_main_process:
                loss = loss * float("nan")
            accelerator.backward(loss / accum)
        window["sums"] += torch.stack([loss.detach() * len(labels), (logits.detach().argmax(1) == labels).sum()])
        window["seen"] += len(labels)
        progress.batch += 1
        if not sync:
            continue
        good = guard.check(loss)  # clips; a non-finite step is skipped on the device
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            update_ema(ema, accelerator.unwrap_model(model, keep_torch_compile=False), config.train.ema_decay, good)
        progress.step += 1
        STARTUP.step_done(accelerator)
        if progress.step == HOLD_STEP and accelerator.is_main_process:
            hold_for_tests(stop)
        if progress.step % config.train.log_every == 0 or progress.batch == batches:
            log_train(window, scheduler, progress, accelerator, tracker, time.perf_counter() - epoch_start, guard)
        if (
            config.train.checkpoint_every
            and progress.step % config.train.checkpoint_every == 0
            and progress.batch < batches
        ):
            save_checkpoint(
                config, model, optimizer, scheduler, ema, progress, tracker.classes, accelerator, tracker, guard
            )
        if progress.step % STOP_CHECK_EVERY == 0 or progress.batch == batches:
            stopping, streak = agree(stop.requested, guard.streak, accelerator)
            guard.fail_if_stuck(streak, config.train.max_bad_steps, progress.step)
            if stopping and progress.batch < batches:
                return False
    return True


def hold_for_tests(stop: StopFlag) -> None:
    release = Path(os.environ[checkpoint.RELEASE_ENV])
    Path(f"{release}.held").write_text("")
    deadline = time.monotonic() + 600
    while not (release.exists() or stop.requested) and time.monotonic() < deadline:
        time.sleep(0.05)


def agree(stop: bool, streak: torch.Tensor, accelerator: Accelerator) -> tuple[bool, int]:
    """The ranks' periodic agreement: whether any was asked to stop, and the non-finite streak
    (the same on every rank: it is judged on all-reduced gradients). One small all-reduce."""
    flags = torch.stack([torch.tensor(float(stop), device=accelerator.device), streak.float()])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")
    stop_now, streak_now = flags.tolist()
    return stop_now > 0, int(streak_now)


def any_rank(flag: bool, accelerator: Accelerator) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


class StartupClock:
    """Seconds from process start to the end of its first optimizer step (compile included),
    for the first train record the process logs."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.logged = False

    def step_done(self, accelerator: Accelerator) -> None:
        if self.seconds is None:
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()  # once: the first step's kernels are part of it
            self.seconds = time.perf_counter() - PROCESS_START

    def take(self) -> float | None:
        if self.logged or self.seconds is None:
            return None
        self.logged = True
        return self.seconds


STARTUP = StartupClock()


def log_train(window, scheduler, progress, accelerator, tracker, epoch_time, guard) -> None:
    fetched = window["fetched"]()
    counts = torch.tensor(
        [window["seen"], window["bad"], fetched - window["fetched_before"]],
        dtype=torch.float64,
        device=accelerator.device,
    )
    skipped = guard.take_skipped().double().reshape(1) / accelerator.num_processes  # the same count on every rank
    totals = accelerator.reduce(torch.cat([window["sums"], counts, skipped]), "sum").tolist()
    loss, correct, seen, bad, fetched_now, skipped_steps = totals
    elapsed = time.perf_counter() - window["start"]
    record = {
        "kind": "train",
        "epoch": progress.epoch + 1,
        "step": progress.step,
        "loss": loss / max(seen, 1),
        "acc": correct / max(seen, 1),
        "lr": scheduler.get_last_lr()[0],
        "img_per_s": seen / max(elapsed, 1e-9),
        "epoch_time": epoch_time,
        "world_size": accelerator.num_processes,
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
    tracker.log(record)
    window.update(
        sums=torch.zeros_like(window["sums"]), seen=0, bad=0, start=time.perf_counter(), fetched_before=fetched
    )


@torch.no_grad()
def evaluate(model, loader, num_classes: int, accelerator: Accelerator, tracker: Tracker, sample_rows: int = 0):
    """Sums over this rank's share of the split, all-reduced: every sample counted exactly once."""
    model.eval()
    sums = EvalSums.zeros(num_classes, accelerator.device)
    shown = ShownSamples(sample_rows)
    for images, labels, _, _ in tracker.progress(loader, total=len(loader), desc="eval"):
        images = images.to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(images)
        sums.add(logits.float(), labels)
        shown.add(images, logits.float().softmax(1), labels)
    if accelerator.num_processes > 1:
        sums = EvalSums(*[accelerator.reduce(t, "sum") for t in sums.tensors()])
    return sums, shown


def average_buffers(net: torch.nn.Module, accelerator: Accelerator) -> None:
    """Each rank's BN running stats saw only its own last batches: use their mean everywhere."""
    buffers = [b for b in net.buffers() if b.is_floating_point()]
    if accelerator.num_processes == 1 or not buffers:
        return
    flat = accelerator.reduce(torch.cat([b.detach().reshape(-1) for b in buffers]), "mean")
    for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.copy_(value.view_as(buffer))


def evaluate_and_log(config, model, ema, loader, classes, progress, accelerator, tracker) -> None:
    net = ema.module if ema is not None else accelerator.unwrap_model(model, keep_torch_compile=False)
    assert_finite(net.state_dict(), "weights", progress.step)  # on every rank alike, before any is written
    average_buffers(net, accelerator)
    rows = config.wandb.sample_predictions if config.wandb.mode != "disabled" else 0
    sums, shown = evaluate(net, loader, len(classes), accelerator, tracker, rows)
    record = {"kind": "eval", "epoch": progress.epoch, "step": progress.step, **summarize(sums, classes)}
    if config.train.ema:
        record["weights"] = "ema"
    progress.last_eval = {k: record[k] for k in ("epoch", "step", "top1", "top5", "loss", "num_samples")}
    tracker.log(record)
    tracker.log_predictions(prediction_rows(shown, classes, loader.dataset.transform, accelerator), progress.step)
    improved = record["top1"] > progress.best_top1
    if improved:
        progress.best_top1, progress.best_epoch = record["top1"], progress.epoch
        if accelerator.is_main_process:
            export_weights(net, config, classes, Path(config.run.dir) / "best.safetensors", record)
        if progress.epoch < config.train.epochs:  # the last evaluation's best goes with the final weights
            tracker.log_model(progress.step, ["best"], record)
    tracker.print(
        f"epoch {progress.epoch}/{config.train.epochs}  step {progress.step}  val top-1 {record['top1']:.4f}  "
        f"top-5 {record['top5']:.4f}  loss {record['loss']:.4f}  ({record['num_samples']} samples)"
        + ("  best" if improved else "")
    )
    tracker.plots()


def prediction_rows(shown: ShownSamples, classes, transform, accelerator: Accelerator) -> list[tuple]:
    """Every rank's shown samples, ranked together on the main process (the others get []):
    (picture, true class, predicted class, probability), the most confidently wrong first."""
    if shown.limit == 0:
        return []
    rows = []
    if shown.keys is not None:
        mean = torch.tensor(transform.transform.transforms[-1].mean)[:, None, None]
        std = torch.tensor(transform.transform.transforms[-1].std)[:, None, None]
        pictures = ((shown.images.cpu() * std + mean).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()
        for key, picture, p, label in zip(shown.keys.tolist(), pictures, shown.probs.cpu(), shown.labels.tolist()):
            rows.append((key, picture, classes[label], classes[int(p.argmax())], float(p.max())))
    if accelerator.num_processes > 1:  # a few small pictures per rank, to the main process only
        parts = [None] * accelerator.num_processes if accelerator.is_main_process else None
        torch.distributed.gather_object(rows, parts, dst=0)
        rows = [row for part in parts or [] for row in part]
    rows.sort(key=lambda row: -row[0])
    return [row[1:] for row in rows[: shown.limit]]


def save_checkpoint(config, model, optimizer, scheduler, ema, progress, classes, accelerator, tracker, guard) -> None:
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    progress.bad_streak = int(guard.streak.item())
    state = {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "progress": vars(progress).copy(),
        "epoch": progress.epoch,
        "world": accelerator.num_processes,
        "batch_size": config.train.batch_size,
        "fingerprint": net.fingerprint(),
        "classes": classes,
        "config": to_dict(config),
    }
    # Every rank holds the same weights and optimizer state, so every rank reaches the same verdict.
    assert_finite({k: state[k] for k in ("model", "optimizer", "ema")}, "weights or optimizer state", progress.step)
    root = Path(config.run.dir) / "checkpoints"
    path = checkpoint.save(
        root,
        progress.step,
        state,
        accelerator.process_index,
        lambda failed: any_rank(failed, accelerator),
        config.train.keep_checkpoints,
    )
    if path is not None:
        tracker.print(f"checkpoint {path} (epoch {progress.epoch + (progress.batch > 0)}, step {progress.step})")


def export_weights(net: torch.nn.Module, config: Config, classes: list[str], path: Path, record: dict | None) -> None:
    """Plain weights that load with the model API alone; the metadata says how to build it."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items() if k != "n_averaged"}
    metadata = {
        "config": json.dumps(to_dict(config)),
        "classes": json.dumps(classes, ensure_ascii=False),
        "fingerprint": net.fingerprint(),
        "preprocessing": (Path(config.run.dir) / PREPROCESSING).read_text(),
    }
    if record is not None:
        metadata["eval"] = json.dumps({k: record[k] for k in ("epoch", "step", "top1", "top5", "num_samples")})
    tmp = path.with_suffix(".tmp")
    try:
        with writing(path), open(tmp, "wb") as f:  # safetensors' own writer hides a full disk's errno
            f.write(safetensors.torch.save(tensors, metadata=metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a partial file from a full disk


def finish_run(config, model, ema, classes, progress, accelerator, tracker) -> None:
    run_dir = Path(config.run.dir)
    net = ema.module if ema is not None else accelerator.unwrap_model(model, keep_torch_compile=False)
    assert_finite(net.state_dict(), "final weights", progress.step)
    if accelerator.is_main_process:
        export_weights(net, config, classes, run_dir / "final.safetensors", progress.last_eval or None)
    # One model version for the final step, which is the best one too when the last evaluation was.
    aliases = ["final", "best"] if progress.best_epoch == progress.last_eval.get("epoch") else ["final"]
    tracker.log_model(progress.step, aliases, progress.last_eval)
    records = read_records(run_dir / "metrics.jsonl")
    best = next((r for r in records if r["kind"] == "eval" and r["epoch"] == progress.best_epoch), {})
    cuda = accelerator.device.type == "cuda"
    summary = {
        "best_top1": progress.best_top1,
        "best_top5": best.get("top5"),
        "best_epoch": progress.best_epoch,
        "final_top1": progress.last_eval.get("top1"),
        "final_top5": progress.last_eval.get("top5"),
        "num_val_samples": progress.last_eval.get("num_samples"),
        "parameters": sum(p.numel() for p in net.parameters()),
        "epochs": config.train.epochs,
        "steps": progress.step,
        "world_size": accelerator.num_processes,
        "gpu_type": torch.cuda.get_device_name(accelerator.device) if cuda else None,
        "gpu_count": accelerator.num_processes if cuda else 0,  # one per process
    }
    trains = [r for r in records if r["kind"] == "train"]
    rates = [r["img_per_s"] for r in trains[1:]]
    summary["img_per_s"] = sum(rates) / len(rates) if rates else None  # the first window holds start-up
    summary["startup_s"] = [r["startup_s"] for r in trains if "startup_s" in r]  # per process start (resumes)
    summary["time_to_first_step_s"] = summary["startup_s"][0] if summary["startup_s"] else None
    tracker.summarize(summary)
    tracker.plots()
    if accelerator.is_main_process:
        write_report(run_dir, config, classes, summary)
    tracker.print(f"done: best val top-1 {progress.best_top1:.4f} (epoch {progress.best_epoch}); run dir {run_dir}")
    tracker.finish()


if __name__ == "__main__":
    sys.exit(main())
