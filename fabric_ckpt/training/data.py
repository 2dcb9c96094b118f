"""Giving each process its own part of a ``DataLoader`` without changing what the loader is.

In a multi-process run ``fabric.setup_dataloaders`` rebuilds the user's loader, of the user's own class (a
``DataLoader`` subclass such as torchdata's ``StatefulDataLoader``), with a ``DistributedSampler``, as Lightning
Fabric does: the class's ``__init__`` arguments are taken from the loader's attributes of the same names, and a
custom batch sampler is rebuilt around the distributed sampler.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sized
from typing import Any, cast

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

try:  # torchdata's StatefulDataLoader shuffles with a RandomSampler of its own (not a subclass of torch's)
    from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler
except ImportError:  # optional dependency
    StatefulRandomSampler = RandomSampler

__all__ = ["SamplerShards", "distribute", "rebuild_loader"]

_SHUFFLING = (RandomSampler, StatefulRandomSampler)


def distribute(loader: DataLoader, world_size: int, rank: int) -> DataLoader:
    """The same loader, of the same class, but each of ``world_size`` processes reading its own part.

    The new sampler is a ``DistributedSampler`` over the dataset when the loader sampled it plainly (shuffling if it
    shuffled, seeded with ``PL_GLOBAL_SEED`` as Lightning does), or :class:`SamplerShards` over the loader's own
    sampler. Loaders over iterable datasets, or already reading a ``DistributedSampler``, are returned as they are.
    Unlike Lightning, torchdata's shuffling sampler counts as shuffling too: a ``DistributedSampler`` shuffles the
    same way on every rank and every resumption, where one random sampler per rank need not.

    Raises:
        TypeError: the loader's class cannot be rebuilt from its attributes, or its batch sampler cannot take
            another sampler; the message says what to change.

    Example:
        >>> part = distribute(DataLoader(range(10), batch_size=2, shuffle=True), world_size=2, rank=0)
        >>> len(part)
        3
    """
    if world_size <= 1 or isinstance(loader.dataset, IterableDataset) or isinstance(loader.sampler, DistributedSampler):
        return loader
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    sampler: Sampler[Any]
    if isinstance(loader.sampler, (*_SHUFFLING, SequentialSampler)):
        shuffle = isinstance(loader.sampler, _SHUFFLING)
        sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    else:
        sampler = SamplerShards(cast(Sampler[Any], loader.sampler), num_replicas=world_size, rank=rank, seed=seed)
    return rebuild_loader(loader, sampler)


class SamplerShards(DistributedSampler):
    """This process's share of what another sampler yields (e.g. a ``WeightedRandomSampler``), drawn anew each pass.

    Example:
        >>> shards = SamplerShards(WeightedRandomSampler(weights, 100), num_replicas=2, rank=0)
    """

    def __init__(self, sampler: Sampler[Any], num_replicas: int, rank: int, seed: int = 0) -> None:
        if not isinstance(sampler, Sized):
            raise TypeError(f"{type(sampler).__name__} has no length, so it cannot be split between processes")
        self._sampler = sampler
        self._drawn: list[Any] = []
        # The parent splits positions 0..len-1 of what the sampler yields (it asks only for the length).
        positions = cast(Dataset[Any], range(len(sampler)))
        super().__init__(positions, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)

    def __iter__(self) -> Iterator[Any]:
        self._drawn = list(self._sampler)
        return (self._drawn[position] for position in super().__iter__())


def rebuild_loader(loader: DataLoader, sampler: Sampler[Any]) -> DataLoader:
    """A new loader of ``type(loader)`` with the same settings, reading through ``sampler``.

    Example:
        >>> rebuilt = rebuild_loader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=0))
    """
    cls = type(loader)
    parameters, takes_any = _init_parameters(cls)
    # The loader's public attributes stand for the arguments it was made with (Lightning's rule), except those
    # equal to the default, which need not be passed.
    attributes = {name: value for name, value in vars(loader).items() if not name.startswith("_")}
    attributes["multiprocessing_context"] = loader.multiprocessing_context
    arguments = {
        name: attributes[name]
        for name, parameter in parameters.items()
        if name in attributes and parameter.default is not attributes[name]
    }
    arguments["dataset"] = loader.dataset
    arguments.update(_sampling_arguments(loader, sampler))

    missing = sorted(
        name
        for name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty and name not in arguments
    )
    if missing:
        raise TypeError(
            f"setup_dataloaders cannot rebuild your {cls.__name__} with a distributed sampler: its __init__ "
            f"argument(s) {missing} are not attributes of the loader. Keep each one as an attribute of the same name "
            f"(self.{missing[0]} = {missing[0]}), or pass use_distributed_sampler=False and give each process its "
            "own part of the data yourself"
        )
    unknown = sorted(set(arguments) - set(parameters)) if not takes_any else []
    if unknown:
        raise TypeError(
            f"setup_dataloaders cannot rebuild your {cls.__name__} with a distributed sampler: its __init__ takes no "
            f"argument(s) {unknown}. Add them to its __init__ (or accept **kwargs and pass them to DataLoader), or "
            "pass use_distributed_sampler=False and give each process its own part of the data yourself"
        )
    return cls(**arguments)


def _init_parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """The named ``__init__`` parameters of ``cls``, following ``**kwargs`` to the base classes' ``__init__`` (where a
    subclass passes them on), and whether unknown names are still accepted in the end."""
    parameters: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        passes_on = False
        for parameter in list(inspect.signature(init).parameters.values())[1:]:  # without self
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                passes_on = True
            elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
                parameters.setdefault(parameter.name, parameter)
        if not passes_on:
            return parameters, False
        if klass is DataLoader:
            break
    return parameters, True


def _sampling_arguments(loader: DataLoader, sampler: Sampler[Any]) -> dict[str, Any]:
    """The sampler arguments of the rebuilt loader: ``sampler``, or a copy of a custom batch sampler around it."""
    batch_sampler = loader.batch_sampler
    # A loader given a batch sampler has no batch_size; one that has made its batch sampler itself from its
    # batch_size (torch's BatchSampler, or a class of its own as torchdata's loader does) makes it again.
    if batch_sampler is None or type(batch_sampler) is BatchSampler or loader.batch_size is not None:
        return {"sampler": sampler, "shuffle": False, "batch_sampler": None}
    batch_cls: Any = type(batch_sampler)
    refusal = (
        f"setup_dataloaders cannot give each process its own part of the data through your {batch_cls.__name__}: "
        "a batch sampler must take (sampler, batch_size, drop_last) like torch's BatchSampler for that. Follow "
        "that signature, or pass use_distributed_sampler=False and split the data in your batch sampler yourself"
    )
    if not (hasattr(batch_sampler, "batch_size") and hasattr(batch_sampler, "drop_last")):
        raise TypeError(refusal)
    try:
        rebuilt = batch_cls(sampler, batch_size=batch_sampler.batch_size, drop_last=batch_sampler.drop_last)
    except TypeError as error:
        raise TypeError(refusal) from error
    return {"sampler": None, "shuffle": False, "batch_sampler": rebuilt, "batch_size": 1, "drop_last": False}
