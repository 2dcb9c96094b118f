"""More rows side by side: torch_checkpointing (Meta's async library), lazy snapshots, and the reference limits.

- ``torch_checkpointing`` (PyPI 0.1.x, the ``bench`` extra): its ``CheckpointManager`` with a synchronous saver, and
  with its asynchronous one (staging thread + a writer subprocess fed through shared memory). On ext4 its default
  storage opens files with ``O_DIRECT`` and fails every save with unaligned buffers, so the rows use
  ``LocalFileSystemStorageConfig(use_direct_io=False)``. It does not fsync: its rows add an fsync of the files it
  wrote, so that every save row is timed until durable. Its load copies into the live tensors (``into=``).
- fabric_ckpt's lazy snapshot (``save_async(..., snapshot="lazy")``): blocked and until complete.
- The limits every other row is judged against, measured in the same run: one memory copy of the state into
  preallocated memory (the floor of any snapshot), and the ideal in-place load, ``torch.load(mmap=True)`` then one
  copy into the live tensors (no checks).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from benchmarks.checkpointers import Checkpointer, FabricCkptAsyncBlocked, TorchSave, register
from benchmarks.workloads import LiveState, Workload

__all__ = ["IdealInPlaceLoad", "MemoryCopy", "TorchCheckpointing"]


def _state_dicts(state: LiveState) -> dict[str, Any]:
    return {name: obj.state_dict() for name, obj in state.objects().items()}


def _fsync_tree(path: str) -> None:
    """Make every file under ``path`` and the folders durable (what fabric_ckpt's save guarantees)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _torch_checkpointing_manager(asynchronous: bool) -> Any:
    from torch_checkpointing import CheckpointManager
    from torch_checkpointing.config import AsyncCheckpointSaverConfig, SyncCheckpointSaverConfig
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    saver = AsyncCheckpointSaverConfig() if asynchronous else SyncCheckpointSaverConfig()
    storage = LocalFileSystemStorageConfig(use_direct_io=False)  # O_DIRECT fails on ext4 with its buffers
    return CheckpointManager(CheckpointManager.Config(save=saver, storage_config=storage))


@register
class TorchCheckpointing(Checkpointer):
    """torch_checkpointing's synchronous save (+ fsync) and its in-place load (``load(path, into=state dicts)``)."""

    key = "torch_checkpointing"
    save_label = "torch_checkpointing sync save + fsync"
    load_label = "torch_checkpointing load (in place)"
    asynchronous = False

    def build(self, workload: Workload, seed: int) -> LiveState:
        state = workload.build(seed)
        state.extra = {"manager": _torch_checkpointing_manager(self.asynchronous)}
        return state

    def save(self, path: str, state: LiveState) -> None:
        assert state.extra is not None
        future = state.extra["manager"].save(path, _state_dicts(state))
        if future is not None:
            future.result()
        _fsync_tree(path)

    def load(self, path: str, state: LiveState) -> Any:
        assert state.extra is not None
        return state.extra["manager"].load(path, into=_state_dicts(state))

    def fingerprint(self, state: LiveState, loaded: Any) -> list[float] | None:
        return super().fingerprint(state, None)


@register
class TorchCheckpointingAsyncBlocked(TorchCheckpointing):
    """torch_checkpointing's asynchronous save: the time ``save()`` holds the caller.

    Its staging runs on a thread after ``save()`` returns; the snapshot is consistent only if the training loop wraps
    its updates in the manager's ``lock()``. ``build`` runs one untimed save first: the writer subprocess starts
    (several seconds) and the staging memory is allocated, as for every save of a run but the first.
    """

    key = "torch_checkpointing_async"
    save_label = "torch_checkpointing async save: caller blocked"
    asynchronous = True

    def build(self, workload: Workload, seed: int) -> LiveState:
        state = super().build(workload, seed)
        assert state.extra is not None
        with tempfile.TemporaryDirectory() as scratch:
            state.extra["manager"].save(os.path.join(scratch, "prime"), _state_dicts(state)).result()
        return state

    def save(self, path: str, state: LiveState) -> None:
        assert state.extra is not None
        state.extra["future"] = state.extra["manager"].save(path, _state_dicts(state))
        state.extra["path"] = path

    def settle(self, state: LiveState) -> None:
        assert state.extra is not None
        future = state.extra.pop("future", None)
        if future is not None:
            future.result()
            _fsync_tree(state.extra["path"])

    def fingerprint(self, state: LiveState, loaded: Any) -> list[float] | None:
        assert state.extra is not None
        self.settle(state)
        fingerprints = super().fingerprint(state, loaded)
        state.extra["manager"].close()  # its writer process ends with it
        return fingerprints


@register
class TorchCheckpointingAsyncTotal(TorchCheckpointingAsyncBlocked):
    """torch_checkpointing's asynchronous save until its files are written and fsynced."""

    key = "torch_checkpointing_async_total"
    save_label = "torch_checkpointing async save: until durable"

    def save(self, path: str, state: LiveState) -> None:
        super().save(path, state)
        assert state.extra is not None
        state.extra.pop("future").result()
        _fsync_tree(path)


@register
class FabricCkptLazyBlocked(FabricCkptAsyncBlocked):
    """fabric_ckpt's ``save_async(..., snapshot="lazy")``: the time the caller is blocked."""

    key = "fabric_ckpt_lazy"
    save_label = "fabric_ckpt save_async lazy: caller blocked"

    def save(self, path: str, state: LiveState) -> None:
        assert state.extra is not None
        state.extra["handle"] = state.extra["fabric"].save_async(path, state.objects(), snapshot="lazy")


@register
class FabricCkptLazyTotal(FabricCkptLazyBlocked):
    """fabric_ckpt's lazy ``save_async`` until the checkpoint is complete."""

    key = "fabric_ckpt_lazy_total"
    save_label = "fabric_ckpt save_async lazy: until complete"

    def save(self, path: str, state: LiveState) -> None:
        super().save(path, state)
        assert state.extra is not None
        state.extra["handle"].wait()


@register
class MemoryCopy(Checkpointer):
    """One memory copy of the state: every tensor ``copy_``-ed into memory allocated (and touched) beforehand."""

    key = "memcpy"
    save_label = "one memory copy of the state (reference)"
    load_label = "-"
    writes_file = False
    has_load = False

    def build(self, workload: Workload, seed: int) -> LiveState:
        state = workload.build(seed)
        sources = _tensors(state)
        state.extra = {"sources": sources, "targets": [torch.ones_like(t) for t in sources]}
        return state

    def save(self, path: str, state: LiveState) -> None:
        assert state.extra is not None
        for target, source in zip(state.extra["targets"], state.extra["sources"], strict=True):
            target.copy_(source)

    def load(self, path: str, state: LiveState) -> Any:
        raise NotImplementedError("the memory-copy reference has no load")

    def fingerprint(self, state: LiveState, loaded: Any) -> list[float] | None:
        """The copies' sums, or ``None`` (not verified) if any copy differs from its source."""
        assert state.extra is not None
        pairs = list(zip(state.extra["targets"], state.extra["sources"], strict=True))
        if not all(torch.equal(target, source) for target, source in pairs):
            return None
        return [float(target.double().sum()) for target, _ in (pairs[0], pairs[-1])]


def _tensors(state: LiveState) -> list[torch.Tensor]:
    assert state.model is not None
    tensors = list(state.model.state_dict().values())
    if state.optimizer is not None:
        tensors += [v for s in state.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return tensors


@register
class IdealInPlaceLoad(TorchSave):
    """The ideal in-place load: ``torch.load(mmap=True)``, then one ``copy_`` per tensor into the live model and
    optimizer (no checks, no validation); its file is ``torch.save``'s."""

    key = "torch_mmap"
    save_label = "torch.save + fsync (file for the in-place load)"
    load_label = "ideal in-place load: torch.load(mmap=True) + copy"
    loads_in_place = True

    def load(self, path: str, state: LiveState) -> Any:
        assert state.model is not None
        checkpoint = torch.load(path, mmap=True, weights_only=True)
        with torch.no_grad():
            for key, tensor in state.model.state_dict().items():
                tensor.copy_(checkpoint["model"][key])
            if state.optimizer is not None:
                params = [p for group in state.optimizer.param_groups for p in group["params"]]
                for index, saved in checkpoint["optimizer"]["state"].items():
                    live = state.optimizer.state[params[index]]
                    for name, value in saved.items():
                        if isinstance(value, torch.Tensor):
                            live[name].copy_(value)
        return None
