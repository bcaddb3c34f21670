"""RUN/heldout.npz: what the best weights predict for each sample of the run's val split, which a
k-fold run's fold is (trainer/training/folds.py): K fold runs give every train image one
out-of-sample prediction, and `trainer.audit` looks for label errors in them.

Written at the end of every run (numpy savez, compressed): `keys` (the shard sample keys), `paths`
(each sample json's "path", relative to make_shards' SRC), `labels` (int64, the given class index
into classes.json), `probs` (float32 [N, C], softmax of the best weights, with train.eval_tta as the
evaluations had it; no temperature), `fold` (-1 when not a k-fold run). Ranks read the split as
evaluation does (sample i on rank i % world) and the main process gathers the rows: every sample
exactly once, in any order, whatever the process count. A sample that cannot be read (with
data.skip_bad_samples) is left out and counted.
"""

from __future__ import annotations

import io
import json
from contextlib import contextmanager

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from trainer.rundir import HELDOUT, WEIGHTS, RunDir, read_weights_file
from trainer.training.data import EvalOrder, ShardDataset, loader_workers, worker_signals
from trainer.training.metrics import predict_logits
from trainer.training.runtime import gather_to_main, sum_across
from trainer.training.samples import collate


class Keyed(Dataset):
    """A split's dataset whose items also say which sample they are: (sample or None, key, path)."""

    def __init__(self, dataset: ShardDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int, int | None]):
        raw = self.dataset.reader.read(item[0])  # the json member: a second read of the record, from the page cache
        return self.dataset[item], raw["__key__"], json_path(raw)


def json_path(sample: dict) -> str:
    try:
        return str(json.loads(sample["json"])["path"])
    except (KeyError, ValueError, TypeError):  # shards of other writers: no path to give
        return ""


def keyed_collate(items: list) -> tuple:
    """-> (the batch of the readable samples, their keys, their paths)."""
    good = [(key, path) for sample, key, path in items if sample is not None]
    return collate([sample for sample, _, _ in items]), [k for k, _ in good], [p for _, p in good]


@contextmanager
def best_weights(net: torch.nn.Module, run: RunDir, accelerator: Accelerator):
    """`net` holding best.safetensors for the block, its own weights again after it."""
    accelerator.wait_for_everyone()  # the main process wrote the file
    tensors, _ = read_weights_file(run.file(WEIGHTS["best"]))
    own = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(tensors)
    try:
        yield net
    finally:
        net.load_state_dict(own)


@torch.no_grad()
def heldout_rows(net, dataset: ShardDataset, accelerator: Accelerator, batch_size: int, workers: int, tta: str):
    """This rank's share of the split -> (keys, paths, labels, probs) and the samples skipped, all ranks."""
    net.eval()
    order = EvalOrder(len(dataset), batch_size, accelerator.process_index, accelerator.num_processes)
    workers = loader_workers(workers)[0]
    loader = DataLoader(
        Keyed(dataset),
        batch_sampler=order,
        num_workers=workers,
        collate_fn=keyed_collate,
        worker_init_fn=worker_signals,
    )
    keys, paths, labels, probs, skipped = [], [], [], [], 0
    for (images, batch_labels, _, bad), batch_keys, batch_paths in loader:
        skipped += bad
        if not len(batch_labels):
            continue
        with accelerator.autocast():
            logits = predict_logits(net, images.to(accelerator.device, non_blocking=True), tta)
        keys += batch_keys
        paths += batch_paths
        labels.append(batch_labels.numpy())
        probs.append(logits.float().softmax(1).cpu().numpy())
    classes = dataset.num_classes
    rows = (
        keys,
        paths,
        np.concatenate(labels) if labels else np.zeros(0, np.int64),
        np.concatenate(probs) if probs else np.zeros((0, classes), np.float32),
    )
    return rows, int(sum_across(torch.tensor(skipped, device=accelerator.device), accelerator).item())


def npz_bytes(parts: list[tuple], fold: int) -> bytes:
    """Every rank's rows -> heldout.npz's bytes."""
    keys = [k for part in parts for k in part[0]]
    paths = [p for part in parts for p in part[1]]
    out = io.BytesIO()
    np.savez_compressed(
        out,
        keys=np.array(keys, dtype=str),
        paths=np.array(paths, dtype=str),
        labels=np.concatenate([part[2] for part in parts]).astype(np.int64),
        probs=np.concatenate([part[3] for part in parts]).astype(np.float32),
        fold=np.array(fold, dtype=np.int64),
    )
    return out.getvalue()


def write_heldout(net, dataset: ShardDataset, run: RunDir, accelerator: Accelerator, config) -> str:
    """The best weights' predictions for every sample of `dataset` (the run's val split or fold) ->
    RUN/heldout.npz, written by the main process; -> a line saying what was written."""
    data, train = config.data, config.train
    with best_weights(net, run, accelerator):
        rows, skipped = heldout_rows(net, dataset, accelerator, train.batch_size, data.workers, train.eval_tta)
    parts = gather_to_main([rows], accelerator)
    count = len(dataset) - skipped
    if accelerator.is_main_process:
        run.replace_bytes(HELDOUT, npz_bytes(parts, data.fold if data.folds else -1))
    what = f"fold {data.fold} of {data.folds}" if data.folds else "the val split"
    unread = f" ({skipped} unreadable, left out)" if skipped else ""
    return f"held-out predictions: {run.file(HELDOUT)} ({count} samples of {what}, best weights){unread}"
