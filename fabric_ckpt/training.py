"""The training-loop helpers Lightning Fabric users call: data loaders, gradient clipping, moving data.

``Fabric`` delegates to these, so a loop written for Lightning Fabric keeps working when only the import changes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, DistributedSampler

__all__ = [
    "FabricDataLoader",
    "apply_to_tensors",
    "no_state_message",
    "clip_gradients",
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


class FabricDataLoader:
    """Iterates a dataloader, moving batches to the device and telling a distributed sampler the epoch.

    Each pass over it is an epoch: ``DistributedSampler.set_epoch`` is called with the pass number, so shuffling
    differs from epoch to epoch but agrees across processes (as Lightning Fabric's loader does).

    It is never pickled into a checkpoint: ``fabric.save`` stores its :meth:`state_dict`, which is the wrapped
    loader's (e.g. torchdata's ``StatefulDataLoader``), and refuses a loader that keeps no state.

    Example:
        >>> loader = fabric.setup_dataloaders(StatefulDataLoader(dataset, batch_size=8, shuffle=True))
        >>> fabric.save("ckpt.pt", {"model": model, "loader": loader})  # where the loader stands
    """

    def __init__(self, loader: DataLoader, device: torch.device | None) -> None:
        self._loader = loader
        self._device = device
        self._passes = 0

    @property
    def loader(self) -> DataLoader:
        """The wrapped ``DataLoader``."""
        return self._loader

    @property
    def has_state(self) -> bool:
        """Whether :meth:`state_dict`/:meth:`load_state_dict` work: the wrapped loader has them."""
        return callable(getattr(self._loader, "state_dict", None)) and callable(
            getattr(self._loader, "load_state_dict", None)
        )

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: the wrapped loader's ``state_dict()``.

        Raises:
            TypeError: the wrapped loader keeps no state.

        Example:
            >>> state = loader.state_dict()  # e.g. after 3 batches of a StatefulDataLoader
        """
        self._require_state()
        return dict(self._loader.state_dict())  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume where :meth:`state_dict` stood: the next pass continues with the batch that would have come next.

        Raises:
            TypeError: the wrapped loader keeps no state.

        Example:
            >>> loader.load_state_dict(state)
        """
        self._require_state()
        self._loader.load_state_dict(state_dict)  # type: ignore[attr-defined]

    def _require_state(self) -> None:
        if not self.has_state:
            raise TypeError(no_state_message(self._loader))

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


def no_state_message(loader: Any, key: str | None = None) -> str:
    """Why a set-up loader over ``loader`` cannot be saved or restored, and what to do instead."""
    where = f"State entry {key!r}" if key is not None else "This loader"
    return (
        f"{where} is a data loader from fabric.setup_dataloaders over a {type(loader).__name__}, which keeps no state "
        "(no state_dict()/load_state_dict()), so where it stands cannot be saved or restored. Use a stateful loader "
        "(e.g. torchdata.stateful_dataloader.StatefulDataLoader), or leave the loader out of the state and save "
        "what you need to resume (e.g. the epoch and the batch index) as plain values"
    )


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
