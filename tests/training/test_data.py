import io
import tarfile

import pytest

from shards.reader import SplitReader
from shards.source import SplitFiles
from toolbox.errors import DataError
from trainer.training.data import EvalOrder, TrainOrder
from trainer.training.randomness import mix_seed


@pytest.mark.parametrize("world, batch", [(1, 4), (2, 4), (3, 5)])
def test_train_ranks_read_disjoint_samples_in_equal_batches(world, batch):
    orders = [TrainOrder(103, batch, rank, world, seed=1) for rank in range(world)]
    seen = []
    for order in orders:
        order.set_epoch(2)
        batches = list(order)
        assert len(batches) == len(order) == 103 // (world * batch)
        assert all(len(b) == batch for b in batches)
        seen += [i for b in batches for i, *_ in b]
    assert len(seen) == len(set(seen))  # disjoint across ranks


def test_epoch_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    full = TrainOrder(50, 4, 1, 2, seed=7)
    full.set_epoch(3)
    expected = list(full)
    resumed = TrainOrder(50, 4, 1, 2, seed=7)
    resumed.set_epoch(3, start_batch=2)
    assert list(resumed) == expected[2:]  # same samples and same augmentation seeds
    other = TrainOrder(50, 4, 1, 2, seed=7)
    other.set_epoch(4)
    assert list(other) != expected


def test_balanced_order_draws_classes_evenly():
    labels = [0] * 90 + [1] * 10
    order = TrainOrder(100, 10, 0, 1, seed=0, labels=labels)
    drawn = [labels[i] for epoch in range(20) for i in (order.set_epoch(epoch) or order.epoch_plan()[0].tolist())]
    assert 0.4 < sum(drawn) / len(drawn) < 0.6


@pytest.mark.parametrize("num, world, batch", [(101, 2, 8), (7, 3, 2), (2, 4, 3)])
def test_eval_order_counts_every_sample_exactly_once(num, world, batch):
    seen = [i for rank in range(world) for b in EvalOrder(num, batch, rank, world) for i, *_ in b]
    assert sorted(seen) == list(range(num))
    for rank in range(world):
        assert len(list(EvalOrder(num, batch, rank, world))) == len(EvalOrder(num, batch, rank, world))


def test_mix_seed_spreads_and_is_stable():
    seeds = {mix_seed(0, epoch, position) for epoch in range(10) for position in range(1000)}
    assert len(seeds) == 10_000
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) < 2**63


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_shard_index_random_access(tmp_path):
    _tar(tmp_path / "a.tar", [(f"k{i}", {"cls": str(i).encode(), "png": bytes([i]) * (i + 1)}) for i in range(3)])
    _tar(tmp_path / "b.tar", [(f"k{i}", {"cls": str(i).encode(), "png": bytes([i]) * (i + 1)}) for i in range(3, 5)])
    index = SplitReader(SplitFiles.from_paths([tmp_path / "a.tar", tmp_path / "b.tar"], [3, 2]))
    assert len(index) == 5
    assert index.read(4) == {"__key__": "k4", "__shard__": "b.tar", "cls": b"4", "png": bytes([4]) * 5}
    assert index.read(0)["png"] == b"\0"
    assert index.labels().tolist() == [0, 1, 2, 3, 4]


def test_shard_index_errors_name_the_shard(tmp_path):
    _tar(tmp_path / "a.tar", [(f"k{i}", {"cls": b"0", "png": b"x" * 5000}) for i in range(3)])
    with pytest.raises(DataError, match="holds 3 samples but the manifest says 4"):
        SplitReader(SplitFiles.from_paths([tmp_path / "a.tar"], [4])).read(0)
    with pytest.raises(DataError, match="missing"):
        SplitFiles.from_paths([tmp_path / "gone.tar"], [1]).check()
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:7000])
    with pytest.raises(DataError, match="cut.tar"):
        index = SplitReader(SplitFiles.from_paths([tmp_path / "cut.tar"], [3]))
        for i in range(3):
            index.read(i)


def test_train_batches_stay_uint8_until_normalised_on_the_device():
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from trainer.training.config import DataConfig
    from trainer.training.transforms import DeviceNormalize, TrainPreset

    mean, std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.125]
    png = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8).numpy()).save(png, "PNG")
    preset = TrainPreset(DataConfig(shards="s", image_size=16, scale_min=0.5), mean, std)
    torch.manual_seed(3)
    uint8 = preset(preset.decode(png.getvalue()))
    assert uint8.dtype == torch.uint8 and uint8.shape == (3, 16, 16)
    batch = DeviceNormalize(mean, std, torch.device("cpu"), channels_last=True)(uint8[None])
    expected = v2.Normalize(mean, std)(uint8.float()[None] / 255)
    assert torch.allclose(batch, expected, atol=1e-5)
    assert batch.is_contiguous(memory_format=torch.channels_last)


def epoch_items(num: int, batch: int, world: int, repeats: int, epoch: int = 1, start: int = 0) -> list[list]:
    """Every rank's batches of (sample, seed, size) for one epoch."""
    ranks = []
    for rank in range(world):
        order = TrainOrder(num, batch, rank, world, seed=3, sizes=[8, 12, 16], repeats=repeats)
        order.set_epoch(epoch, start)
        ranks.append(list(order))
    return ranks


@pytest.mark.parametrize("world", [2, 3])
def test_aug_repeats_put_a_samples_copies_on_different_ranks_and_keep_the_epoch_length(world):
    ranks = epoch_items(120, 4, world, repeats=world)
    steps = 120 // (world * 4)
    assert [len(batches) for batches in ranks] == [steps] * world  # the epoch keeps its length
    for step in range(steps):
        copies = {}
        for rank, batches in enumerate(ranks):
            for sample, _, size in batches[step]:
                copies.setdefault(sample, []).append(rank)
                assert size == 12  # epoch 1's side
        assert all(len(set(r)) == len(r) for r in copies.values()), copies  # never twice on one rank
        assert all(len(r) == world for r in copies.values())  # each sample shown `repeats` times
    seeds = [seed for batches in ranks for batch in batches for _, seed, _ in batch]
    assert len(set(seeds)) == len(seeds)  # every copy its own augmentation


def test_aug_repeats_are_independent_of_the_world_size_and_resume_mid_epoch():
    def pairs(world: int) -> set:
        return {(s, seed) for batches in epoch_items(96, 4, world, repeats=2) for b in batches for s, seed, _ in b}

    assert pairs(1) == pairs(2) == pairs(4)  # the same (sample, augmentation) pairs for any number of ranks
    full, resumed = epoch_items(96, 4, 2, repeats=2), epoch_items(96, 4, 2, repeats=2, start=5)
    assert [batches[5:] for batches in full] == resumed
    plain = TrainOrder(96, 4, 0, 2, seed=3)
    plain.set_epoch(1)
    assert [[(s, seed) for s, seed, _ in b] for b in plain] != [[(s, seed) for s, seed, _ in b] for b in full[0]]
