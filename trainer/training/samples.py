"""What the loaders hand over: one sample as the dataset returns it (decoded by the workers, or
encoded for the device to decode), and the batch collated from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import default_collate


class Sample(NamedTuple):
    """A sample decoded and transformed by a loader worker."""

    image: torch.Tensor
    label: int
    index: int  # in its split: evaluation counts it on one rank only


class EncodedSample(NamedTuple):
    """A sample left for the device to decode (data.decode=device): the `device_ready` image and
    what its decode and augmentation need."""

    image: torch.Tensor
    label: int
    index: int
    seed: int  # the sample's augmentation seed in this epoch
    name: str  # for error messages: key and shard
    size: int  # the epoch's train crop side


@dataclass
class EncodedBatch:
    """A training batch before device decoding: per sample, the `device_ready` image, its
    augmentation seed and its name for error messages; the epoch's train crop side."""

    images: list[torch.Tensor]
    seeds: list[int]
    names: list[str]
    size: int


class Batch(NamedTuple):
    images: torch.Tensor | EncodedBatch
    labels: torch.Tensor
    indices: torch.Tensor
    bad: int  # samples dropped as unreadable (data.skip_bad_samples), which the dataset gave as None


def collate(items: list[Sample | EncodedSample | None]) -> Batch:
    good = [item for item in items if item is not None]
    bad = len(items) - len(good)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad)
    if isinstance(good[0], EncodedSample):
        encoded = EncodedBatch([s.image for s in good], [s.seed for s in good], [s.name for s in good], good[0].size)
        return Batch(encoded, torch.tensor([s.label for s in good]), torch.tensor([s.index for s in good]), bad)
    images, labels, indices = default_collate([tuple(s) for s in good])
    return Batch(images, labels, indices, bad)
