"""Our checkpoints inside Lightning: for users who keep ``lightning.Fabric`` or the ``Trainer`` for their runtime.

- :class:`FabricCkptIO`, a Lightning ``CheckpointIO``: ``Fabric(plugins=[FabricCkptIO()])`` and
  ``Trainer(plugins=[FabricCkptIO()])`` write single-file checkpoints through our atomic, checksummed writer and read
  them through our verifying reader (a damaged file is refused), with strategies that use ``CheckpointIO``
  (single device, DDP, and the Trainer's full-state FSDP saves).
- Lightning's FSDP and ModelParallel strategies write sharded folders themselves, past ``CheckpointIO``. Their
  subclasses here (:class:`FabricCkptFSDPStrategy`, :class:`FabricCkptModelParallelStrategy` for ``lightning.Fabric``;
  :class:`FabricCkptTrainerFSDPStrategy`, :class:`FabricCkptTrainerModelParallelStrategy` for the ``Trainer``) let
  Lightning write its own layout (DCP files and ``meta.pt``) into a new generation of our sharded folder and commit
  it with our manifest (sizes and CRC-32s of every file), the same protocol as fabric_ckpt's own sharded saves; every
  load is verified first and reads the generation the manifest names.

Importing this module needs Lightning (``pip install lightning``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.fabric.strategies import FSDPStrategy as _LightningFSDPStrategy
    from lightning.fabric.strategies import ModelParallelStrategy as _LightningModelParallelStrategy
    from lightning.pytorch.strategies import FSDPStrategy as _TrainerFSDPStrategy
    from lightning.pytorch.strategies import ModelParallelStrategy as _TrainerModelParallelStrategy
except ImportError as err:  # an optional dependency: say how to get it
    raise ImportError(
        f"fabric_ckpt.lightning plugs fabric_ckpt into Lightning, which is not importable ({err}); "
        "install it with: pip install lightning"
    ) from err

# Internals used here (kept together, so the package's reorganisation has one place to re-point).
from fabric_ckpt.core.state import materialize
from fabric_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
)
from fabric_ckpt.formats import dcp as _dcp
from fabric_ckpt.formats import open_checkpoint, save_file
from fabric_ckpt.formats import sharded as _sharded
from fabric_ckpt.storage import Location, PathLike, resolve
from fabric_ckpt.storage.local import LocalStorage
from fabric_ckpt.storage.temporaries import temporary_name
from fabric_ckpt.tools.verify import verify

__all__ = [
    "FabricCkptFSDPStrategy",
    "FabricCkptIO",
    "FabricCkptModelParallelStrategy",
    "FabricCkptTrainerFSDPStrategy",
    "FabricCkptTrainerModelParallelStrategy",
]

T = TypeVar("T")
_SHARED_ERRORS: dict[str, type[CheckpointError]] = {
    error.__name__: error
    for error in (CheckpointError, CheckpointCorruptedError, CheckpointMismatchError, UnsafeCheckpointError)
}
_TRUE_VALUES = ("1", "y", "yes", "true")


class FabricCkptIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that saves and loads through fabric_ckpt: atomic, checksummed, verified.

    Files are ours (``fabric_ckpt.verify`` checks them, ``fabric_ckpt.Fabric.load`` reads them) and plain
    ``torch.load`` files, so Lightning without the plugin reads them too.

    Example:
        >>> import lightning as L
        >>> fabric = L.Fabric(accelerator="cpu", plugins=[FabricCkptIO()])
        >>> trainer = L.Trainer(plugins=[FabricCkptIO()])
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` (a local path or fsspec URL) atomically, with CRC-32s of every record.

        A crash or an error mid-save leaves the previous file at ``path`` intact. ``storage_options`` is refused
        with ``TypeError``, as Lightning's ``TorchCheckpointIO`` refuses it.

        Example:
            >>> FabricCkptIO().save_checkpoint({"state_dict": model.state_dict()}, "checkpoints/last.ckpt")
        """
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint(..., storage_options={storage_options!r}): storage options "
                "are not supported; fsspec URLs take their options from the environment and fsspec's configuration"
            )
        save_file(path, checkpoint)

    def load_checkpoint(
        self, path: PathLike, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read, verify and return the checkpoint at ``path``; its tensors own their memory.

        A file whose bytes fail their checksums raises :class:`~fabric_ckpt.CheckpointCorruptedError` (Lightning's
        ``TorchCheckpointIO`` would load it). ``map_location`` is ``torch.load``'s (a device, a dict of locations or a
        callable); ``None`` loads to the CPU, as Lightning's default does. ``weights_only=None`` means ``True``
        (``torch.load``'s default, so Lightning's too), or ``False`` where ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set.

        Example:
            >>> checkpoint = FabricCkptIO().load_checkpoint("checkpoints/last.ckpt")
        """
        safe = _resolve_weights_only(weights_only)
        place = "cpu" if map_location is None else map_location
        with open_checkpoint(path, weights_only=safe, map_location=place) as loaded:
            if not isinstance(loaded, dict):
                raise CheckpointError(f"'{path}' holds a {type(loaded).__name__}, not a checkpoint dict")
            return _owning_memory(loaded)

    def remove_checkpoint(self, path: PathLike) -> None:
        """Remove the checkpoint at ``path``: a file, or a sharded checkpoint folder; nothing else.

        A missing path is a no-op (as in Lightning). A symbolic link is removed, not what it points to. A folder
        that is not a checkpoint (no ``fabric_ckpt.json`` manifest, no DCP ``.metadata``) raises
        ``IsADirectoryError`` and is left alone.

        Example:
            >>> FabricCkptIO().remove_checkpoint("checkpoints/epoch=0-step=100.ckpt")
        """
        location = resolve(path)
        if not location.exists():
            return
        if location.storage.readlink(location.path) is not None or not location.isdir():
            location.remove()  # a file, or a link (not what it points to)
            return
        if not _sharded.is_sharded(location):
            raise IsADirectoryError(
                errno.EISDIR,
                f"not removed: a folder that is not a checkpoint (no {_sharded.MANIFEST_NAME} or "
                f"{_dcp.METADATA_NAME} inside); {type(self).__name__} removes checkpoint files and sharded "
                "checkpoint folders only",
                location.original,
            )
        _sharded.remove_checkpoint(location)  # a user's own files in the folder stay


def _resolve_weights_only(requested: bool | None) -> bool:
    """``None`` as ``torch.load`` reads it, which is what Lightning's own ``CheckpointIO`` passes on."""
    if requested is not None:
        return requested
    return os.getenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() not in _TRUE_VALUES


def _owning_memory(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Copy the tensors that view the memory-mapped file; tensors already placed elsewhere own their memory."""
    placed: dict[int, torch.UntypedStorage] = {}
    _collect_placed_storages(checkpoint, placed)
    return materialize(checkpoint, placed)  # a storage in the memo is reused as it is, not copied


def _collect_placed_storages(obj: Any, found: dict[int, torch.UntypedStorage]) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu" and obj.layout == torch.strided and not obj.is_meta:
            storage = obj.untyped_storage()
            found.setdefault(storage.data_ptr(), storage)
    elif isinstance(obj, dict):
        for value in obj.values():
            _collect_placed_storages(value, found)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _collect_placed_storages(value, found)


# ---------------------------------------------------------------------------------------------- FSDP strategies
class _VerifiedCommits:
    """Wraps a Lightning strategy's own save and load: saves are committed atomically with our manifest, loads verified.

    A sharded save: rank 0 creates a new generation inside the target folder (our sharded protocol), Lightning writes
    its layout into it, every rank checksums the files it wrote, and rank 0 commits the manifest naming it. A full
    save: Lightning writes a hidden sibling file, which :meth:`_commit_file` puts in place. A failure on any rank
    fails the save on every rank and removes what it wrote; the previous checkpoint is untouched. Loads check sizes
    and CRC-32s first (each rank a share of a folder's files) and hand Lightning the generation rank 0 resolved, so
    a damaged checkpoint is refused before Lightning reads it and no load mixes two saves.
    """

    # Provided by the Lightning strategy this is mixed into.
    global_rank: int
    world_size: int
    is_global_zero: bool
    broadcast: Callable[..., Any]

    def _writes_folder(self) -> bool:
        """Whether this strategy's saves are sharded folders (else one full-state file)."""
        if hasattr(self, "_save_distributed_checkpoint"):
            return bool(self._save_distributed_checkpoint)
        return getattr(self, "_state_dict_type", "sharded") == "sharded"

    def _save_verified(self, path: PathLike, write: Callable[[str], None]) -> None:
        final = _local(resolve(str(self.broadcast(str(path)))), "save to")
        description = f"Saving '{final.original}'"
        if self._writes_folder():
            name = self._agree(
                lambda: _sharded.new_generation(final).name if self.is_global_zero else None, description
            )
            generation = final.child(self.broadcast(name))
            try:
                self._agree(lambda: _dcp_errors_as_ours(lambda: write(generation.path), path), description)
                records = self._agree(lambda: self._checksum_own_files(generation), description)
                every_record = [record for per_rank in self._gather(records) for record in per_rank]
                commit = lambda: _sharded.commit(generation, final, every_record, self.world_size)  # noqa: E731
                self._agree(lambda: commit() if self.is_global_zero else None, description)
            except BaseException:
                if self.is_global_zero:
                    _sharded.discard(generation, final)
                raise
            return
        temporary = final.sibling(self.broadcast(temporary_name(final.name)))
        try:
            self._agree(lambda: write(temporary.path), description)
            self._agree(lambda: self._commit_file(temporary, final) if self.is_global_zero else None, description)
        except BaseException:
            if self.is_global_zero:
                temporary.remove()
            raise

    def _checksum_own_files(self, generation: Location) -> list[Any]:
        """This rank's DCP shard files; rank 0 also the index and Lightning's ``meta.pt`` (every other file)."""
        names = _sharded.own_files(generation, self.global_rank)
        if self.is_global_zero:
            names += sorted(name for name in generation.listdir() if not name.endswith(".distcp"))
        return list(_sharded.file_checksums(generation, names, _dcp.read_metadata(generation)))

    def _commit_file(self, temporary: Location, final: Location) -> None:
        """Rank 0 only: put the full checkpoint Lightning wrote at ``temporary`` in place (see the subclasses)."""
        raise NotImplementedError

    def _verified_path(self, path: PathLike) -> str:
        """Verify the checkpoint at ``path``; the path Lightning should read (a sharded folder's live generation)."""
        location = resolve(str(self.broadcast(str(path))))
        description = f"Loading '{location.original}'"
        if location.isdir():
            live = self._agree(lambda: _live_generation(location) if self.is_global_zero else None, description)
            generation = self.broadcast(live)
            folder = self._agree(lambda: _sharded.open_folder(location, generation), description)
            share = (self.global_rank, self.world_size)
            self._agree(lambda: _sharded.verify_folder(folder, checksums=True, share=share), description)
            return folder.data.path
        if location.exists():
            self._agree(lambda: _refuse_damaged(location) if self.is_global_zero else None, description)
        return str(path)

    def _agree(self, fn: Callable[[], T], description: str) -> T:
        """Run ``fn`` on every rank; when it failed on any rank, raise on every rank (none is left waiting)."""
        if self.world_size == 1 or not dist.is_initialized():
            return fn()
        error: Exception | None = None
        result: T | None = None
        try:
            result = fn()
        except Exception as exc:  # every rank must reach the exchange below
            error = exc
        summaries = self._gather(None if error is None else (type(error).__name__, str(error)))
        failures = [(rank, summary) for rank, summary in enumerate(summaries) if summary is not None]
        if not failures:
            return result  # type: ignore[return-value]
        if error is not None:
            raise error
        rank, (kind, message) = failures[0]
        # The same kind of error on every rank (e.g. CheckpointCorruptedError where a share of the files is damaged).
        raise _SHARED_ERRORS.get(kind, CheckpointError)(f"{description} failed on rank {rank}: {message}")

    def _gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1 or not dist.is_initialized():
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


def _dcp_errors_as_ours(operation: Callable[[], T], path: PathLike) -> T:
    """Run a Lightning save or load; DCP's ``CheckpointException`` (a ``BaseException``) becomes one of our
    errors (an ``Exception``), with DCP's as its cause."""
    try:
        return operation()
    except CheckpointException as err:
        raise _dcp.translate_dcp_error(err, f"Lightning's checkpoint operation on '{path}'") from err


def _live_generation(location: Location) -> str | None:
    return (_sharded.read_manifest(location) or {}).get("generation")


def _local(location: Location, action: str) -> Location:
    if not isinstance(location.storage, LocalStorage):
        raise ValueError(
            f"cannot {action} '{location.original}': Lightning's FSDP and ModelParallel strategies write local "
            "paths only; save to a local folder (or use fabric_ckpt's own Fabric, which writes to any fsspec URL)"
        )
    return location


def _refuse_damaged(location: Location) -> None:
    report = verify(location.original)
    if not report.ok:
        raise CheckpointCorruptedError(f"Checkpoint '{location.original}' is damaged: {report.problems[0]}")


def _rewrite_through_ours(temporary: Location, final: Location) -> None:
    """A full checkpoint Lightning wrote with ``torch.save``: rewritten through our writer, then removed.

    The file was written by this process moments ago, so arbitrary unpickling is as safe as the objects saved.
    """
    checkpoint = torch.load(temporary.path, map_location="cpu", mmap=True, weights_only=False)
    save_file(final, checkpoint)
    del checkpoint
    temporary.remove()


def _rename_into_place(temporary: Location, final: Location) -> None:
    """A full checkpoint the strategy's ``CheckpointIO`` wrote (ours, by default): renamed over the target."""
    final.storage.rename(temporary.path, final.path)
    final.storage.sync_folder(final.parent.path)


class FabricCkptFSDPStrategy(_VerifiedCommits, _LightningFSDPStrategy):
    """Lightning Fabric's ``FSDPStrategy`` whose checkpoints are ours: committed atomically, checksummed, verified.

    Takes the arguments of ``lightning.fabric.strategies.FSDPStrategy``. Sharded saves keep Lightning's layout (DCP
    shard files and ``meta.pt``) plus our manifest; full saves (``state_dict_type="full"``) are rewritten into our
    single-file format (one extra read of the file on rank 0). Local paths only, as Lightning's.

    Example:
        >>> fabric = L.Fabric(accelerator="cuda", devices=8, strategy=FabricCkptFSDPStrategy())
    """

    def save_checkpoint(
        self,
        path: PathLike,
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        """Lightning's FSDP save into a new generation, then checksummed and committed under ``path``.

        Example:
            >>> fabric.save("checkpoints/step-100", {"model": model, "optimizer": optimizer})  # calls this
        """
        save = super().save_checkpoint
        self._save_verified(path, lambda temporary: save(temporary, state, storage_options, filter))

    def load_checkpoint(
        self,
        path: PathLike,
        state: Any = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Verify the checkpoint at ``path`` (each rank a share of the files), then Lightning's FSDP load.

        Example:
            >>> remainder = fabric.load("checkpoints/step-100", {"model": model, "optimizer": optimizer})
        """
        load = super().load_checkpoint
        return _dcp_errors_as_ours(lambda: load(self._verified_path(path), state, strict, weights_only), path)

    def _commit_file(self, temporary: Location, final: Location) -> None:
        _rewrite_through_ours(temporary, final)


class FabricCkptModelParallelStrategy(_VerifiedCommits, _LightningModelParallelStrategy):
    """Lightning Fabric's ``ModelParallelStrategy`` (FSDP2, tensor parallelism) whose checkpoints are ours.

    Takes the arguments of ``lightning.fabric.strategies.ModelParallelStrategy``. Distributed saves keep
    Lightning's layout plus our manifest; ``save_distributed_checkpoint=False`` saves are rewritten into our
    single-file format (one extra read on rank 0). Local paths only, as Lightning's.

    Example:
        >>> fabric = L.Fabric(devices=2, strategy=FabricCkptModelParallelStrategy(parallelize_fn=shard))
    """

    def save_checkpoint(
        self,
        path: PathLike,
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        """Lightning's save into a new generation, then checksummed and committed under ``path``.

        Example:
            >>> fabric.save("checkpoints/step-100", {"model": model, "optimizer": optimizer})  # calls this
        """
        save = super().save_checkpoint
        self._save_verified(path, lambda temporary: save(temporary, state, storage_options, filter))

    def load_checkpoint(
        self,
        path: PathLike,
        state: Any = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Verify the checkpoint at ``path`` (each rank a share of the files), then Lightning's load.

        Example:
            >>> remainder = fabric.load("checkpoints/step-100", {"model": model, "optimizer": optimizer})
        """
        load = super().load_checkpoint
        return _dcp_errors_as_ours(lambda: load(self._verified_path(path), state, strict, weights_only), path)

    def _commit_file(self, temporary: Location, final: Location) -> None:
        _rewrite_through_ours(temporary, final)


class _TrainerCheckpointIODefault:
    """The Trainer's strategies take a ``CheckpointIO`` for full saves and removals: ours unless one is given."""

    _checkpoint_io: CheckpointIO | None

    @property
    def checkpoint_io(self) -> CheckpointIO:
        """The ``CheckpointIO`` for full-state files and removals: :class:`FabricCkptIO` unless one was given."""
        if self._checkpoint_io is None:
            self._checkpoint_io = FabricCkptIO()
        return super().checkpoint_io  # type: ignore[misc]

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io


class FabricCkptTrainerFSDPStrategy(_TrainerCheckpointIODefault, _VerifiedCommits, _TrainerFSDPStrategy):
    """The Lightning Trainer's ``FSDPStrategy`` whose checkpoints are ours: committed atomically, checksummed, verified.

    Takes the arguments of ``lightning.pytorch.strategies.FSDPStrategy``. Sharded saves keep Lightning's layout plus
    our manifest; full saves go through the strategy's ``CheckpointIO``, :class:`FabricCkptIO` unless another is
    given. Local paths only, as Lightning's.

    Example:
        >>> trainer = L.Trainer(accelerator="cuda", devices=8, strategy=FabricCkptTrainerFSDPStrategy())
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: PathLike, storage_options: Any | None = None
    ) -> None:
        """Lightning's FSDP save into a new generation, then checksummed and committed under ``filepath``.

        Example:
            >>> trainer.save_checkpoint("checkpoints/last.ckpt")  # ModelCheckpoint calls this too
        """
        save = super().save_checkpoint
        self._save_verified(filepath, lambda temporary: save(checkpoint, temporary, storage_options))

    def load_checkpoint(self, checkpoint_path: PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        """Verify the checkpoint (each rank a share of a folder's files), then Lightning's FSDP load.

        Example:
            >>> trainer.fit(model, ckpt_path="checkpoints/last.ckpt")  # calls this
        """
        load = super().load_checkpoint
        return _dcp_errors_as_ours(lambda: load(self._verified_path(checkpoint_path), weights_only), checkpoint_path)

    def _commit_file(self, temporary: Location, final: Location) -> None:
        _rename_into_place(temporary, final)


class FabricCkptTrainerModelParallelStrategy(
    _TrainerCheckpointIODefault, _VerifiedCommits, _TrainerModelParallelStrategy
):
    """The Lightning Trainer's ``ModelParallelStrategy`` (FSDP2, tensor parallelism) whose checkpoints are ours.

    Takes the arguments of ``lightning.pytorch.strategies.ModelParallelStrategy``. Distributed saves keep
    Lightning's layout plus our manifest; full saves go through the strategy's ``CheckpointIO``,
    :class:`FabricCkptIO` unless another is given. Local paths only, as Lightning's.

    Example:
        >>> trainer = L.Trainer(devices=2, strategy=FabricCkptTrainerModelParallelStrategy())
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: PathLike, storage_options: Any | None = None
    ) -> None:
        """Lightning's save into a new generation, then checksummed and committed under ``filepath``.

        Example:
            >>> trainer.save_checkpoint("checkpoints/last.ckpt")  # ModelCheckpoint calls this too
        """
        save = super().save_checkpoint
        self._save_verified(filepath, lambda temporary: save(checkpoint, temporary, storage_options))

    def load_checkpoint(self, checkpoint_path: PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        """Verify the checkpoint (each rank a share of a folder's files), then Lightning's load.

        Example:
            >>> trainer.fit(model, ckpt_path="checkpoints/last.ckpt")  # calls this
        """
        load = super().load_checkpoint
        return _dcp_errors_as_ours(lambda: load(self._verified_path(checkpoint_path), weights_only), checkpoint_path)

    def _commit_file(self, temporary: Location, final: Location) -> None:
        _rename_into_place(temporary, final)
