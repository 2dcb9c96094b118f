"""The ``CheckpointIO`` a strategy writes and reads single-file checkpoints through: ours, or a user's.

Lightning's strategies hand single-file checkpoints to a ``CheckpointIO`` plugin (``save_checkpoint``,
``load_checkpoint``, ``remove_checkpoint``); ours do too, so ``Fabric(plugins=[my_checkpoint_io])`` keeps a user's
storage code. Any object with those three methods is accepted, no base class required. The default,
:class:`FabricCheckpointIO`, is fabric_ckpt's own I/O: atomic commits, CRC-32s, verified memory-mapped loads.
"""

from __future__ import annotations

from typing import Any

from fabric_ckpt.core.state import materialize
from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.formats import open_checkpoint, save_file, sharded
from fabric_ckpt.storage import Location, PathLike, StorageOptions, resolve

__all__ = ["CHECKPOINT_IO_METHODS", "FabricCheckpointIO", "check_checkpoint_io", "is_checkpoint_io", "is_ours"]

CHECKPOINT_IO_METHODS = ("save_checkpoint", "load_checkpoint", "remove_checkpoint")


def is_checkpoint_io(obj: Any) -> bool:
    """Whether ``obj`` is an object with Lightning's ``CheckpointIO`` methods (an instance, not a class).

    Example:
        >>> is_checkpoint_io(FabricCheckpointIO())
        True
    """
    return not isinstance(obj, type) and all(callable(getattr(obj, name, None)) for name in CHECKPOINT_IO_METHODS)


def check_checkpoint_io(obj: Any) -> None:
    """Refuse an object that lacks a ``CheckpointIO`` method, naming what it lacks.

    Example:
        >>> check_checkpoint_io(object())
        Traceback (most recent call last):
        TypeError: ...
    """
    if is_checkpoint_io(obj):
        return
    missing = [name for name in CHECKPOINT_IO_METHODS if not callable(getattr(obj, name, None))]
    raise TypeError(
        f"a CheckpointIO needs the methods {list(CHECKPOINT_IO_METHODS)} (Lightning's interface); "
        f"{type(obj).__name__} has no callable {missing}"
    )


def is_ours(io: Any) -> bool:
    """Whether ``io`` is our own :class:`FabricCheckpointIO`, untouched: strategies then read and write through
    fabric_ckpt directly (memory-mapped, verified, restored in phases). Any other object, also ours with a method
    replaced on the instance, is called with Lightning's arguments.

    Example:
        >>> is_ours(FabricCheckpointIO())
        True
    """
    return type(io) is FabricCheckpointIO and not set(vars(io)) & set(CHECKPOINT_IO_METHODS)


class FabricCheckpointIO:
    """fabric_ckpt's own single-file I/O behind Lightning's ``CheckpointIO`` interface; every strategy's default.

    Saves commit atomically with CRC-32s of every record; loads are verified. ``fabric.strategy.checkpoint_io`` is
    one of these unless ``Fabric(plugins=[...])`` gave another.

    Args:
        storage_options: how paths are reached (retries, cache, progress bars); by default from the environment.

    Example:
        >>> io = FabricCheckpointIO()
        >>> io.save_checkpoint({"step": 3}, "last.ckpt")
        >>> io.load_checkpoint("last.ckpt")
        {'step': 3}
    """

    def __init__(self, storage_options: StorageOptions | None = None) -> None:
        self.storage_options = storage_options

    def _location(self, path: PathLike | Location, storage_options: Any = None) -> Location:
        if storage_options is not None and not isinstance(storage_options, StorageOptions):
            raise TypeError(
                f"`save_checkpoint(..., storage_options=...)` takes a fabric_ckpt StorageOptions, got "
                f"{type(storage_options).__name__}"
            )
        options = storage_options or self.storage_options
        if isinstance(path, Location) and options is None:
            return path
        return resolve(path, options)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (the previous file stays until the new one is complete).

        ``storage_options``: a :class:`~fabric_ckpt.StorageOptions` for this save, or ``None``.

        Example:
            >>> FabricCheckpointIO().save_checkpoint({"model": model.state_dict()}, "last.ckpt")
        """
        save_file(self._location(path, storage_options), checkpoint)

    def load_checkpoint(
        self, path: PathLike, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read and verify the checkpoint at ``path``; its tensors own their memory (on the CPU by default).

        ``weights_only=None`` means ``True``: arbitrary unpickling only when asked for.

        Example:
            >>> checkpoint = FabricCheckpointIO().load_checkpoint("last.ckpt")
        """
        place = "cpu" if map_location is None else map_location
        location = self._location(path)
        with open_checkpoint(location, weights_only=weights_only is not False, map_location=place) as loaded:
            if not isinstance(loaded, dict):
                raise CheckpointError(f"'{location.original}' holds a {type(loaded).__name__}, not a checkpoint dict")
            return dict(materialize(loaded))

    def remove_checkpoint(self, path: PathLike) -> None:
        """Remove the checkpoint file (or sharded checkpoint folder) at ``path``; a missing path is a no-op.

        Example:
            >>> FabricCheckpointIO().remove_checkpoint("old.ckpt")
        """
        location = self._location(path)
        if not location.exists():
            return
        if location.isdir():
            if not sharded.is_sharded(location):
                raise CheckpointError(f"'{location.original}' is a folder that is not a checkpoint; not removed")
            sharded.remove_checkpoint(location)
            return
        location.remove()

    def teardown(self) -> None:
        """Nothing to release (Lightning's interface has this method).

        Example:
            >>> FabricCheckpointIO().teardown()
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
