"""The training-loop helpers Lightning Fabric users call: data loaders, gradient clipping, moving data.

``Fabric`` delegates to these, so a loop written for Lightning Fabric keeps working when only the import changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler

__all__ = [
    "FabricDataLoader",
    "apply_to_tensors",
    "clip_gradients",
    "distribute",
    "move_to",
]


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested dicts, lists, tuples, named tuples) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return type(obj)({key: move_to(value, device) for key, value in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, (list, tuple)):
        moved = [move_to(value, device) for value in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def clip_gradients(
    module: nn.Module,
    optimizer: Optimizer,
    clip_val: float | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = True,
) -> torch.Tensor | None:
    """Clip the gradients of ``optimizer``'s parameters by value or by total norm; returns the norm before clipping.

    Example:
        >>> clip_gradients(model, optimizer, max_norm=1.0)
    """
    if (clip_val is None) == (max_norm is None):
        raise ValueError("pass exactly one of clip_val (clip by value) and max_norm (clip by norm)")
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if clip_val is not None:
        torch.nn.utils.clip_grad_value_(parameters, clip_val)
        return None
    assert max_norm is not None
    return torch.nn.utils.clip_grad_norm_(
        parameters, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
    )


def distribute(loader: DataLoader, world_size: int, rank: int) -> DataLoader:
    """The same loader, but each of ``world_size`` processes reading its own part (a ``DistributedSampler``).

    The sampler shuffles when the original did (a ``RandomSampler``); loaders over iterable datasets, or with a
    custom batch sampler, are returned unchanged (they decide themselves what each process reads).
    """
    if world_size <= 1 or isinstance(loader.dataset, IterableDataset) or isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        warnings.warn(
            "this DataLoader has a custom batch sampler; it is used as is, so make sure each process reads its own "
            "part of the data",
            stacklevel=3,
        )
        return loader
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset, num_replicas=world_size, rank=rank, shuffle=isinstance(loader.sampler, RandomSampler)
    )
    settings: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        settings["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, sampler=sampler, **settings)


class FabricDataLoader:
    """Iterates a dataloader, moving batches to the device and telling a distributed sampler the epoch.

    Each pass over it is an epoch: ``DistributedSampler.set_epoch`` is called with the pass number, so shuffling
    differs from epoch to epoch but agrees across processes (as Lightning Fabric's loader does).
    """

    def __init__(self, loader: DataLoader, device: torch.device | None) -> None:
        self._loader = loader
        self._device = device
        self._passes = 0

    @property
    def loader(self) -> DataLoader:
        """The wrapped ``DataLoader``."""
        return self._loader

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Any]:
        sampler = getattr(self._loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self._passes)
        self._passes += 1
        for batch in self._loader:
            yield batch if self._device is None else move_to(batch, self._device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def apply_to_tensors(data: Any, fn: Any) -> Any:
    """``data`` with ``fn`` applied to every tensor in it (nested dicts, lists, tuples)."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        return type(data)({key: apply_to_tensors(value, fn) for key, value in data.items()})  # type: ignore[call-arg]
    if isinstance(data, (list, tuple)):
        items = [apply_to_tensors(value, fn) for value in data]
        return type(data)(*items) if hasattr(data, "_fields") else type(data)(items)
    return data
