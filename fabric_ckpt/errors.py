"""The exceptions fabric_ckpt raises, beyond Python's own ``KeyError``/``TypeError``/``ValueError``/``OSError``."""

from __future__ import annotations

import pickle

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointMismatchError",
    "FolderNotACheckpointError",
    "UnpicklableStateError",
    "UnsafeCheckpointError",
    "folder_not_a_checkpoint",
]


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or written: not a checkpoint, truncated, or unreadable.

    Example:
        >>> try:
        ...     fabric.load("not-a-checkpoint.txt")
        ... except CheckpointError as err:
        ...     print(err)
    """


class CheckpointCorruptedError(CheckpointError):
    """The bytes of a checkpoint do not match the checksums recorded when it was written.

    Example:
        >>> try:
        ...     fabric.load("damaged.ckpt", state)
        ... except CheckpointCorruptedError as err:
        ...     print(err)  # names the damaged record and its entry, e.g. 'model/fc1.weight'
    """


class FolderNotACheckpointError(CheckpointError, IsADirectoryError, ValueError):
    """A checkpoint was asked of a folder that holds none (no checkpoint file, no sharded checkpoint inside).

    Also an ``IsADirectoryError`` and a ``ValueError``, what Lightning raises there (``torch.load`` of a folder, and
    Lightning's FSDP strategy), so code written for Lightning keeps catching it.

    Example:
        >>> try:
        ...     fabric.load("runs/", state)  # the run's folder, not a checkpoint in it
        ... except FolderNotACheckpointError as err:
        ...     print(err)
    """


def folder_not_a_checkpoint(path: str) -> FolderNotACheckpointError:
    """The error for ``path``, a folder holding no checkpoint; its message has Lightning's phrase too.

    Example:
        >>> raise folder_not_a_checkpoint("runs/")
    """
    return FolderNotACheckpointError(
        f"'{path}' is a folder, not a checkpoint: the path does not point to a valid checkpoint. The given path must "
        "be a single file containing the full state dict, or a sharded checkpoint folder (holding fabric_ckpt.json "
        "or DCP's .metadata)"
    )


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the module or optimizer it is loaded into (keys, shapes, groups).

    Raised before anything is copied, so the target is left untouched.

    Example:
        >>> try:
        ...     fabric.load("ckpt.pt", {"model": torch.nn.Linear(4, 3)})  # saved from a Linear(4, 2)
        ... except CheckpointMismatchError as err:
        ...     print(err)  # shape mismatch for 'weight': the checkpoint has [2, 4], the module has [3, 4]
    """


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """Loading a checkpoint would need arbitrary unpickling, which ``weights_only=True`` refuses.

    Subclasses :class:`pickle.UnpicklingError` too, so code written for ``torch.load`` keeps catching it.

    Example:
        >>> try:
        ...     fabric.load("downloaded.ckpt", state)
        ... except UnsafeCheckpointError as err:
        ...     print(err)  # names the refused global; weights_only=False is for files you trust only
    """


class UnpicklableStateError(CheckpointError, pickle.PicklingError):
    """A value in the state given to a save cannot be pickled (a lambda, a lock, an open file...); nothing was written.

    The message names the entry (``state['hparams']['fn']``). Also a :class:`pickle.PicklingError`, what
    ``torch.save`` raises there.

    Example:
        >>> try:
        ...     fabric.save("ckpt.pt", {"model": model, "hparams": {"fn": lambda x: x}})
        ... except UnpicklableStateError as err:
        ...     print(err)  # Saving 'ckpt.pt': state['hparams']['fn'] cannot be pickled ...
    """
