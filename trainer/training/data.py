"""Shards -> batches: the dataset, the per-rank batch orders, and the DataLoaders.

Every rank derives the same epoch order from (seed, epoch) alone and takes its own slice, so the
ranks read disjoint samples and run the same number of batches (uneven counts deadlock DDP).
Each sample's augmentation is seeded from (seed, epoch, position in the epoch order), so a run
resumed mid-epoch sees exactly the batches an uninterrupted one would. Validation hands sample
i to rank i % world: every sample is counted exactly once, with no padding.

When the node-local cache cannot hold the whole dataset, the epoch order is a shard-block order
(`ShardBlocks`): shards shuffled per epoch, grouped into blocks that fit the cache, samples
permuted within each block. It is still a function of (seed, epoch) alone, so everything above
holds; the sampler tells the cache's prefetcher which shards come next.
"""

from __future__ import annotations

import bisect
import multiprocessing
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms.v2.functional import pil_to_tensor

from shards.format import finish_rgb, image_field, open_image, plain_jpeg
from shards.reader import SplitReader
from shards.source import CacheOptions, Prefetcher, ShardSource
from shards.splits import TRAINING
from toolbox.cores import usable_cores
from toolbox.errors import DataError
from toolbox.sizes import parse_size
from trainer.training.config import eval_size, train_sizes
from trainer.training.folds import Fold, fold_readers
from trainer.training.randomness import mix_seed
from trainer.training.samples import EncodedSample, Sample, collate
from trainer.training.transforms import EvalPreset, TrainPreset


def open_shards(location: str, data=None, reads: Sequence[str] = TRAINING) -> ShardSource:
    """make_shards output at a path or URL, with the cache settings of ``data`` (a DataConfig), to
    read the splits ``reads`` (training's train and val by default: never a test split)."""
    options = CacheOptions()
    if data is not None:
        limit = parse_size(data.cache_limit) if data.cache_limit is not None else None
        options = CacheOptions(data.cache_dir, limit, data.fetch_retries, data.allow_pipe)
    return ShardSource(location, options, reads)


def split_reader(source: ShardSource, split: str, verify: str = "size") -> SplitReader:
    """Random access to ``split``'s samples, once its local shards are known to be there and of the
    manifest's sizes (verify=sha256: and bytes)."""
    files = source.split(split)
    files.check(checksum=verify == "sha256")
    return SplitReader(files)


@dataclass
class ShardBlocks:
    """The shard-block epoch order: blocks of whole shards of at most ``budget`` bytes (at least
    one shard each), in an order shuffled per epoch, samples permuted within each block."""

    counts: list[int]
    sizes: list[int]
    budget: int

    def samples_per_block(self) -> int:
        return int(self.budget * sum(self.counts) / max(sum(self.sizes), 1))

    def epoch(self, generator: torch.Generator) -> tuple[list[list[int]], list[torch.Tensor]]:
        """-> (the shards of each block, each block's samples in epoch order)."""
        starts = [0]
        for n in self.counts:
            starts.append(starts[-1] + n)
        blocks: list[list[int]] = []
        used = self.budget
        for shard in torch.randperm(len(self.counts), generator=generator).tolist():
            if used + self.sizes[shard] > self.budget:
                blocks.append([])
                used = 0
            blocks[-1].append(shard)
            used += self.sizes[shard]
        samples = [torch.cat([torch.arange(starts[s], starts[s + 1]) for s in block]) for block in blocks]
        return blocks, samples


class ShardDataset(torch.utils.data.Dataset):
    """Decodes and transforms sample `i` of a split with its own seed; None for a bad sample if skipping.

    The transform is a preset: `decode(bytes)` then `__call__(image)`. With transform=None it
    leaves decoding to the device (data.decode=device): the item is the encoded image
    (`device_ready`) and its seed, for `DeviceDecode`.
    """

    def __init__(self, reader: SplitReader, transform, skip_bad: bool = False, num_classes: int | None = None):
        self.reader, self.transform, self.skip_bad = reader, transform, skip_bad
        self.num_classes = num_classes  # labels are checked against it: -100 is the loss's ignore index

    def __len__(self) -> int:
        return len(self.reader)

    def fetched_bytes(self) -> int:
        """Bytes of shards this rank's processes downloaded into the node's cache so far."""
        return self.reader.files.fetched.value

    def __getitem__(self, item: tuple[int, int, int | None]):
        i, seed, size = item  # size: the epoch's train crop side (progressive resizing); None for val
        sample = self.reader.read(i)
        with torch.random.fork_rng(devices=[]):  # keep the caller's stream when workers=0
            torch.default_generator.manual_seed(seed)  # the train preset draws its crop while decoding
            try:
                data, label = sample[image_field(sample)], int(sample["cls"])
                if self.num_classes is not None and not 0 <= label < self.num_classes:
                    raise ValueError(f"label {label} is not one of the {self.num_classes} classes")
                if self.transform is None:
                    name = f"{sample['__key__']} in shard {sample['__shard__']}"
                    return EncodedSample(device_ready(data), label, i, seed, name, size)
                image = self.transform.decode(data) if size is None else self.transform.decode(data, size)
            except Exception as e:  # any decoder failure means the same thing to the user
                if self.skip_bad:
                    return None
                raise DataError(
                    f"sample {sample['__key__']} in shard {sample['__shard__']} cannot be read ({type(e).__name__}: {e}) — "
                    "re-run make_shards, or set data.skip_bad_samples=true to skip such samples"
                ) from e
            return Sample(self.transform(image), label, i)


def device_ready(data: bytes) -> torch.Tensor:
    """JPEG bytes as they are (1-D uint8) when the device can decode them to the same upright
    RGB; anything else (PNG, WebP, CMYK, EXIF-rotated) decoded here, as CHW uint8."""
    image = open_image(data)  # reads the header only
    if plain_jpeg(image):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return pil_to_tensor(finish_rgb(image))


@dataclass
class TrainOrder(Sampler):
    """This rank's batches of (sample of the split, augmentation seed, crop side) for one epoch,
    from any batch on.

    With `repeats` N > 1 the epoch order shows each sample N times in a row (the epoch keeps its
    length, so it covers 1/N of the split), and the order is dealt out so that a sample's copies
    land on different ranks (timm's RepeatAugSampler): each copy has its own augmentation seed.
    """

    num_samples: int
    batch_size: int
    rank: int
    world: int
    seed: int
    labels: Sequence[int] | None = None  # given: draw class-balanced with replacement
    blocks: ShardBlocks | None = None  # given: the shard-block order (the cache cannot hold every shard)
    prefetch: Prefetcher | None = None  # told which shards the coming batches read
    lookahead: int = 0  # batches the loader asks for before the first one is consumed (set by make_loader)
    sizes: Sequence[int] = ()  # the train crop side of each epoch (progressive resizing); () : the preset's
    repeats: int = 1  # data.aug_repeats
    epoch: int = 0
    start_batch: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.world * self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_plan(self) -> tuple[torch.Tensor, list[list[int]], list[int]]:
        """-> (the epoch's sample order; the shards of each block and the epoch position where
        each block ends: one block of every shard without `blocks`)."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        weights = None
        if self.labels is not None:
            labels = torch.as_tensor(self.labels)
            weights = 1.0 / torch.bincount(labels).double()[labels]
        if self.blocks is None:
            if weights is None:
                order = torch.randperm(self.num_samples, generator=generator)
            else:
                order = torch.multinomial(weights, self.num_samples, replacement=True, generator=generator)
            return self._repeated(order), [], [self.num_samples]
        shards, samples = self.blocks.epoch(generator)
        if weights is None:
            parts = [block[torch.randperm(len(block), generator=generator)] for block in samples]
        else:  # class-balanced draws within each block
            parts = [
                block[torch.multinomial(weights[block], len(block), replacement=True, generator=generator)]
                for block in samples
            ]
        ends = torch.tensor([len(p) for p in parts]).cumsum(0).tolist()
        return torch.cat([self._repeated(p, end - len(p)) for p, end in zip(parts, ends)]), shards, ends

    def _repeated(self, order: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Each sample `repeats` times in a row, cut to the order's length (one block's, or the
        epoch's). The copies fill the epoch positions [k * repeats, (k + 1) * repeats) together,
        also in a block that starts at epoch position `start` (a block's first and last group may
        be cut short by the block's edge), so dealing puts them on different ranks."""
        if self.repeats == 1:
            return order
        positions = torch.arange(start, start + len(order))
        return order[positions // self.repeats - start // self.repeats]

    def _dealt(self, count: int) -> torch.Tensor:
        """Which epoch-order position each of `count` slots takes: with repeats, rearranged within
        each step so that the k-th position goes to rank k % world (a sample's copies, one
        position apart, to different ranks); in order otherwise."""
        positions = torch.arange(count)
        if self.repeats == 1 or self.world == 1:
            return positions
        return positions.view(-1, self.batch_size, self.world).transpose(1, 2).reshape(-1)

    @property
    def size(self) -> int | None:
        return self.sizes[self.epoch] if self.epoch < len(self.sizes) else None

    def __iter__(self):
        step = self.world * self.batch_size
        order, shards, ends = self.epoch_plan()
        # A sample's augmentation seed comes from its epoch-order position, wherever it is dealt:
        # the same (sample, seed) pairs for any number of ranks.
        positions = self._dealt(self.steps_per_epoch * step)
        order, positions = order[positions].tolist(), positions.tolist()
        if self.prefetch is not None and not shards:  # global order: the cache holds every shard
            self.prefetch.want_samples(order[self.start_batch * step :])
        span = None
        for batch in range(self.start_batch, self.steps_per_epoch):
            first = (batch * self.world + self.rank) * self.batch_size
            if self.prefetch is not None and shards:
                span = self._fetch_ahead(batch, shards, ends, span)
            size = self.size
            slots = range(first, first + self.batch_size)
            yield [(order[p], mix_seed(self.seed, self.epoch, positions[p]), size) for p in slots]

    def _fetch_ahead(self, batch: int, shards: list[list[int]], ends: list[int], span):
        """Fetch the blocks the loaders are reading (from the oldest batch not yet consumed to this
        one), never evicting them for later ones, then the block after them; -> that span."""
        step = self.world * self.batch_size
        reading = max(batch - self.lookahead, self.start_batch) * step
        now = (bisect.bisect_right(ends, reading), bisect.bisect_right(ends, (batch + 1) * step - 1))
        if now != span:
            being_read = [shard for block in shards[now[0] : now[1] + 1] for shard in block]
            after = shards[now[1] + 1] if now[1] + 1 < len(shards) else []
            self.prefetch.want(being_read + after, being_read)
        return now

    @property
    def read_ahead(self) -> int:
        """Samples of the epoch order the loaders of all ranks may be reading at once."""
        return (self.lookahead + 1) * self.world * self.batch_size

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
            yield [(i, 0, None) for i in mine[start : start + self.batch_size]]

    def __len__(self) -> int:
        mine = len(range(self.rank, self.num_samples, self.world))
        return -(-mine // self.batch_size)


# Set by the trainer once it is done: from then on a worker obeys SIGTERM (the DataLoader's own
# shutdown uses it). Shared memory created before the workers fork, so they all see it.
_LOADERS_CLOSING = multiprocessing.RawValue("b", 0)


def close_loaders() -> None:
    _LOADERS_CLOSING.value = 1


def worker_signals(worker_id: int) -> None:
    """Workers leave stop signals to the process they serve (the trainer checkpoints first; evaluate
    and predict remove their unfinished files), which then closes them.

    A job scheduler signals every process of the job: a worker killed by its SIGTERM would
    crash the trainer before it could write its checkpoint.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_if_closing)


def _exit_if_closing(signum, frame) -> None:
    if _LOADERS_CLOSING.value:
        os._exit(0)


PREFETCH_FACTOR = 4


def loader_workers(asked: int) -> tuple[int, str | None]:
    """data.workers, at most the cores this process may run on: more cannot decode faster, and a slip
    like 1000 would fork hundreds of processes. -> (workers, a note when it was lowered)."""
    cores = usable_cores()
    if asked <= cores:
        return asked, None
    return cores, f"note: {asked} loader workers asked for, but this process can use {cores} cores — starting {cores}"


def make_loader(dataset: ShardDataset, order: Sampler, workers: int, pin_memory: bool) -> DataLoader:
    workers, _ = loader_workers(workers)
    if isinstance(order, TrainOrder):
        order.lookahead = workers * PREFETCH_FACTOR
    return DataLoader(
        dataset,
        batch_sampler=order,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
        worker_init_fn=worker_signals,
    )


@dataclass
class Loaders:
    """A run's two loaders and the train order behind the first (set_epoch before each epoch)."""

    train: DataLoader
    val: DataLoader
    order: TrainOrder
    fold: Fold | None = None  # data.folds: which fold val is, and the sizes


def build_loaders(config, source: ShardSource, mean: list, std: list, rank: int, world: int, pin: bool) -> Loaders:
    """config: a trainer.training.config.Config. data.decode=device hands the train batches over encoded.
    With data.folds the two loaders read the train split outside and inside fold data.fold."""
    verify = config.data.verify
    train_reader, fold = split_reader(source, "train", verify), None
    if config.data.folds:
        train_reader, val_reader, fold = fold_readers(train_reader, source.manifest.duplicates, config.data)
    else:
        val_reader = split_reader(source, "val", verify)
    labels = train_reader.labels() if config.data.balance == "sampler" else None
    # A cache smaller than the data: read the epoch block by block (ShardBlocks)
    budget = source.block_budget
    blocks = ShardBlocks(train_reader.counts, train_reader.files.sizes, budget) if budget is not None else None
    prefetch = train_reader.prefetcher()
    order = TrainOrder(
        len(train_reader), config.train.batch_size, rank, world, config.train.seed, labels, blocks, prefetch
    )
    order.sizes = train_sizes(config)
    order.repeats = config.data.aug_repeats
    train_preset = TrainPreset(config.data, mean, std) if config.data.decode == "workers" else None
    classes = len(source.manifest.classes)
    train_set = ShardDataset(train_reader, train_preset, config.data.skip_bad_samples, classes)
    val_preset = EvalPreset(eval_size(config.data), config.data.crop_pct, mean, std)
    val_set = ShardDataset(val_reader, val_preset, config.data.skip_bad_samples, classes)
    val_order = EvalOrder(len(val_reader), config.train.batch_size, rank, world)
    workers = config.data.workers
    train, val = make_loader(train_set, order, workers, pin), make_loader(val_set, val_order, workers, pin)
    return Loaders(train, val, order, fold)
