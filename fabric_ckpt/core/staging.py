"""A snapshot of a checkpoint in reused memory, so training can go on while it is written.

:class:`Stager` copies every tensor of a checkpoint dict into staging storage (pinned CPU memory for accelerator
tensors) and rebuilds the dict around the copies; tensors that shared a storage still share one. The storages are
kept and reused by the next snapshot of the same structure, so repeated async saves hold one copy at most.
:meth:`Stager.snapshot` plans the copies instead of making them, so that large ones can run in the background (a
lazy snapshot, :mod:`fabric_ckpt.core.snapshot`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fabric_ckpt.core.snapshot import Snapshot
from fabric_ckpt.core.state import resolved
from fabric_ckpt.core.telemetry import Recorder, current_recorder

__all__ = ["Stager"]

# Values nothing can change after the call: kept as they are, not copied.
_IMMUTABLE = frozenset({int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device, range, slice})


class _Deferred:
    """Stands in a staged structure for a lazy tensor until the background thread stages it."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _copied_storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The storage a snapshot copies byte for byte for ``tensor``; ``None`` for a tensor staged otherwise
    (:func:`_staged_otherwise`): one whose bytes are not its values, or that has none."""
    if (
        tensor.is_meta
        or tensor.layout != torch.strided
        or tensor.is_quantized
        or type(tensor) not in (torch.Tensor, nn.Parameter)
        or tensor.is_conj()
        or tensor.is_neg()
    ):
        return None
    storage = tensor.untyped_storage()
    return storage if storage.nbytes() > 0 else None


def _staged_otherwise(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor :func:`_copied_storage` has no storage for, staged now in memory of its own."""
    if tensor.is_meta:
        # No values to copy: the same description of a tensor, written as the synchronous save writes it.
        described = tensor.detach()
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(described, requires_grad=tensor.requires_grad)
        return described
    if tensor.layout != torch.strided or tensor.is_quantized or type(tensor) not in (torch.Tensor, nn.Parameter):
        return tensor.detach().to("cpu", copy=True)  # a copy keeps a quantized tensor's quantizer
    if tensor.is_conj() or tensor.is_neg():
        # The bytes under a conjugate or negative view are not its values: copy the values (memory of their own).
        values = resolved(tensor.detach()).to("cpu")
        return nn.Parameter(values, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else values
    return torch.empty(tensor.shape, dtype=tensor.dtype)  # no bytes


class Stager:
    """Copies checkpoints into staging memory it keeps for the next snapshot.

    Example:
        >>> stager = Stager()
        >>> snapshot = stager.stage({"model": model.state_dict(), "step": 3})
    """

    def __init__(self) -> None:
        self._pool: list[torch.UntypedStorage] = []
        self._next = 0
        self._copies: dict[int, torch.UntypedStorage] = {}
        self._plan = Snapshot()
        self._lazy_sources: frozenset[int] = frozenset()
        # Lazy tensors found by the walk, left in their (staged) container for the background thread to stage.
        self._deferred: list[tuple[Any, Any]] = []

    @property
    def staged_bytes(self) -> int:
        """Bytes of staging memory held."""
        return sum(storage.nbytes() for storage in self._pool)

    def stage(self, checkpoint: Any) -> Any:
        """A copy of ``checkpoint`` whose tensors live in staging memory (the previous snapshot's, when it fits)."""
        snapshot = self.snapshot(checkpoint)
        snapshot.copy_eager()
        return snapshot.checkpoint

    def snapshot(
        self, checkpoint: Any, *, lazy: frozenset[int] | set[int] = frozenset(), recorder: Recorder | None = None
    ) -> Snapshot:
        """``checkpoint`` rebuilt around staging memory, with the copies that fill it planned, not made.

        Storages whose address is in ``lazy`` are left to :meth:`Snapshot.start`; :meth:`Snapshot.copy_eager`
        makes the others.

        Example:
            >>> snapshot = stager.snapshot({"model": model.state_dict()})
            >>> snapshot.copy_eager()
        """
        self._next = 0
        self._copies = {}
        self._plan = Snapshot(recorder if recorder is not None else current_recorder())
        self._lazy_sources = frozenset(lazy)
        self._deferred = []
        try:
            self._plan.checkpoint = self._walk(checkpoint)
        except BaseException:
            self._end_snapshot()
            raise
        if self._deferred:
            # Staging the lazy tensors (a view and a copy each) is left to the background thread too: the caller
            # waits only for the walk. Their storages are not changed before the next step, which waits for it.
            on_cuda = any(container[key].tensor.device.type == "cuda" for container, key in self._deferred)
            self._plan.complete_later(self._stage_deferred, on_cuda=on_cuda)
        else:
            self._end_snapshot()
        return self._plan

    def _stage_deferred(self) -> None:
        try:
            for container, key in self._deferred:
                container[key] = self._tensor(container[key].tensor)
        finally:
            self._end_snapshot()

    def _end_snapshot(self) -> None:
        self._lazy_sources = frozenset()
        self._copies = {}
        self._deferred = []
        del self._pool[self._next :]  # storages the new structure no longer needs

    def _walk(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if type(obj) in _IMMUTABLE:
            return obj
        if isinstance(obj, dict):
            staged = copy.copy(obj)  # keeps the type and attributes, e.g. a state dict's _metadata
            for key, value in obj.items():
                staged[key] = self._walk_item(value, staged, key)
            if getattr(obj, "__dict__", None):
                staged.__dict__.update(copy.deepcopy(obj.__dict__))
            return staged
        if isinstance(obj, list):
            items: list[Any] = [None] * len(obj)
            for index, value in enumerate(obj):
                items[index] = self._walk_item(value, items, index)
            return items
        if isinstance(obj, tuple):
            items = [self._walk(value) for value in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        if type(obj) in (set, frozenset):
            return type(obj)(self._walk(value) for value in obj)
        # Anything else may change after the call (a bytearray, a custom object): the file must hold it as it was.
        return copy.deepcopy(obj)

    def _walk_item(self, value: Any, container: Any, key: Any) -> Any:
        """``value`` staged, or (a lazy tensor in a dict or list) left for :meth:`_stage_deferred` to stage."""
        if self._lazy_sources and isinstance(value, torch.Tensor) and self._is_lazy(value):
            self._deferred.append((container, key))
            return _Deferred(value)
        return self._walk(value)

    def _is_lazy(self, tensor: torch.Tensor) -> bool:
        source = _copied_storage(tensor._local_tensor if isinstance(tensor, DTensor) else tensor)
        return source is not None and source.data_ptr() in self._lazy_sources

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, DTensor):
            sharded = tensor
            local = self._tensor(sharded.to_local())  # a sharded tensor: stage this rank's shard, keep its layout
            return DTensor.from_local(
                local,
                sharded.device_mesh,
                sharded.placements,
                run_check=False,
                shape=sharded.shape,
                stride=sharded.stride(),
            )
        source = _copied_storage(tensor)
        if source is None:
            return _staged_otherwise(tensor)
        key = source.data_ptr()
        staged = self._copies.get(key)
        if staged is None:
            staged = self._storage_for(source)
            self._plan.add(source, staged, lazy=key in self._lazy_sources)
            self._copies[key] = staged
        view = torch.empty((0,), dtype=tensor.dtype)
        view.set_(staged, tensor.storage_offset(), tensor.size(), tensor.stride())
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(view, requires_grad=tensor.requires_grad)
        return view

    def _storage_for(self, source: torch.UntypedStorage) -> torch.UntypedStorage:
        size = source.nbytes()
        if self._next < len(self._pool) and self._pool[self._next].nbytes() == size:
            storage = self._pool[self._next]
        else:
            pinned = source.device.type == "cuda"
            storage = torch.empty(size, dtype=torch.uint8, pin_memory=pinned).untyped_storage()
            if self._next < len(self._pool):
                self._pool[self._next] = storage
            else:
                self._pool.append(storage)
        self._next += 1
        return storage
