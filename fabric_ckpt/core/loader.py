"""What ``fabric.setup_dataloaders`` returns: a loader that moves batches to the device and saves its position.

A set-up loader counts its passes (epochs) and the batches it handed out in the current one. Its ``state_dict()`` is
that position, plus what the pass drew its randomness from as it began (the generators a shuffle or the worker seeds
come from), so that a loader restored mid-epoch yields exactly the batches an uninterrupted run would have yielded
next, whatever the global random state is by then. A wrapped loader with a state of its own (torchdata's
``StatefulDataLoader``) keeps its own state instead; the set-up loader adds only its epoch count. The wrapper itself
is never pickled into a checkpoint: ``fabric.save`` stores its ``state_dict()``.
"""

from __future__ import annotations

import collections
import itertools
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from fabric_ckpt.core.collections import move_to
from fabric_ckpt.core.rng import check_rng_state, process_rng_state, set_process_rng_state

__all__ = ["FabricDataLoader"]

_FORMAT = "fabric_ckpt.loader/1"


@dataclass(frozen=True)
class _Position:
    """Where a restored loader's next pass starts: ``epoch``, after ``batches`` batches, drawing as ``start`` did."""

    epoch: int
    batches: int
    start: Mapping[str, Any] | None


class FabricDataLoader:
    """Iterates a dataloader, moving batches to the device, telling a distributed sampler the epoch, and keeping
    its position so that a resumed run continues with the very next batch.

    Each pass over it is an epoch: ``DistributedSampler.set_epoch`` is called with the pass number, so shuffling
    differs from epoch to epoch but agrees across processes (as Lightning Fabric's loader does).

    Put it in the state given to ``fabric.save``: its :meth:`state_dict` holds the epoch, the batches handed out in
    it, and the random state the epoch's shuffle and worker seeds came from. After :meth:`load_state_dict` the next
    pass is that epoch, continuing after those batches.

    Example:
        >>> loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=8, shuffle=True))
        >>> fabric.save("ckpt.pt", {"model": model, "loader": loader})  # where the loader stands
    """

    def __init__(self, loader: DataLoader, device: torch.device | None) -> None:
        self._loader = loader
        self._device = device
        self._epoch = 0  # the epoch of the pass in progress, or of the next one
        self._yielded = 0  # batches of the pass in progress handed out
        self._in_pass = False
        self._pass_start: dict[str, Any] | None = None  # the generators as the pass in progress began
        self._pass_token: object = None  # the newest pass; an older, abandoned one must not move the position
        self._resume: _Position | None = None

    @property
    def loader(self) -> DataLoader:
        """The wrapped ``DataLoader``."""
        return self._loader

    @property
    def _delegates(self) -> bool:
        """Whether the wrapped loader keeps its own position (e.g. torchdata's ``StatefulDataLoader``)."""
        return callable(getattr(self._loader, "state_dict", None)) and callable(
            getattr(self._loader, "load_state_dict", None)
        )

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: the epoch, the batches handed out in it, and its random state at its start.

        In a process group every rank's random state is kept (each rank resumes with its own), so this is a
        collective like :class:`~fabric_ckpt.RNGState`'s: every rank calls it, as ``fabric.save`` does. A wrapped
        loader with its own ``state_dict`` (torchdata's ``StatefulDataLoader``) is saved by it, under ``"loader"``.

        Example:
            >>> state = loader.state_dict()  # after 3 batches of the first epoch
            >>> state["epoch"], state["batches"]
            (0, 3)
        """
        epoch, batches = (self._epoch, self._yielded) if self._in_pass else (self._epoch, 0)
        start = None if self._delegates or not self._in_pass else self._pass_start
        state: dict[str, Any] = {"format": _FORMAT, "epoch": epoch, "batches": batches}
        state["pass_start"] = _every_rank(start)
        if self._delegates:
            state["loader"] = dict(self._loader.state_dict())  # type: ignore[attr-defined]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume where :meth:`state_dict` stood: the next pass continues with the batch that would have come next.

        State saved after the last batch of an epoch, while the loop over it was still running, ends that pass at
        once (so the loop's end-of-epoch code runs); state saved after the loop ended starts the next epoch.
        Everything is checked before anything changes.

        Raises:
            ValueError: ``state_dict`` is not a loader position, or it lies beyond this loader's batches (the dataset
                or the batch size changed).

        Example:
            >>> loader.load_state_dict(state)
            >>> next(iter(loader))  # the batch an uninterrupted run would have read next
        """
        if self._delegates and not (isinstance(state_dict, Mapping) and state_dict.get("format") == _FORMAT):
            self._loader.load_state_dict(state_dict)  # type: ignore[attr-defined]  # saved before positions existed
            return
        epoch, batches, starts = _check_position(state_dict)
        start = None if self._delegates else self._own_start(starts)
        if start is not None:
            self._check_start(start)
        if not self._delegates and not self._is_iterable():
            length = _length(self._loader)
            if length is not None and batches > length:
                raise ValueError(
                    f"the loader's saved position (epoch {epoch}, after batch {batches}) lies beyond this loader's "
                    f"{length} batches per epoch: the dataset or the batch size changed since it was saved"
                )
        if self._delegates:
            if "loader" not in state_dict:
                raise ValueError("the loader's saved position has no 'loader' entry for the wrapped loader's state")
            self._loader.load_state_dict(state_dict["loader"])  # type: ignore[attr-defined]
        self._resume = _Position(epoch, batches, start)
        self._epoch, self._yielded, self._in_pass, self._pass_token = epoch, 0, False, None

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Any]:
        position, self._resume = self._resume, None
        if position is None:
            position = _Position(self._epoch + 1 if self._in_pass else self._epoch, 0, None)
        token = self._pass_token = object()
        self._epoch, self._yielded, self._in_pass = position.epoch, position.batches, True
        sampler = getattr(self._loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(position.epoch)
        if self._delegates:
            self._pass_start = None
            batches: Iterator[Any] = iter(self._loader)
        elif position.batches == 0 and position.start is None:
            self._pass_start = self._capture_start()
            batches = iter(self._loader)
        else:
            self._pass_start = dict(position.start) if position.start is not None else self._capture_start()
            batches = self._continue(position)
        try:
            for batch in batches:
                if self._pass_token is token:
                    self._yielded += 1
                yield batch if self._device is None else move_to(batch, self._device)
        finally:  # the pass ended, or was abandoned (the loop broke out): the next pass is the next epoch
            if self._pass_token is token:
                self._epoch, self._yielded, self._in_pass, self._pass_start = position.epoch + 1, 0, False, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    # ------------------------------------------------------------------ resuming mid-epoch
    def _continue(self, position: _Position) -> Iterator[Any]:
        """A pass of the wrapped loader that already handed out ``position.batches`` batches: its randomness is
        drawn as the saved pass drew it, then the batches are skipped (without reading them where that is exact)."""
        with self._drawing_as(position.start):
            iterator = iter(self._loader)
            indices = getattr(iterator, "_sampler_iter", None)
            if self._loader.num_workers == 0 and indices is not None and not self._is_iterable():
                # One process, map-style data: skipping the batches' indices reads nothing, and whatever reading
                # them would have drawn from the global generators the restored RNG state already accounts for.
                collections.deque(itertools.islice(indices, position.batches), maxlen=0)
            else:
                # Worker processes (whose seeded generators must see every batch again) or an iterable dataset
                # (whose position only reading reaches): the batches are read again and dropped.
                collections.deque(itertools.islice(iterator, position.batches), maxlen=0)
        return iterator

    @contextmanager
    def _drawing_as(self, start: Mapping[str, Any] | None) -> Iterator[None]:
        """The global generators as the saved pass began, the loader's own ones too; the global ones are put back
        afterwards (the rest of the run draws from them), the loader's own ones go on from there."""
        if start is None:
            yield
            return
        current = process_rng_state()
        set_process_rng_state(start["rng"])
        for generator, saved in zip(self._own_generators(), start["generators"], strict=True):
            generator.set_state(saved)
        try:
            yield
        finally:
            set_process_rng_state(current)

    def _capture_start(self) -> dict[str, Any]:
        return {
            "rng": process_rng_state(),
            "generators": [generator.get_state() for generator in self._own_generators()],
        }

    def _own_generators(self) -> list[torch.Generator]:
        """The generators the loader and its samplers were given (``DataLoader(generator=...)`` and the like)."""
        batch_sampler = getattr(self._loader, "batch_sampler", None)
        holders = [self._loader, getattr(self._loader, "sampler", None), getattr(batch_sampler, "sampler", None)]
        found: list[torch.Generator] = []
        for holder in holders:
            generator = getattr(holder, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
        return found

    def _is_iterable(self) -> bool:
        return isinstance(self._loader.dataset, IterableDataset)

    def _own_start(self, starts: list[Any] | None) -> Mapping[str, Any] | None:
        if starts is None:
            return None
        world_size, rank = _world_size(), _rank()
        if len(starts) != world_size:
            warnings.warn(
                f"the loader's position was saved by {len(starts)} process(es) and is resumed by {world_size}: the "
                "interrupted epoch goes on at the saved batch, but its order and worker seeds follow this run",
                stacklevel=3,
            )
            return None
        start = starts[rank]
        return None if start is None else start

    def _check_start(self, start: Any) -> None:
        generators = start.get("generators") if isinstance(start, Mapping) else None
        if not isinstance(start, Mapping) or not isinstance(generators, list):
            raise ValueError("the loader's saved random state must be {'rng': ..., 'generators': [...]}")
        try:
            check_rng_state(start.get("rng"))
        except ValueError as err:
            raise ValueError(f"the loader's saved random state is malformed: {err}") from None
        own = self._own_generators()
        if len(generators) != len(own) or not all(
            isinstance(saved, torch.Tensor) and saved.dtype == torch.uint8 and saved.shape == g.get_state().shape
            for saved, g in zip(generators, own, strict=False)
        ):
            raise ValueError(
                f"the loader's saved random state holds {len(generators)} generator state(s) of its own, but this "
                f"loader and its samplers have {len(own)} generator(s) of that kind: it was made differently"
            )


def _check_position(state_dict: Any) -> tuple[int, int, list[Any] | None]:
    if not isinstance(state_dict, Mapping) or state_dict.get("format") != _FORMAT:
        raise ValueError(
            f"this is not a position saved by a loader from fabric.setup_dataloaders (it has no 'format': {_FORMAT!r})"
        )
    epoch, batches, starts = state_dict.get("epoch"), state_dict.get("batches"), state_dict.get("pass_start")
    for name, value in (("epoch", epoch), ("batches", batches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"the loader's saved position has {name}={value!r}; it must be an int >= 0")
    if starts is not None and not isinstance(starts, list):
        raise ValueError("the loader's saved 'pass_start' must be a list (one entry per process) or None")
    return int(epoch), int(batches), starts  # type: ignore[arg-type]


def _length(loader: DataLoader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # a sampler without a length
        return None


def _every_rank(start: dict[str, Any] | None) -> list[Any] | None:
    """Every rank's ``start`` (a collective in a process group), or ``None`` if no rank has one."""
    if _world_size() == 1:
        return None if start is None else [start]
    every: list[Any] = [None] * _world_size()
    dist.all_gather_object(every, start)
    return None if all(entry is None for entry in every) else every


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
