"""What ``fabric.setup_dataloaders`` returns: a loader that moves batches to the device and saves its position.

The wrapper itself is never pickled into a checkpoint: ``fabric.save`` stores its ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from fabric_ckpt.core.collections import move_to

__all__ = ["FabricDataLoader", "no_state_message"]


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
