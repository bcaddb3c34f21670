"""Predict the classes of image files and folders with a trained run; one CSV row per image.

    python -m trainer.predict RUN_DIR IMAGES_OR_FOLDERS... [--out preds.csv] [--topk K] [--letterbox]
                              [--checkpoint best|last|final|PATH] [--explain]

Without --out the CSV goes to RUN_DIR/predictions.csv, or if that is taken predictions-2.csv, -3, ...:
an earlier one is never replaced. A given --out is replaced when the new CSV is complete.

Columns: path, class, probability (the top-1), top2_class, top2_probability, ... up to topK, error.
A file that cannot be read gets a row with only its path and the error, and the run goes on: so
does one that is not a regular file (a FIFO, a device, a socket; a symlink to one), which is never
opened, and one above --max-file-size, which is not read. A path that is not UTF-8 is written
with its other bytes as \\xNN.
Images are resized and centre-cropped as in validation, or with --letterbox padded to a square
first so that nothing is cropped away. Needs only the run's config, classes and weights.
Probabilities are softmax(logits / T), T the temperature training fitted on val for these weights
(calibrated: 0.9 means right about 9 times in 10); --no-calibration gives the plain softmax.
--explain adds a Grad-CAM heatmap of the predicted class per image in <csv stem>-explain/ beside
the CSV, named in its last column, explain (trainer.trained.explain).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from toolbox import failpoints
from toolbox.cli import Console, add_debug_flag, progress_bar, run_command
from toolbox.csv_cells import SafeWriter
from toolbox.errors import DataError, UserError
from toolbox.progress import CountLines, lines_wanted
from toolbox.sizes import parse_size
from trainer.rundir import RunDir
from trainer.trained.explain import Overlays, writing_overlays
from trainer.trained.images import image_files, read_image
from trainer.trained.load import Trained, load_trained
from trainer.training.data import close_loaders, worker_signals
from trainer.training.metrics import TTA, predict_logits
from trainer.training.runtime import THREADS_HELP, use_threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run.dir of a training run")
    parser.add_argument("images", type=Path, nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument(
        "--out",
        type=Path,
        help="CSV file to write, replaced if there (default: RUN_DIR/predictions.csv, or the next free "
        "predictions-N.csv: never an earlier one)",
    )
    parser.add_argument("--topk", type=int, default=5, help="classes listed per image (default: 5)")
    parser.add_argument(
        "--letterbox", action="store_true", help="pad to square (keeps the aspect) instead of centre-cropping"
    )
    parser.add_argument("--checkpoint", default="best", help="best | last | final | PATH (default: best)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--tta", choices=TTA, default="none", help="flip: average each image's softmax with its mirror's"
    )
    parser.add_argument(
        "--max-file-size",
        default="256MB",
        help="files larger than this get an error row and are not read (default: 256MB)",
    )
    parser.add_argument(
        "--no-calibration",
        action="store_true",
        help="plain softmax probabilities, without the temperature fitted in training",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also write a heatmap of where the model looked (Grad-CAM of the predicted class) per image into "
        "<csv stem>-explain/ beside the CSV; its explain column names each file",
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: run(args), args.debug, cleanup=close_loaders)


def run(args: argparse.Namespace) -> int:
    if args.topk < 1 or args.batch_size < 1 or args.workers < 0:
        raise UserError("--topk and --batch-size must be at least 1 and --workers at least 0 — fix the option")
    try:
        max_bytes = parse_size(args.max_file_size)
    except ValueError as e:
        raise UserError(f"--max-file-size: {e}") from e
    device = pick_device(args.device)
    Console().say(use_threads(args.threads, args.workers))
    trained = load_trained(args.run_dir, args.checkpoint)
    files = list_inputs(args.images)
    k = min(args.topk, len(trained.classes))
    loader = DataLoader(
        Images(files, trained.preset(args.letterbox), max_bytes),
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_signals,  # a SIGTERM to the group is predict's to answer, not each worker's
    )
    ranks = [f"top{i}_{field}" for i in range(2, k + 1) for field in ("class", "probability")]
    temperature = 1.0 if args.no_calibration or trained.temperature is None else trained.temperature
    print(probabilities_line(trained, args.no_calibration))
    header = ["path", "class", "probability", *ranks, "error"] + (["explain"] if args.explain else [])
    with explaining(args, trained, device) as explain:
        predicted = rows(trained, loader, files, k, device, args.tta, temperature, explain)
        if args.out:
            failed, out = write_csv(args.out, header, predicted), args.out
        else:
            failed, out = write_new(args.run_dir, header, predicted)
        overlays = f"; overlays in {explain.keep(out)}" if explain else ""
    print(f"{len(files) - failed} images predicted, {failed} unreadable; wrote {out}{overlays}")
    return 0


def probabilities_line(trained: Trained, no_calibration: bool) -> str:
    if no_calibration:
        return "probabilities: plain softmax (--no-calibration)"
    if trained.temperature is None:
        return f"probabilities: plain softmax ({trained.weights.name} records no temperature)"
    return f"probabilities: softmax(logits / {trained.temperature:.4f}), calibrated on val in training"


def explaining(args: argparse.Namespace, trained: Trained, device: torch.device):
    """--explain's overlays, written beside where the CSV goes (a context: None without --explain)."""
    if not args.explain:
        return contextlib.nullcontext()
    beside = args.out.parent if args.out else args.run_dir
    return writing_overlays(trained.model.to(device), trained.classes, trained.preprocessing, beside)


def rows(
    trained: Trained,
    loader: DataLoader,
    files: list[Path],
    k: int,
    device: torch.device,
    tta: str = "none",
    temperature: float = 1.0,
    explain: Overlays | None = None,
):
    """Each batch's rows, in file order (errors in place), with how many of them are errors; with
    `explain`, each row ends with its overlay's file name (empty for an error row)."""
    model = trained.model.to(device)
    lines = CountLines("predict", len(files), Console().say, lines_wanted())
    done = 0
    with torch.no_grad():
        for images, indices, errors in progress_bar(loader, len(loader), "predict", True):
            lines.update(done)  # the batches before this one
            done += len(indices) + len(errors)
            batch = {i: [shown(files[i])] + [""] * (2 * k) + [error] for i, error in errors}
            if len(images):
                images = images.to(device, non_blocking=True)
                top = (predict_logits(model, images, tta) / temperature).softmax(1).topk(k, dim=1)
                for i, p, c in zip(indices, top.values.tolist(), top.indices.tolist()):
                    labels = [v for j in range(k) for v in (trained.classes[c[j]], f"{p[j]:.6f}")]
                    batch[i] = [shown(files[i]), *labels, ""]
            if explain:
                named = explain(images, indices, files, top) if len(images) else {}
                for i, row in batch.items():
                    row.append(named.get(i, ""))
            yield [batch[i] for i in sorted(batch)], len(errors)


def write_csv(out: Path, header: list[str], batches) -> int:
    """The CSV written to OUT.tmp and renamed when complete: however the run ends (an error,
    Ctrl-C), an older OUT stays as it was and no .tmp is left. -> the number of error rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # a second predict to the same OUT writes its own
    failed = 0
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = SafeWriter(f)
            writer.writerow(header)
            for n, (batch, errors) in enumerate(batches):
                writer.writerows(batch)
                failed += errors
                if n == 0:
                    failpoints.pause("pause-outputs")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return failed


def write_new(run_dir: Path, header: list[str], batches) -> tuple[int, Path]:
    """The CSV written complete beside the run's others, then given the first free default name.
    -> the number of error rows, and where it went."""
    done = run_dir / f".predictions.{os.getpid()}.csv"  # hidden until it has its name
    try:
        failed = write_csv(done, header, batches)
        return failed, RunDir(run_dir).keep_predictions(done)
    finally:
        done.unlink(missing_ok=True)


def shown(path: Path) -> str:
    """A path as the CSV holds it: a name that is not UTF-8 keeps its other bytes as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no GPU is visible here — run on a GPU node or pass --device cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def list_inputs(paths: list[Path]) -> list[Path]:
    """Files as given (whatever their name: an unreadable one becomes an error row), folders searched."""
    files = []
    for path in paths:
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise UserError(f"folder {path} holds no image files — pass a folder with .jpg/.png/... files")
            files += found
        elif path.exists():  # a FIFO or a device too: its row says it is not a regular file
            files.append(path)
        else:
            raise UserError(f"{path} not found — pass existing image files or folders")
    return files


class Images(Dataset):
    """File i -> (tensor, i, None), or (None, i, why it cannot be read)."""

    def __init__(self, files: list[Path], transform, max_bytes: int):
        self.files, self.transform, self.max_bytes = files, transform, max_bytes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return self.transform(read_image(self.files[i], self.max_bytes)), i, None
        except DataError as e:
            return None, i, str(e).removeprefix(f"{self.files[i]} ")


def collate(batch: list) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    good = [(image, i) for image, i, error in batch if error is None]
    errors = [(i, error) for _, i, error in batch if error is not None]
    images = torch.stack([image for image, _ in good]) if good else torch.empty(0)
    return images, [i for _, i in good], errors
