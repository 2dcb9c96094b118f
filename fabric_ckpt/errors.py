"""The exceptions fabric_ckpt raises, beyond Python's own ``KeyError``/``TypeError``/``ValueError``/``OSError``."""

from __future__ import annotations

import pickle

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
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
