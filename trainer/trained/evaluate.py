"""Evaluate a trained run on a shard split or an image folder.

    python -m trainer.evaluate RUN_DIR [--checkpoint best|last|final|PATH] [--split val|test|train]
                               [--data SHARDS_OR_IMAGE_FOLDER] [--name NAME] [--tta none|flip]
    accelerate launch [--multi_gpu --num_processes N] -m trainer.evaluate RUN_DIR ...

Writes RUN_DIR/eval/<name>.json (the fields of metrics.jsonl's eval records, and the expected
calibration error before and after the weights' temperature), <name>.png (the confusion matrix;
<name> is e.g. best-test), <name>-top-losses.png (the highest-loss wrong predictions) and
<name>-reliability.png (the reliability diagram), prints the per-class table and the calibration,
and lists the result in report.md's evaluations once training has written the report. Under `accelerate launch` rank r evaluates
samples r, r + N, ... and the sums are all-reduced, so N processes give exactly one's numbers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from shards.format import MANIFEST
from shards.manifest import Manifest
from shards.splits import TEST
from shards.store import is_url
from toolbox import failpoints
from toolbox.cli import Console, add_debug_flag, run_command
from toolbox.errors import UserError
from toolbox.redact import redact
from trainer.rundir import EVAL_FIGURES, REPORT, RunDir
from trainer.trained.images import LabelledImages, labelled_images
from trainer.trained.load import Trained, load_trained
from trainer.training.calibration import BINS, calibration, reliability
from trainer.training.config import TrainConfig
from trainer.training.data import (
    EvalOrder,
    ShardDataset,
    loader_workers,
    make_loader,
    open_shards,
    split_reader,
)
from trainer.training.evaluation import SplitLogits, evaluate, shown_rows
from trainer.training.metrics import TTA, TopLosses, format_table, summarize
from trainer.training.runtime import THREADS_HELP, Launch, close_job, make_accelerator, use_threads
from trainer.training.tracking.plots import plot_confusion, plot_reliability, plot_top_losses
from trainer.training.tracking.report import refresh_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run.dir of a training run")
    parser.add_argument("--checkpoint", default="best", help="best | last | final | PATH (default: best)")
    parser.add_argument(
        "--split",
        default="val",
        help="val, test (the held-out split make_shards keeps from SRC/test/) or train; for a pre-split image "
        "folder, its sub-folder of that split (default: val)",
    )
    parser.add_argument(
        "--data",
        help="make_shards output (a folder or s3://, gs://, http(s):// URL) or a "
        "ROOT/<class>/<image> folder (default: the run's shards)",
    )
    parser.add_argument("--name", help="output name in RUN_DIR/eval/ (default: <checkpoint>-<data>)")
    parser.add_argument("--batch-size", type=int, help="per process (default: the run's train.batch_size)")
    parser.add_argument("--workers", type=int, help="loader processes per process (default: the run's data.workers)")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--tta",
        choices=TTA,
        help="flip: average each image's softmax with its mirror's (default: the run's train.eval_tta)",
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: run(args), args.debug, cleanup=close_job)


def run(args: argparse.Namespace) -> int:
    if args.name is not None and (Path(args.name).name != args.name or args.name in ("", ".", "..")):
        raise UserError(
            f"--name {args.name!r} must be a plain name (no '/', not '..') — it names RUN_DIR/eval/<name>.json"
        )
    trained = load_trained(args.run_dir, args.checkpoint)
    dataset, data_name = eval_dataset(trained, args.data, args.split)
    config = trained.config
    train = replace(config.train, device=args.device, mixed_precision="no", compile="none")
    accelerator = make_accelerator(replace(config, train=train), full_precision(config.train))
    rank, world = accelerator.process_index, accelerator.num_processes
    batch_size = args.batch_size or config.train.batch_size
    workers = config.data.workers if args.workers is None else args.workers
    if accelerator.is_main_process and (note := loader_workers(workers)[1]):
        print(note, file=sys.stderr)
    Console(accelerator.is_main_process).say(use_threads(args.threads, loader_workers(workers)[0]))
    loader = make_loader(
        dataset, EvalOrder(len(dataset), batch_size, rank, world), workers, accelerator.device.type == "cuda"
    )
    model = trained.model.to(accelerator.device)
    tta = args.tta or config.train.eval_tta
    logits, worst = SplitLogits(), TopLosses()
    sums, _ = evaluate(model, loader, len(trained.classes), accelerator, tta=tta, logits_out=logits, worst=worst)
    p = trained.preprocessing
    worst_rows = shown_rows(worst, trained.classes, p.mean, p.std, accelerator)
    gathered = logits.gathered(accelerator)
    if accelerator.is_main_process:
        record = {
            "kind": "eval",
            "checkpoint": str(trained.weights),
            "data": data_name,
            "image_size": trained.preprocessing.image_size,
            "tta": tta,
            **summarize(sums, trained.classes),
            **calibrated(*gathered, trained.temperature),
        }
        name = args.name or f"{trained.name}-{data_name}"
        run = RunDir(args.run_dir)
        figures = {
            "top_losses": lambda path: plot_top_losses(worst_rows, path, f"{name}: highest-loss wrong predictions"),
            "reliability": lambda path: plot_reliability(reliabilities(*gathered, trained.temperature), path, name),
        }
        json_path, png_path = run.write_eval(name, record, confusion_plot(record, trained.classes), figures)
        print(format_table(record))
        print(calibration_line(record, trained))
        shown = ", ".join(str(json_path.with_name(f"{name}{suffix}")) for suffix in EVAL_FIGURES.values())
        print(f"wrote {json_path}, {png_path}, {shown}")
        if refresh_report(run, config, trained.classes):
            print(f"listed in {run.file(REPORT)}")
    accelerator.wait_for_everyone()
    return 0


def calibrated(logits: torch.Tensor, labels: torch.Tensor, temperature: float | None) -> dict:
    """The record's ece, and with the weights' temperature (training fitted it on val) temperature
    and ece_calibrated: this data's calibration before and after it."""
    if temperature is None:
        return {"ece": reliability(logits, labels).ece} if len(labels) else {}
    return calibration(logits, labels, temperature)


def reliabilities(logits: torch.Tensor, labels: torch.Tensor, temperature: float | None) -> dict:
    """The reliability diagram's panels: the plain softmax, and softmax(logits / T) when there is a T."""
    found = {"softmax": reliability(logits, labels)}
    if temperature is not None:
        found[f"softmax(logits / {temperature:.3f})"] = reliability(logits / temperature, labels)
    return found


def calibration_line(record: dict, trained: Trained) -> str:
    if "ece" not in record:
        return "calibration: no samples"
    line = f"calibration ({BINS} bins): ECE {record['ece']:.4f}"
    if "temperature" not in record:
        return f"{line}; {trained.weights.name} records no temperature, so predict and export use the plain softmax"
    return (
        f"{line} -> {record['ece_calibrated']:.4f} with the temperature {record['temperature']:.3f} fitted in training"
    )


def full_precision(trained_with: TrainConfig) -> Launch:
    """Full precision and no compilation, whatever the run or `accelerate launch` chose: the numbers
    should not depend on how training ran. The start-up line says so, and what the run trained in."""
    ran = trained_with.mixed_precision
    precision_from = "evaluate always" + ("" if ran in (None, "no") else f"; the run trained in {ran}")
    return Launch("no", "none", "no", precision_from, "evaluate always")


def eval_dataset(
    trained: Trained, data: str | Path | None, split: str, letterbox: bool = False
) -> tuple[torch.utils.data.Dataset, str]:
    """The samples to evaluate and a short name for them (the split, or the folder's name)."""
    source = str(trained.config.data.shards if data is None else data)
    preset = trained.preset(letterbox)
    if is_url(source) or (Path(source) / MANIFEST).is_file():
        dataset = open_shards(source, trained.config.data, reads=(split,))
        check_split(dataset.manifest, dataset.shown, split)
        if dataset.manifest.classes != trained.classes:
            raise UserError(
                f"the shards {dataset.shown} have other classes than the run ({len(dataset.manifest.classes)} vs "
                f"{len(trained.classes)}) — evaluate on shards made from the same class folders"
            )
        folder = redact(source).rstrip("/").rsplit("/", 1)[-1]
        name = split if data is None else f"{folder}-{split}"
        reader = split_reader(dataset, split, trained.config.data.verify)
        return ShardDataset(reader, preset, num_classes=len(trained.classes)), name
    if data is None:
        raise UserError(f"the run's shards {source} are not there — pass --data SHARDS_OR_IMAGE_FOLDER")
    items, read = labelled_images(Path(source), trained.classes, split)
    name = Path(source).name if read == Path(source) else f"{Path(source).name}-{split}"  # a pre-split folder
    return LabelledImages(items, preset), name


def check_split(manifest: Manifest, shown: str, split: str) -> None:
    """A split the shards lack is one line naming the fix (a test split comes from SRC/test/)."""
    if split in manifest.splits:
        return
    fix = (
        "make the shards from a SRC with a test/ folder beside train/ (`python -m launch.make_shards SRC OUT`), "
        "or evaluate an image folder with --data FOLDER"
        if split == TEST
        else f"pick one of {', '.join(manifest.splits)}"
    )
    raise UserError(f"the shards {shown} have no {split!r} split (they have {', '.join(manifest.splits)}) — {fix}")


def confusion_plot(record: dict, classes: list[str]) -> Callable[[Path], None]:
    def draw(path: Path) -> None:
        failpoints.pause("pause-outputs")  # a test interrupts here: the record written, the plot not
        plot_confusion(record["confusion"], classes, path)

    return draw
