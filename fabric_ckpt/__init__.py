"""fabric_ckpt: explicit, safe and fast saving and resuming of PyTorch training state.

Example:
    >>> from fabric_ckpt import Fabric
    >>> fabric = Fabric()
    >>> model, optimizer = fabric.setup(model, optimizer)
    >>> fabric.save("checkpoints/last.ckpt", {"model": model, "optimizer": optimizer, "step": step})
    >>> remainder = fabric.load("checkpoints/last.ckpt", {"model": model, "optimizer": optimizer})
"""

from fabric_ckpt._version import __version__
from fabric_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
)
from fabric_ckpt.fabric import Fabric
from fabric_ckpt.strategies import SingleDeviceStrategy, Strategy
from fabric_ckpt.types import AttributeDict, Stateful

__all__ = [
    "AttributeDict",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointMismatchError",
    "Fabric",
    "SingleDeviceStrategy",
    "Stateful",
    "Strategy",
    "UnsafeCheckpointError",
    "__version__",
]
