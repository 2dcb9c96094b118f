"""fabric_ckpt: explicit, safe and fast saving and resuming of PyTorch training state.

Example:
    >>> from fabric_ckpt import Fabric
    >>> fabric = Fabric()
    >>> model, optimizer = fabric.setup(model, optimizer)
    >>> fabric.save("checkpoints/last.ckpt", {"model": model, "optimizer": optimizer, "step": step})
    >>> remainder = fabric.load("checkpoints/last.ckpt", {"model": model, "optimizer": optimizer})
"""

from fabric_ckpt._version import __version__
from fabric_ckpt.async_save import SaveHandle
from fabric_ckpt.core.rng import RNGState
from fabric_ckpt.core.timestamp import Time, Timestamp, TimeUnit, parse_time
from fabric_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointMismatchError,
    FolderNotACheckpointError,
    UnpicklableStateError,
    UnsafeCheckpointError,
)
from fabric_ckpt.fabric import Fabric
from fabric_ckpt.manager import CheckpointManager
from fabric_ckpt.storage import StorageOptions
from fabric_ckpt.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy
from fabric_ckpt.tools.consolidate import consolidate
from fabric_ckpt.tools.convert import convert
from fabric_ckpt.tools.diff import diff
from fabric_ckpt.tools.inspection import describe
from fabric_ckpt.tools.verify import VerifyReport, verify
from fabric_ckpt.training.seeding import seed_everything
from fabric_ckpt.types import AttributeDict, Stateful

__all__ = [
    "AttributeDict",
    "CheckpointManager",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointMismatchError",
    "DDPStrategy",
    "FSDPStrategy",
    "Fabric",
    "FolderNotACheckpointError",
    "RNGState",
    "SaveHandle",
    "SingleDeviceStrategy",
    "Stateful",
    "StorageOptions",
    "Strategy",
    "Time",
    "TimeUnit",
    "Timestamp",
    "UnpicklableStateError",
    "UnsafeCheckpointError",
    "VerifyReport",
    "__version__",
    "consolidate",
    "convert",
    "describe",
    "diff",
    "parse_time",
    "seed_everything",
    "verify",
]
