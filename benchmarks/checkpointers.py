"""The libraries measured side by side, one adapter each, looked up by key in :data:`CHECKPOINTERS`.

Extension point: a new row family (fabric_ckpt's async save, its FSDP strategy, ...) is a new
:class:`Checkpointer` subclass decorated with :func:`register`; scenarios pick it by key. An adapter builds the live
objects in the worker (``build``), saves them, and loads into them; everything it does inside ``save``/``load`` is
timed and its anonymous memory measured, everything in ``build`` is not.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from benchmarks.workloads import LiveState, Workload

__all__ = ["CHECKPOINTERS", "Checkpointer", "fingerprint", "fingerprint_checkpoint", "register"]

CHECKPOINTERS: dict[str, type[Checkpointer]] = {}
_BLOCK = 64 << 20  # dd-style block for the raw disk rows: large enough that syscall overhead vanishes


def register(cls: type[Checkpointer]) -> type[Checkpointer]:
    """Class decorator: make a checkpointer available to scenarios under ``cls.key``."""
    if cls.key in CHECKPOINTERS:
        raise ValueError(f"checkpointer key {cls.key!r} registered twice")
    CHECKPOINTERS[cls.key] = cls
    return cls


class Checkpointer(ABC):
    """One library's way to save and load a workload. Instances live in a single worker process."""

    key: ClassVar[str]
    save_label: ClassVar[str]
    load_label: ClassVar[str]
    ranks: ClassVar[int] = 1
    # Loads restore into live objects (True) or hand back a fresh checkpoint object (False, e.g. torch.load).
    loads_in_place: ClassVar[bool] = True
    # Whether ``save`` writes a checkpoint (reference rows such as one memory copy do not).
    writes_file: ClassVar[bool] = True
    # Whether the adapter has a load (save-only rows, e.g. training loops, are warmed up by a save alone).
    has_load: ClassVar[bool] = True

    def build(self, workload: Workload, seed: int) -> LiveState:
        """Create the live objects; not timed. Override to wrap/shard them as the library expects."""
        return workload.build(seed)

    @abstractmethod
    def save(self, path: str, state: LiveState) -> None:
        """Write ``state`` durably to ``path`` (the timed save)."""

    @abstractmethod
    def load(self, path: str, state: LiveState) -> Any:
        """Read ``path`` (the timed load); return whatever the load produced, kept alive until memory is measured."""

    def fingerprint(self, state: LiveState, loaded: Any) -> list[float] | None:
        """Sums of a few tensors after a save or load, compared across processes to prove the load restored data."""
        if loaded is not None and not self.loads_in_place:
            return fingerprint_checkpoint(loaded)
        return fingerprint(state)

    def settle(self, state: LiveState) -> None:
        """Wait until what :meth:`save` started is complete (asynchronous saves); untimed."""

    def telemetry(self, state: LiveState, op: str) -> dict[str, Any] | None:
        """The library's own record of the operation's stages (fabric_ckpt's telemetry), if it keeps one."""
        return None

    def file_bytes(self, path: str) -> int:
        """Bytes on disk of what :meth:`save` wrote (a file, or every file under a folder; objects for URLs)."""
        if "://" in path:
            import fsspec

            fs, key = fsspec.core.url_to_fs(path, skip_instance_cache=True)
            return int(fs.du(key))
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
        return os.path.getsize(path)


def _local_sum(tensor: torch.Tensor) -> float:
    # FSDP2 parameters are DTensors: sum this rank's shard; the DCP adapter adds up the ranks.
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return float(local.detach().double().sum())


def fingerprint(state: LiveState) -> list[float]:
    """Sums of the first and last parameters and, with an optimizer, of their Adam moments."""
    assert state.model is not None
    params = list(state.model.parameters())
    picks = [params[0], params[-1]]
    if state.optimizer is not None:
        picks += [state.optimizer.state[params[0]]["exp_avg"], state.optimizer.state[params[-1]]["exp_avg_sq"]]
    return [_local_sum(t) for t in picks]


def fingerprint_checkpoint(checkpoint: dict[str, Any]) -> list[float]:
    """:func:`fingerprint` computed from a loaded ``{"model": state_dict, "optimizer": state_dict}``."""
    tensors = list(checkpoint["model"].values())
    picks = [tensors[0], tensors[-1]]
    if "optimizer" in checkpoint:
        moments = checkpoint["optimizer"]["state"]
        last = max(moments)
        picks += [moments[min(moments)]["exp_avg"], moments[last]["exp_avg_sq"]]
    return [_local_sum(t) for t in picks]


def _fsync_path(path: str) -> None:
    """Make a file written by someone else durable, as fabric_ckpt's save is (fsync needs no write access)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@register
class RawDisk(Checkpointer):
    """The disk's own bandwidth: the payload's byte count written in 64 MiB blocks then fdatasync, read back alike."""

    key = "disk"
    save_label = "disk write (64 MiB blocks + fdatasync)"
    load_label = "disk read (64 MiB blocks)"
    loads_in_place = False

    def build(self, workload: Workload, seed: int) -> LiveState:
        block = bytearray(os.urandom(min(_BLOCK, workload.payload_bytes())))
        return LiveState(extra={"block": block, "nbytes": workload.payload_bytes()})

    def save(self, path: str, state: LiveState) -> None:
        assert state.extra is not None
        block = memoryview(state.extra["block"])
        remaining = state.extra["nbytes"]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while remaining:
                remaining -= os.write(fd, block[: min(remaining, len(block))])
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def load(self, path: str, state: LiveState) -> int:
        assert state.extra is not None
        block = memoryview(state.extra["block"])
        total = 0
        with open(path, "rb", buffering=0) as f:
            while count := f.readinto(block):
                total += count
        return total

    def fingerprint(self, state: LiveState, loaded: Any) -> list[float] | None:
        # The "fingerprint" of raw bytes is their count: what a read returned must equal what was written.
        assert state.extra is not None
        return [float(loaded if isinstance(loaded, int) else state.extra["nbytes"])]


@register
class S3fsRaw(RawDisk):
    """What the object store itself moves: the payload's bytes uploaded and downloaded through s3fs, 64 MiB at a time.

    The upload is a multipart upload of 64 MiB parts (s3fs's file interface, as ``fs.open(url, "wb")`` users get);
    the download reads 64 MiB blocks into one reused buffer.
    """

    key = "s3fs"
    save_label = "s3fs raw upload (64 MiB parts)"
    load_label = "s3fs raw download (64 MiB reads)"

    def save(self, path: str, state: LiveState) -> None:
        import fsspec

        assert state.extra is not None
        block = memoryview(state.extra["block"])
        remaining = state.extra["nbytes"]
        fs, key = fsspec.core.url_to_fs(path)
        with fs.open(key, "wb", block_size=_BLOCK) as f:
            while remaining:
                remaining -= f.write(block[: min(remaining, len(block))])

    def load(self, path: str, state: LiveState) -> int:
        import fsspec

        assert state.extra is not None
        block = memoryview(state.extra["block"])
        total = 0
        fs, key = fsspec.core.url_to_fs(path)
        with fs.open(key, "rb", block_size=_BLOCK) as f:
            while count := f.readinto(block):
                total += count
        return total


@register
class TorchSave(Checkpointer):
    """``torch.save`` of the state dicts plus fsync; ``torch.load`` with its defaults (no mmap)."""

    key = "torch"
    save_label = "torch.save + fsync"
    load_label = "torch.load"
    loads_in_place = False

    def save(self, path: str, state: LiveState) -> None:
        checkpoint = {name: obj.state_dict() for name, obj in state.objects().items()}
        with open(path, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

    def load(self, path: str, state: LiveState) -> Any:
        return torch.load(path)


@register
class LightningFabric(Checkpointer):
    """Lightning Fabric's ``save`` (plus the fsync it does not do) and ``load`` into the live model and optimizer."""

    key = "lightning"
    save_label = "Lightning Fabric.save + fsync"
    load_label = "Lightning Fabric.load"

    def build(self, workload: Workload, seed: int) -> LiveState:
        from lightning.fabric import Fabric as LightningFabricApi

        fabric = LightningFabricApi(accelerator="cpu", devices=1)
        return _set_up(fabric, workload.build(seed))

    def save(self, path: str, state: LiveState) -> None:
        assert state.extra is not None
        state.extra["fabric"].save(path, state.objects())
        _fsync_path(path)

    def load(self, path: str, state: LiveState) -> Any:
        assert state.extra is not None
        return state.extra["fabric"].load(path, state.objects())


@register
class FabricCkpt(Checkpointer):
    """fabric_ckpt's ``save`` and ``load`` into the live model and optimizer (memory-mapped)."""

    key = "fabric_ckpt"
    save_label = "fabric_ckpt save"
    load_label = "fabric_ckpt load"

    def build(self, workload: Workload, seed: int) -> LiveState:
        from fabric_ckpt import Fabric

        return _set_up(Fabric(accelerator="cpu"), workload.build(seed))

    def save(self, path: str, state: LiveState) -> None:
        assert state.extra is not None
        state.extra["fabric"].save(path, state.objects())

    def load(self, path: str, state: LiveState) -> Any:
        assert state.extra is not None
        return state.extra["fabric"].load(path, state.objects())

    def telemetry(self, state: LiveState, op: str) -> dict[str, Any] | None:
        assert state.extra is not None
        handle = state.extra.get("handle")
        if handle is not None and handle.telemetry is not None:
            return dict(handle.telemetry.as_dict())
        fabric = state.extra["fabric"]
        found = fabric.last_save_telemetry if op == "save" else fabric.last_load_telemetry
        return None if found is None else dict(found.as_dict())


@register
class FabricCkptAsyncBlocked(FabricCkpt):
    """fabric_ckpt's ``save_async``: the time the caller is blocked (snapshot into reused staging memory).

    The timed call returns once the state is copied; the untimed fingerprint step waits for the background write.
    ``build`` runs one untimed asynchronous save first, so the timed one reuses the staging memory, as every save
    of a training run but the first does.
    """

    key = "fabric_ckpt_async"
    save_label = "fabric_ckpt save_async: caller blocked"

    def build(self, workload: Workload, seed: int) -> LiveState:
        import tempfile

        state = super().build(workload, seed)
        assert state.extra is not None
        with tempfile.TemporaryDirectory() as scratch:  # the untimed first save allocates the staging memory
            state.extra["fabric"].save_async(os.path.join(scratch, "prime.ckpt"), state.objects()).wait()
        return state

    def save(self, path: str, state: LiveState) -> None:
        assert state.extra is not None
        state.extra["handle"] = state.extra["fabric"].save_async(path, state.objects())

    def settle(self, state: LiveState) -> None:
        assert state.extra is not None
        if state.extra.get("handle") is not None:
            state.extra["handle"].wait()

    def fingerprint(self, state: LiveState, loaded: Any) -> list[float] | None:
        self.settle(state)
        return super().fingerprint(state, loaded)


@register
class FabricCkptAsyncTotal(FabricCkptAsyncBlocked):
    """fabric_ckpt's ``save_async`` until the checkpoint is complete (``handle.wait()``)."""

    key = "fabric_ckpt_async_total"
    save_label = "fabric_ckpt save_async: until complete"

    def save(self, path: str, state: LiveState) -> None:
        super().save(path, state)
        assert state.extra is not None
        state.extra["handle"].wait()


@register
class FabricCkptFSDP(FabricCkpt):
    """fabric_ckpt's FSDP strategy (FSDP2, sharded layout) on 2 ranks: DCP as the engine, driven by us."""

    key = "fabric_ckpt_fsdp"
    save_label = "fabric_ckpt save (FSDP2 sharded, 2 ranks)"
    load_label = "fabric_ckpt load (FSDP2 sharded, 2 ranks)"
    ranks = 2

    def build(self, workload: Workload, seed: int) -> LiveState:
        # Each transformer block its own FSDP unit, as the DCP row shards it.
        from benchmarks.workloads import _Block
        from fabric_ckpt import Fabric, FSDPStrategy

        strategy = FSDPStrategy(accelerator="cpu", num_processes=self.ranks, auto_wrap_policy={_Block})
        fabric = Fabric(strategy=strategy)
        fabric.launch()
        state = workload.build(seed, shard=fabric.setup_module)
        assert state.optimizer is not None
        optimizer = fabric.setup_optimizers(state.optimizer) if not state.optimizer.state else state.optimizer
        return LiveState(state.model, optimizer, extra={"fabric": fabric})

    def fingerprint(self, state: LiveState, loaded: Any) -> list[float] | None:
        import torch.distributed as dist

        sums = torch.tensor(fingerprint(state), dtype=torch.float64)
        dist.all_reduce(sums)
        return sums.tolist()


def _set_up(fabric: Any, state: LiveState) -> LiveState:
    """``fabric.setup`` as a training script would call it, keeping the fabric for save/load."""
    if state.optimizer is not None:
        model, optimizer = fabric.setup(state.model, state.optimizer)
    else:
        model, optimizer = fabric.setup(state.model), None
    return LiveState(model, optimizer, extra={"fabric": fabric})


@register
class DistributedCheckpoint(Checkpointer):
    """``torch.distributed.checkpoint.save/load`` on an FSDP2 (``fully_shard``) model, 2 ranks on gloo."""

    key = "dcp"
    save_label = "DCP save (FSDP2, 2 ranks)"
    load_label = "DCP load (FSDP2, 2 ranks)"
    ranks = 2

    def build(self, workload: Workload, seed: int) -> LiveState:
        return workload.build(seed, shard=_fully_shard)

    def save(self, path: str, state: LiveState) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state_dict(state), checkpoint_id=path)

    def load(self, path: str, state: LiveState) -> Any:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        assert state.model is not None and state.optimizer is not None
        state_dict = self._state_dict(state)
        dcp.load(state_dict, checkpoint_id=path)
        set_state_dict(
            state.model,
            state.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optimizer"],
        )
        return None

    def fingerprint(self, state: LiveState, loaded: Any) -> list[float] | None:
        import torch.distributed as dist

        sums = torch.tensor(fingerprint(state), dtype=torch.float64)
        dist.all_reduce(sums)
        return sums.tolist()

    @staticmethod
    def _state_dict(state: LiveState) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        assert state.model is not None and state.optimizer is not None
        model_state, optimizer_state = get_state_dict(state.model, state.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}


def _fully_shard(model: nn.Module) -> nn.Module:
    """FSDP2 as its docs recommend: each transformer block, then the root."""
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(model, "h", None)
    for block in blocks if isinstance(blocks, nn.ModuleList) else []:
        fully_shard(block)
    fully_shard(model)
    return model
