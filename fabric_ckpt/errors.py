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
    """The bytes of a checkpoint do not match the checksums recorded when it was written."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the module or optimizer it is loaded into (keys, shapes, groups).

    Raised before anything is copied, so the target is left untouched.
    """


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """Loading a checkpoint would need arbitrary unpickling, which ``weights_only=True`` refuses.

    Subclasses :class:`pickle.UnpicklingError` too, so code written for ``torch.load`` keeps catching it.
    """
