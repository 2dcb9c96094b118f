"""Runs over set-up data loaders interrupted at chosen batches, saved, and resumed in fresh objects.

Module level so that the 2-rank tests can run them on every rank of a :class:`tests.distributed.WorkerGroup`. A run
returns every batch it consumed, in order, as lists (a batch holds the items' indices and a random draw made while
reading them), so a test compares an interrupted run with an uninterrupted one batch for batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from fabric_ckpt import DDPStrategy, Fabric, RNGState

EPOCHS = 3


class Noisy(Dataset):
    """Item ``i`` is ``[i, a draw]``: the draw comes from whichever generator reads the item (the process's, or a
    worker's), so a batch read with other random state than the uninterrupted run's differs."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index), float(torch.randint(0, 1 << 20, ()).item())])


class NoisyStream(IterableDataset):
    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):
        for index in range(self.count):
            yield torch.tensor([float(index), float(torch.randint(0, 1 << 20, ()).item())])


def make_loader(kind: str) -> DataLoader:
    """A fresh loader of one of the kinds the tests interrupt."""
    if kind == "shuffle":
        return DataLoader(Noisy(23), batch_size=4, shuffle=True)
    if kind == "sequential":
        return DataLoader(Noisy(10), batch_size=3)
    if kind == "generator":
        return DataLoader(Noisy(23), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))
    if kind == "workers":
        return DataLoader(Noisy(14), batch_size=2, shuffle=True, num_workers=2)
    if kind == "stream":
        return DataLoader(NoisyStream(11), batch_size=3)
    if kind == "batch-sampler":
        return DataLoader(Noisy(17), batch_sampler=BatchSampler(RandomSampler(range(17)), batch_size=5, drop_last=True))
    if kind == "stateful":
        return StatefulDataLoader(Noisy(23), batch_size=4, shuffle=True)
    raise ValueError(kind)


def run(
    fabric: Fabric,
    kind: str,
    stops: Sequence[int],
    folder: str,
    *,
    epochs: int = EPOCHS,
    set_up: bool = True,
    restore_rng: bool = True,
    epoch_end_stops: Sequence[int] = (),
) -> list[list[float]]:
    """Read ``epochs`` epochs of a ``kind`` loader; after the n-th batch for each n in ``stops`` (and at the end of
    each epoch in ``epoch_end_stops``), save, then go on with fresh objects (a fresh loader, other global random
    state) restored from that checkpoint. A random draw after each batch stands for a training step's."""
    seen: list[list[float]] = []
    loader = _fresh(fabric, kind, set_up, seed=0)
    state: dict[str, Any] = {"loader": loader, "epoch": 0, "consumed": 0}
    if restore_rng:
        state["rng"] = RNGState()
    path = os.path.join(folder, "position.ckpt")
    pending = sorted(stops)

    def interrupt() -> None:
        nonlocal loader
        fabric.save(path, state)
        loader = _fresh(fabric, kind, set_up, seed=1000 + len(seen) + 100 * fabric.global_rank)
        state["loader"] = loader
        fabric.load(path, state)

    while state["epoch"] < epochs:
        interrupted = False
        for batch in loader:
            seen.append(batch.flatten().tolist())
            torch.rand(3)  # the training step's own draws
            state["consumed"] += 1
            if pending and pending[0] == state["consumed"]:
                pending.pop(0)
                interrupt()
                interrupted = True
                break
        if interrupted:
            continue
        state["epoch"] += 1
        if state["epoch"] in epoch_end_stops:
            interrupt()
    return seen


def _fresh(fabric: Fabric, kind: str, set_up: bool, seed: int) -> Any:
    torch.manual_seed(seed)  # another global random state: only what was saved can make the batches right
    loader = make_loader(kind)
    return fabric.setup_dataloaders(loader) if set_up else loader


def batches_per_epoch(kind: str, world_size: int = 1) -> int:
    loader = make_loader(kind)
    if isinstance(loader.dataset, IterableDataset):
        return -(-loader.dataset.count // loader.batch_size)
    return -(-len(loader) // world_size)


def distributed_run(kind: str, stops: Sequence[int], folder: str, epoch_end_stops: Sequence[int] = ()) -> Any:
    """:func:`run` on this rank of a 2-rank DDP group (each rank reads its own part through a DistributedSampler)."""
    fabric = Fabric(strategy=DDPStrategy(accelerator="cpu"))
    fabric.launch()
    return run(fabric, kind, stops, folder, epoch_end_stops=epoch_end_stops)


def rest_of_epoch_from_own_state(fabric: Fabric, kind: str, stop: int, folder: str) -> dict[str, Any]:
    """Interrupt after batch ``stop`` of the second epoch and resume without restoring the global RNG: the rest of
    that epoch must still be the uninterrupted run's, from the loader's own state."""
    return {
        "uninterrupted": run(fabric, kind, [], folder, epochs=2, restore_rng=False),
        "interrupted": run(fabric, kind, [stop], folder, epochs=2, restore_rng=False),
    }


def indices(batches: list[list[float]]) -> list[list[int]]:
    """The items' indices of each batch (its even places; the odd ones are the draws)."""
    return [[int(x) for x in batch[::2]] for batch in batches]
