"""Shards -> batches: the dataset, the per-rank batch orders, and the DataLoaders.

Every rank derives the same epoch order from (seed, epoch) alone and takes its own slice, so the
ranks read disjoint samples and run the same number of batches (uneven counts deadlock DDP).
Each sample's augmentation is seeded from (seed, epoch, position in the epoch order), so a run
resumed mid-epoch sees exactly the batches an uninterrupted one would. Validation hands sample
i to rank i % world: every sample is counted exactly once, with no padding.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms.v2.functional import pil_to_tensor

from shards.format import finish_rgb, image_field, open_image, plain_jpeg
from shards.manifest import Manifest
from shards.reader import ShardError, ShardIndex

MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from several integers (splitmix64 over each in turn)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & MASK64)) + 0x9E3779B97F4A7C15 & MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & MASK64
        state ^= state >> 31
    return state >> 1


def split_index(manifest: Manifest, split: str) -> ShardIndex:
    if split not in manifest.splits or manifest.splits[split].num_samples == 0:
        raise ShardError(f"the shards have no '{split}' samples — re-run make_shards with a non-zero split")
    info = manifest.splits[split]
    index = ShardIndex(manifest.shard_paths(split), [s.samples for s in info.shards])
    index.check_files()
    return index


class ShardDataset(Dataset):
    """Decodes and transforms sample `index` with its own seed; None for a bad sample if skipping.

    The transform is a preset: `decode(bytes)` then `__call__(image)`. With transform=None it
    leaves decoding to the device (data.decode=device): the item is the encoded image
    (`device_ready`) and its seed, for `DeviceDecode`.
    """

    def __init__(self, index: ShardIndex, transform, skip_bad: bool = False):
        self.index, self.transform, self.skip_bad = index, transform, skip_bad

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        sample = self.index.read(index)
        with torch.random.fork_rng(devices=[]):  # keep the caller's stream when workers=0
            torch.default_generator.manual_seed(seed)  # the train preset draws its crop while decoding
            try:
                data, label = sample[image_field(sample)], int(sample["cls"])
                if self.transform is None:
                    name = f"{sample['__key__']} in shard {sample['__shard__']}"
                    return device_ready(data), label, index, seed, name
                image = self.transform.decode(data)
            except Exception as e:  # any decoder failure means the same thing to the user
                if self.skip_bad:
                    return None
                raise ShardError(
                    f"sample {sample['__key__']} in shard {sample['__shard__']} cannot be read ({type(e).__name__}: {e}) — "
                    "re-run make_shards, or set data.skip_bad_samples=true to skip such samples"
                ) from None
            return self.transform(image), label, index


def device_ready(data: bytes) -> torch.Tensor:
    """JPEG bytes as they are (1-D uint8) when the device can decode them to the same upright
    RGB; anything else (PNG, WebP, CMYK, EXIF-rotated) decoded here, as CHW uint8."""
    image = open_image(data)  # reads the header only
    if plain_jpeg(image):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return pil_to_tensor(finish_rgb(image))


@dataclass
class EncodedBatch:
    """A training batch before device decoding: per sample, the `device_ready` image, its
    augmentation seed and its name for error messages."""

    images: list[torch.Tensor]
    seeds: list[int]
    names: list[str]


def collate(batch: list) -> tuple[torch.Tensor | EncodedBatch, torch.Tensor, torch.Tensor, int]:
    good = [item for item in batch if item is not None]
    bad = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad
    if len(good[0]) == 5:  # encoded, for the device
        images, labels, indices, seeds, names = zip(*good)
        return EncodedBatch(list(images), list(seeds), list(names)), torch.tensor(labels), torch.tensor(indices), bad
    images, labels, indices = default_collate(good)
    return images, labels, indices, bad


@dataclass
class TrainOrder(Sampler):
    """This rank's batches of (sample index, augmentation seed) for one epoch, from any batch on."""

    num_samples: int
    batch_size: int
    rank: int
    world: int
    seed: int
    labels: list[int] | None = None  # given: draw class-balanced with replacement
    epoch: int = 0
    start_batch: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.world * self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        if self.labels is None:
            return torch.randperm(self.num_samples, generator=generator)
        labels = torch.tensor(self.labels)
        weights = 1.0 / torch.bincount(labels).double()[labels]
        return torch.multinomial(weights, self.num_samples, replacement=True, generator=generator)

    def __iter__(self):
        used = self.steps_per_epoch * self.world * self.batch_size
        order = self.epoch_order()[:used].tolist()
        for batch in range(self.start_batch, self.steps_per_epoch):
            first = (batch * self.world + self.rank) * self.batch_size
            yield [(order[p], mix_seed(self.seed, self.epoch, p)) for p in range(first, first + self.batch_size)]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch


@dataclass
class EvalOrder(Sampler):
    """Samples rank, rank + world, ... in batches: all ranks together see each sample once."""

    num_samples: int
    batch_size: int
    rank: int
    world: int

    def __iter__(self):
        mine = list(range(self.rank, self.num_samples, self.world))
        for start in range(0, len(mine), self.batch_size):
            yield [(i, 0) for i in mine[start : start + self.batch_size]]

    def __len__(self) -> int:
        mine = len(range(self.rank, self.num_samples, self.world))
        return -(-mine // self.batch_size)


# Set by the trainer once it is done: from then on a worker obeys SIGTERM (the DataLoader's own
# shutdown uses it). Shared memory created before the workers fork, so they all see it.
_LOADERS_CLOSING = multiprocessing.RawValue("b", 0)


def close_loaders() -> None:
    _LOADERS_CLOSING.value = 1


def _worker_signals(worker_id: int) -> None:
    """Workers leave stop signals to the trainer, which checkpoints and then closes them.

    A job scheduler signals every process of the job: a worker killed by its SIGTERM would
    crash the trainer before it could write its checkpoint.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_if_closing)


def _exit_if_closing(signum, frame) -> None:
    if _LOADERS_CLOSING.value:
        os._exit(0)


def make_loader(dataset: ShardDataset, order: Sampler, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=order,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_worker_signals,
    )
