"""Set-up data loaders: rebuilt for several processes as the user's own class, saved by their state, never pickled.

``distribute`` is called with an explicit world size and rank (no process group needed); the 2-process runs are in
test_runtime_distributed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from fabric_ckpt import Fabric
from fabric_ckpt.training.data import SamplerShards, distribute
from tests.runtime_cases import Items, TaggedLoader


def items(loader) -> list[float]:
    return [x for batch in loader for x in batch.flatten().tolist()]


def both_ranks(make_loader) -> list[DataLoader]:
    return [distribute(make_loader(), world_size=2, rank=rank) for rank in range(2)]


def assert_split(parts: list[DataLoader], count: int) -> None:
    seen = [items(part) for part in parts]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [float(i) for i in range(count)]


class WithOwnArgument(DataLoader):
    def __init__(self, dataset: Any, scale: float, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.scale = scale


class ForgetsItsArgument(DataLoader):
    def __init__(self, dataset: Any, scale: float, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)


class FixedSignature(DataLoader):
    def __init__(self, dataset: Any, batch_size: int) -> None:
        super().__init__(dataset, batch_size=batch_size, shuffle=True)


class EvenFirst(BatchSampler):
    """A custom batch sampler following torch's signature."""


class Reversed(Sampler[int]):
    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):
        return iter(range(self.count - 1, -1, -1))

    def __len__(self) -> int:
        return self.count


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(4))


def test_a_dataloader_subclass_is_rebuilt_as_itself_with_its_arguments():
    parts = both_ranks(lambda: WithOwnArgument(Items(10), scale=3.0, batch_size=2, shuffle=True, drop_last=True))
    for rank, part in enumerate(parts):
        assert type(part) is WithOwnArgument and part.scale == 3.0
        assert part.batch_size == 2 and part.drop_last
        assert isinstance(part.sampler, DistributedSampler) and part.sampler.shuffle and part.sampler.rank == rank
        assert len(part) == 2  # 5 items per rank, in whole batches of 2
    parts = both_ranks(lambda: WithOwnArgument(Items(10), scale=3.0, batch_size=2))
    assert not parts[0].sampler.shuffle
    assert_split(parts, 10)


def test_a_stateful_dataloader_shuffling_gets_a_shuffling_distributed_sampler():
    parts = both_ranks(lambda: TaggedLoader(Items(12), tag="t", batch_size=3, shuffle=True, snapshot_every_n_steps=4))
    for part in parts:
        assert type(part) is TaggedLoader and part.tag == "t" and part.snapshot_every_n_steps == 4
        assert isinstance(part.sampler, DistributedSampler) and part.sampler.shuffle
        assert part.batch_size == 3 and callable(part.state_dict)
    assert_split(parts, 12)


def test_the_sampler_seed_is_lightnings(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "17")
    assert distribute(DataLoader(Items(4), shuffle=True), world_size=2, rank=0).sampler.seed == 17


def test_a_subclass_that_cannot_be_rebuilt_is_refused_with_what_to_do():
    with pytest.raises(TypeError, match=r"ForgetsItsArgument .*\['scale'\] are not attributes.*self\.scale = scale"):
        distribute(ForgetsItsArgument(Items(4), scale=1.0), world_size=2, rank=0)
    with pytest.raises(
        TypeError, match=r"FixedSignature .*takes no argument\(s\) \['batch_sampler', 'sampler', 'shuffle'\]"
    ):
        distribute(FixedSignature(Items(4), batch_size=2), world_size=2, rank=0)
    with pytest.raises(TypeError, match="use_distributed_sampler=False"):
        distribute(FixedSignature(Items(4), batch_size=2), world_size=2, rank=0)


def test_a_custom_batch_sampler_is_rebuilt_around_the_distributed_sampler():
    def make() -> DataLoader:
        return DataLoader(Items(8), batch_sampler=EvenFirst(range(8), batch_size=2, drop_last=False))

    parts = both_ranks(make)
    for part in parts:
        assert type(part.batch_sampler) is EvenFirst and isinstance(part.batch_sampler.sampler, DistributedSampler)
    assert_split(parts, 8)
    odd = DataLoader(Items(4), batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(TypeError, match=r"your list: a batch sampler must take \(sampler, batch_size, drop_last\)"):
        distribute(odd, world_size=2, rank=0)


def test_a_custom_sampler_is_split_between_processes_in_its_own_order():
    parts = both_ranks(lambda: DataLoader(Items(6), sampler=Reversed(6), batch_size=1))
    assert [type(part.sampler) for part in parts] == [SamplerShards, SamplerShards]
    assert [items(part) for part in parts] == [[5.0, 3.0, 1.0], [4.0, 2.0, 0.0]]


def test_loaders_that_need_no_change_are_returned_as_they_are():
    plain = DataLoader(Items(4))
    assert distribute(plain, world_size=1, rank=0) is plain
    stream = DataLoader(Stream())
    assert distribute(stream, world_size=2, rank=0) is stream
    split = DataLoader(Items(4), sampler=DistributedSampler(Items(4), num_replicas=2, rank=1))
    assert distribute(split, world_size=2, rank=1) is split


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_a_stateful_loader_resumes_from_a_checkpoint(tmp_path):
    fabric = Fabric(accelerator="cpu")
    path = tmp_path / "loader.ckpt"

    def make():
        return fabric.setup_dataloaders(StatefulDataLoader(Items(10), batch_size=2, shuffle=True))

    torch.manual_seed(0)
    loader = make()
    iterator = iter(loader)
    consumed = [next(iterator) for _ in range(2)]
    fabric.save(path, {"loader": loader, "epoch": 0})
    expected = list(iterator)
    fresh = make()
    torch.manual_seed(1)  # a different shuffle, unless the saved position says otherwise
    fabric.load(path, {"loader": fresh, "epoch": 0})
    resumed = list(fresh)
    assert len(consumed) + len(expected) == 5
    assert [b.tolist() for b in resumed] == [b.tolist() for b in expected]
    saved = fabric.load(path)["loader"]  # a plain dict (loads with weights_only), never the wrapper
    assert type(saved) is dict and saved["loader"]["_num_yielded"] == 2 and saved["batches"] == 2
