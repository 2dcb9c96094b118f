"""What every reader shares: finding a checkpoint, unpickling it safely, placing tensors as ``torch.load`` would.

Every failure becomes a documented exception that names the path: ``FileNotFoundError``, :class:`CheckpointError`
(not a checkpoint, truncated, unreadable), :class:`CheckpointCorruptedError` (bytes fail their checksums) or
:class:`UnsafeCheckpointError` (needs ``weights_only=False``). The formats themselves are in
:mod:`fabric_ckpt.formats.registry`.
"""

from __future__ import annotations

import errno
import pickle
import struct
import warnings
from typing import Any

import torch

from fabric_ckpt.core.collections import rebuild
from fabric_ckpt.errors import CheckpointError, UnsafeCheckpointError
from fabric_ckpt.formats.base import MapLocation
from fabric_ckpt.storage import Location, PathLike, StorageOptions, resolve

__all__ = ["MapLocation", "existing_location", "relocate", "torch_load", "unsafe_refusal"]

# Harmless types that real checkpoints carry: Composer stores torch.__version__ (a str subclass).
_SAFE_EXTRA_GLOBALS: list[Any] = [torch.torch_version.TorchVersion]
_UNSAFE_HINTS = (
    "Unsupported global",
    "was not an allowed global",
    "is blocked",
    "Unsupported operand",
)


def existing_location(path: PathLike | Location, options: StorageOptions | None = None) -> Location:
    """Resolve ``path`` and check that something is there, with the error a user expects.

    Example:
        >>> existing_location("checkpoints/last.ckpt").size()
        1536
    """
    location = resolve(path, options)
    if not location.exists():
        raise FileNotFoundError(errno.ENOENT, "Checkpoint not found", location.original)
    return location


def torch_load(local: str, display: str, *, weights_only: bool, mmap: bool, map_location: MapLocation = "cpu") -> Any:
    """``torch.load`` of a local file, its failures as our documented errors naming ``display``.

    Example:
        >>> torch_load("/tmp/ckpt.pt", "s3://bucket/ckpt.pt", weights_only=True, mmap=True)
    """
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_SAFE_EXTRA_GLOBALS):
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            return torch.load(local, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as err:
        refusal = unsafe_refusal(err, display) if weights_only else None
        if refusal is not None:
            raise refusal from None
        raise CheckpointError(f"Checkpoint '{display}' could not be unpickled: {err}") from err
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, struct.error) as err:
        raise CheckpointError(f"Checkpoint '{display}' could not be read: {type(err).__name__}: {err}") from err


def relocate(obj: Any, map_location: MapLocation) -> Any:
    """Place the tensors of ``obj``, read from a format that records no device, as ``torch.load`` would place
    tensors saved on ``"cpu"`` (tensors sharing a storage keep sharing it).

    Example:
        >>> state = relocate(safetensors_state, "cuda:0")
    """
    if isinstance(map_location, dict):
        map_location = map_location.get("cpu", "cpu")
    if not callable(map_location) and torch.device(map_location).type == "cpu":
        return obj
    memo: dict[int, torch.UntypedStorage] = {}
    return rebuild(obj, lambda value: _relocated(value, map_location, memo))


def _relocated(obj: Any, map_location: MapLocation, memo: dict[int, torch.UntypedStorage]) -> Any:
    if isinstance(obj, torch.Tensor) and obj.layout == torch.strided and not obj.is_meta:
        storage = obj.untyped_storage()
        if storage._cdata not in memo:
            memo[storage._cdata] = _placed(storage, map_location)
        target = memo[storage._cdata]
        moved = torch.empty((0,), dtype=obj.dtype, device=target.device)
        return moved.set_(target, obj.storage_offset(), obj.size(), obj.stride())
    return obj


def _placed(storage: torch.UntypedStorage, map_location: MapLocation) -> torch.UntypedStorage:
    if callable(map_location):
        placed = map_location(storage, "cpu")
        return storage if placed is None else placed  # None: torch.load's default place, where it was saved
    assert not isinstance(map_location, dict)
    whole = torch.empty(0, dtype=torch.uint8).set_(storage)  # a byte view moves to any device, "meta" included
    return whole.to(device=torch.device(map_location)).untyped_storage()


def unsafe_refusal(error: BaseException, display: str) -> UnsafeCheckpointError | None:
    """The :class:`UnsafeCheckpointError` for torch's weights-only refusal ``error``, or ``None`` if it is not one."""
    message = str(error)
    if not any(hint in message for hint in _UNSAFE_HINTS):
        return None
    detail = message.split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
    return UnsafeCheckpointError(
        f"Checkpoint '{display}' holds objects that only arbitrary unpickling can rebuild, which the safe "
        f"default weights_only=True refuses ({detail}). If you trust this file, pass weights_only=False."
    )
