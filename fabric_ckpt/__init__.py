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
from fabric_ckpt.compare import diff
from fabric_ckpt.convert import convert
from fabric_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
)
from fabric_ckpt.fabric import Fabric
from fabric_ckpt.inspection import describe
from fabric_ckpt.io.consolidate import consolidate
from fabric_ckpt.manager import CheckpointManager
from fabric_ckpt.rng import RNGState
from fabric_ckpt.seeding import seed_everything
from fabric_ckpt.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy
from fabric_ckpt.timestamp import Time, Timestamp, TimeUnit, parse_time
from fabric_ckpt.types import AttributeDict, Stateful
from fabric_ckpt.verify import VerifyReport, verify

__all__ = [
    "AttributeDict",
    "CheckpointManager",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointMismatchError",
    "DDPStrategy",
    "FSDPStrategy",
    "Fabric",
    "RNGState",
    "SaveHandle",
    "SingleDeviceStrategy",
    "Stateful",
    "Strategy",
    "Time",
    "TimeUnit",
    "Timestamp",
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
