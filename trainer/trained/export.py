"""Export a trained run to ONNX and/or TorchScript, checked against the PyTorch model.

    python -m trainer.export RUN_DIR [--checkpoint best|last|final|PATH] [--format onnx torchscript]
                             [--data SHARDS_OR_IMAGE_FOLDER] [--letterbox] [--tolerance 1e-3] [--no-wandb]

Writes RUN_DIR/export/model.onnx (batch dimension dynamic), model.torchscript.pt and model.json:
classes, mean/std, input size, the resize/crop (or letterbox) steps, the temperature, and the
parity results. The models output logits; calibrated probabilities are softmax(logits / temperature),
as `trainer.predict` gives them (temperature 1 for weights that record none, or with --no-calibration).
The same metadata is inside each model file (ONNX metadata_props; TorchScript extra file
model.json). Parity: real validation images through the exported model and through PyTorch;
the largest absolute logit difference is reported, and above --tolerance the export fails and
leaves no model file behind. The files then join the training run in wandb (the same run id,
as the run's config.yaml sets wandb up) as an `exported-model` artifact.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from toolbox.cli import add_debug_flag, run_command
from toolbox.errors import UserError
from trainer.rundir import EXPORT as EXPORT_DIR
from trainer.trained.evaluate import eval_dataset
from trainer.trained.load import Trained, load_trained
from trainer.training.data import close_loaders
from trainer.training.tracking.wandb_run import log_export

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
OPSET = 17


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run.dir of a training run")
    parser.add_argument("--checkpoint", default="best", help="best | last | final | PATH (default: best)")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--out-dir", type=Path, help="default: RUN_DIR/export")
    parser.add_argument(
        "--data", help="shards (folder or URL) or images for the parity check (default: the run's val shards)"
    )
    parser.add_argument("--split", default="val")
    parser.add_argument("--samples", type=int, default=16, help="images in the parity check (default: 16)")
    parser.add_argument("--letterbox", action="store_true", help="record letterbox (pad to square) preprocessing")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed absolute logit difference")
    parser.add_argument("--no-wandb", action="store_true", help="do not attach the files to the run's wandb run")
    parser.add_argument(
        "--no-calibration", action="store_true", help="record temperature 1: plain softmax probabilities"
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: run(args), args.debug, cleanup=close_loaders)


def run(args: argparse.Namespace) -> int:
    if args.samples < 2 or args.tolerance < 0:
        raise UserError("--samples must be at least 2 and --tolerance at least 0 — fix the option")
    trained = load_trained(args.run_dir, args.checkpoint)
    inputs = parity_inputs(trained, args.data, args.split, args.samples, args.letterbox)
    with torch.no_grad():
        expected = trained.model(inputs).numpy()
    out_dir = args.out_dir or args.run_dir / EXPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = describe(trained, inputs, args.letterbox, args.no_calibration)
    checked, parity = {}, {}
    try:
        for fmt in dict.fromkeys(args.format):
            tmp = checked[fmt] = out_dir / f"{FILES[fmt]}.{os.getpid()}.tmp"  # another export writes its own
            EXPORT[fmt](trained.model, inputs, tmp, metadata)
            # The whole batch and a batch of one: a batch dimension that is not really dynamic shows here.
            diff = max(
                max_abs_diff(RUN[fmt](tmp, inputs), expected), max_abs_diff(RUN[fmt](tmp, inputs[:1]), expected[:1])
            )
            check_parity(fmt, diff, args.tolerance)
            parity[fmt] = {"max_abs_diff": diff, "samples": len(inputs), "tolerance": args.tolerance}
        for fmt, tmp in checked.items():
            os.replace(tmp, out_dir / FILES[fmt])
            print(
                f"{fmt}: {out_dir / FILES[fmt]}  max abs logit diff {parity[fmt]['max_abs_diff']:.3g} "
                f"on {len(inputs)} images (batch {len(inputs)} and 1)"
            )
    finally:  # a file that failed its check (or was not checked) must never look like an export
        for tmp in checked.values():
            tmp.unlink(missing_ok=True)
    described = json.dumps({**metadata, "parity": parity}, ensure_ascii=False, indent=1)
    tmp = out_dir / f"model.json.{os.getpid()}.tmp"
    try:
        tmp.write_text(described + "\n", encoding="utf-8")
        os.replace(tmp, out_dir / "model.json")
    finally:
        tmp.unlink(missing_ok=True)
    print(f"metadata: {out_dir / 'model.json'}")
    if not args.no_wandb:
        files = [out_dir / FILES[fmt] for fmt in checked] + [out_dir / "model.json"]
        attach(args.run_dir, trained, files, {**metadata, "parity": parity})
    return 0


def attach(run_dir: Path, trained: Trained, files: list[Path], metadata: dict) -> None:
    alias = trained.name if trained.name in ("best", "final", "last") else None
    name = log_export(run_dir, trained.config, files, alias, metadata)
    if name is not None:
        mode = trained.config.wandb.mode
        later = f"; upload with `wandb sync {run_dir}/wandb/offline-run-*`" if mode == "offline" else ""
        print(f"wandb: {name} attached to the training run ({mode}{later})")


def parity_inputs(trained: Trained, data: Path | None, split: str, samples: int, letterbox: bool) -> torch.Tensor:
    """The first `samples` evaluation images, preprocessed as a deployment would."""
    dataset, _ = eval_dataset(trained, data, split, letterbox)
    count = min(samples, len(dataset))
    return torch.stack([dataset[(i, 0, None)][0] for i in range(count)])


def describe(trained: Trained, inputs: torch.Tensor, letterbox: bool, no_calibration: bool = False) -> dict:
    temperature = 1.0 if no_calibration or trained.temperature is None else trained.temperature
    return {
        "classes": trained.classes,
        "input": {"name": "image", "shape": ["batch", *inputs.shape[1:]], "dtype": "float32"},
        "output": {
            "name": "logits",
            "shape": ["batch", len(trained.classes)],
            "note": "probabilities = softmax(logits / temperature)",
        },
        # Fitted on the val split for these weights (1: none fitted, or --no-calibration).
        "temperature": temperature,
        "preprocessing": trained.preprocessing.deployment(letterbox),
        "fingerprint": trained.model.fingerprint(),
        "weights": str(trained.weights),
    }


def export_onnx(model: torch.nn.Module, inputs: torch.Tensor, path: Path, metadata: dict) -> None:
    import onnx

    # The TorchScript-based exporter: the torch.export one needs onnxscript, which we do not ship.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (inputs,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    exported = onnx.load(str(path))
    onnx.helper.set_model_props(
        exported, {key: json.dumps(value, ensure_ascii=False) for key, value in metadata.items()}
    )
    onnx.save(exported, str(path))


def export_torchscript(model: torch.nn.Module, inputs: torch.Tensor, path: Path, metadata: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but TorchScript is what was asked for
        traced = torch.jit.trace(model, inputs)
        torch.jit.save(traced, str(path), _extra_files={"model.json": json.dumps(metadata, ensure_ascii=False)})


def run_onnx(path: Path, inputs: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": inputs.numpy()})[0]


def run_torchscript(path: Path, inputs: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(inputs).numpy()


EXPORT = {"onnx": export_onnx, "torchscript": export_torchscript}
RUN = {"onnx": run_onnx, "torchscript": run_torchscript}


def max_abs_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    return float(np.abs(actual - expected).max())


def check_parity(fmt: str, diff: float, tolerance: float) -> None:
    if not diff <= tolerance:  # NaN fails too
        raise UserError(
            f"the {fmt} export differs from the PyTorch model by up to {diff:.3g} (tolerance {tolerance:g}); "
            "no model file written — report it with the run's config, or pass a larger --tolerance if it is acceptable"
        )
