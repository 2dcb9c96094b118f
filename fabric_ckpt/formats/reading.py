"""Reading one checkpoint file: find it, recognise its format, verify it, and unpickle it safely.

Local zip archives are memory-mapped (``torch.load(mmap=True)``), so tensors are views of the page cache until they
are copied into their destinations. Remote files are first streamed to a temporary local file. Every failure becomes
a documented exception that names the path: ``FileNotFoundError``, :class:`CheckpointError` (not a checkpoint,
truncated, unreadable), :class:`CheckpointCorruptedError` (bytes fail their checksums) or
:class:`UnsafeCheckpointError` (needs ``weights_only=False``).
"""

from __future__ import annotations

import copy
import errno
import mmap
import os
import pickle
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from fabric_ckpt.core.telemetry import stage
from fabric_ckpt.errors import CheckpointCorruptedError, CheckpointError, UnsafeCheckpointError
from fabric_ckpt.formats import sharded
from fabric_ckpt.formats.archive_fast_path import FastPathUnavailable, load_mapped_archive, start_checks
from fabric_ckpt.formats.compression import decompressed, sniff_compression
from fabric_ckpt.formats.hf_index import find_hf_index, read_hf_sharded
from fabric_ckpt.formats.safetensors import load_safetensors
from fabric_ckpt.formats.torch_format import read_archive_info
from fabric_ckpt.formats.zip_archive import ZipFormatError
from fabric_ckpt.storage import Location, PathLike, StorageOptions, resolve
from fabric_ckpt.storage.mapped_file import MappedFile, map_local_file

__all__ = ["FORMAT_LEGACY", "FORMAT_SAFETENSORS", "FORMAT_ZIP", "MapLocation", "open_checkpoint", "sniff_format"]

# Where loaded tensors go, as ``torch.load``'s ``map_location`` says it: a device, a ``{saved: target}`` dict of
# location strings, or a callable ``(storage, saved_location) -> storage``.
MapLocation = str | torch.device | dict[str, str] | Callable[[Any, str], Any]

FORMAT_ZIP = "zip"
FORMAT_LEGACY = "legacy-pickle"
FORMAT_SAFETENSORS = "safetensors"
_MAX_SAFETENSORS_HEADER = 100 << 20
# Harmless types that real checkpoints carry: Composer stores torch.__version__ (a str subclass).
_SAFE_EXTRA_GLOBALS: list[Any] = [torch.torch_version.TorchVersion]
_UNSAFE_HINTS = (
    "Unsupported global",
    "was not an allowed global",
    "is blocked",
    "Unsupported operand",
)


def sniff_format(head: bytes, size: int) -> str | None:
    """Recognise a checkpoint format from the first bytes of the file (its name is not trusted)."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return FORMAT_ZIP
    if head[:1] == b"\x80":
        return FORMAT_LEGACY
    if len(head) >= 9:
        header_len = struct.unpack("<Q", head[:8])[0]
        if 0 < header_len <= min(size - 8, _MAX_SAFETENSORS_HEADER) and head[8:9] == b"{":
            return FORMAT_SAFETENSORS
    return None


def existing_location(path: PathLike | Location, options: StorageOptions | None = None) -> Location:
    """Resolve ``path`` and check that something is there, with the error a user expects."""
    location = resolve(path, options)
    if not location.exists():
        raise FileNotFoundError(errno.ENOENT, "Checkpoint not found", location.original)
    return location


def existing_file(path: PathLike | Location) -> Location:
    """Resolve ``path`` and check that it names a file."""
    location = existing_location(path)
    if location.isdir():
        raise CheckpointError(f"'{location.original}' is a folder, not a checkpoint file")
    return location


@contextmanager
def open_checkpoint(
    path: PathLike | Location,
    *,
    weights_only: bool = True,
    verify: bool = True,
    progress: bool | None = None,
    map_location: MapLocation = "cpu",
) -> Iterator[Any]:
    """Yield the object stored at ``path``; tensors may be views of a memory map.

    ``progress`` forces the download's progress bar on or off (default: the location's storage options).

    A sharded checkpoint folder is verified and consolidated in memory (full tensors). Copy what must outlive the
    ``with`` block (see :func:`fabric_ckpt.core.state.materialize`). ``map_location`` places tensors as ``torch.load``
    does; formats that record no device (safetensors, sharded folders) count as saved on ``"cpu"``.

    Example:
        >>> with open_checkpoint("model.ckpt") as checkpoint:
        ...     model.load_state_dict(checkpoint["model"])
    """
    location = existing_location(path)
    if progress is not None:
        location = resolve(location, location.storage.options.replace(progress=progress))
    hf_index = find_hf_index(location)  # a .json index file, or a folder holding model.safetensors.index.json
    if hf_index is not None:
        yield relocate(read_hf_sharded(hf_index, verify=verify), map_location)
        return
    if location.isdir():
        if not sharded.is_sharded(location):
            raise CheckpointError(f"'{location.original}' is a folder, not a checkpoint")
        yield relocate(sharded.read_consolidated(location, weights_only=weights_only, verify=verify), map_location)
        return
    with location.local_file() as local, ExitStack() as stack:
        for _ in range(2):  # e.g. a zstd stream, or a gzip of a tarball of the checkpoint
            kind = _compression_of(local)
            if kind is None:
                break
            local = stack.enter_context(decompressed(local, kind, location.original))
        yield load_local_file(
            local, location.original, weights_only=weights_only, verify=verify, map_location=map_location
        )


def _compression_of(local: str) -> str | None:
    with open(local, "rb") as f:
        return sniff_compression(f.read(300))


def load_local_file(
    local: str, display: str, *, weights_only: bool, verify: bool, map_location: MapLocation = "cpu"
) -> Any:
    size = os.path.getsize(local)
    if size == 0:
        raise CheckpointError(f"Checkpoint '{display}' is empty (0 bytes)")
    with open(local, "rb") as f:
        head = f.read(16)
    kind = sniff_format(head, size)
    if kind == FORMAT_ZIP:
        return _load_archive(local, display, weights_only=weights_only, verify=verify, map_location=map_location)
    if kind == FORMAT_LEGACY:
        return _torch_load(local, display, weights_only=weights_only, mmap=False, map_location=map_location)
    if kind == FORMAT_SAFETENSORS:
        return relocate(load_safetensors(local, display), map_location)
    raise CheckpointError(
        f"'{display}' is not a checkpoint: its first bytes {head[:8]!r} match no known format "
        "(torch zip archive, legacy torch pickle, safetensors)"
    )


def _load_archive(local: str, display: str, *, weights_only: bool, verify: bool, map_location: MapLocation) -> Any:
    """Unpickle a zip checkpoint (memory-mapped) while its CRC-32s are checked on other threads.

    The checks run in parallel with ``torch.load``'s unpickling, so verification costs little wall time; every
    error is raised only after the mapping is closed (a traceback holding views of it would block the close).
    """

    damage = None
    problems: list[Any] = []
    loaded: Any = None
    load_error: BaseException | None = None
    # One private mapping serves the checks and the tensors: the pages the checks fault in are the ones copied.
    with map_local_file(local) as mapping:
        mapped = mapping.buffer
        try:
            info = read_archive_info(mapped)
        except ZipFormatError as err:
            damage = str(err)
        else:
            if info.is_torch_checkpoint and verify:
                if hasattr(mmap, "MADV_WILLNEED"):
                    mapped.madvise(mmap.MADV_WILLNEED)  # start reading the whole file ahead of the checks
                finish_checks = start_checks(mapped, info)  # large records on threads, while we unpickle
                try:
                    loaded = _mapped_or_torch_load(mapping, info, local, display, weights_only, map_location)
                except BaseException as err:  # reported after the checks: damage explains most failures
                    load_error = err
                problems = finish_checks()
            elif info.is_torch_checkpoint:
                loaded = _mapped_or_torch_load(mapping, info, local, display, weights_only, map_location)
    if damage is not None:
        raise CheckpointError(f"Checkpoint '{display}' is truncated or damaged: {damage}")
    if not info.is_torch_checkpoint:
        what = "a TorchScript archive (use torch.jit.load)" if info.is_torchscript else "a zip archive without data.pkl"
        raise CheckpointError(f"'{display}' is not a checkpoint: it is {what}")
    if problems:
        raise CheckpointCorruptedError(f"Checkpoint '{display}' is corrupted: {problems[0]}")
    if load_error is not None:
        raise load_error
    return loaded


def _mapped_or_torch_load(
    mapping: MappedFile, info: Any, local: str, display: str, weights_only: bool, map_location: MapLocation
) -> Any:
    """Unpickle from the shared mapping where the fast path can (:mod:`.archive_fast_path`), else ``torch.load``."""
    with stage("unpickle"):
        try:
            return load_mapped_archive(mapping, info, map_location)
        except FastPathUnavailable:
            return _torch_load(local, display, weights_only=weights_only, mmap=True, map_location=map_location)


def _torch_load(local: str, display: str, *, weights_only: bool, mmap: bool, map_location: MapLocation = "cpu") -> Any:
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
    return _relocated(obj, map_location, {})


def _relocated(obj: Any, map_location: MapLocation, memo: dict[int, torch.UntypedStorage]) -> Any:
    if isinstance(obj, torch.Tensor) and obj.layout == torch.strided and not obj.is_meta:
        storage = obj.untyped_storage()
        if storage._cdata not in memo:
            memo[storage._cdata] = _placed(storage, map_location)
        target = memo[storage._cdata]
        moved = torch.empty((0,), dtype=obj.dtype, device=target.device)
        return moved.set_(target, obj.storage_offset(), obj.size(), obj.stride())
    if isinstance(obj, dict):
        result = copy.copy(obj)
        for key, value in obj.items():
            result[key] = _relocated(value, map_location, memo)
        return result
    if isinstance(obj, list):
        return [_relocated(value, map_location, memo) for value in obj]
    if isinstance(obj, tuple):
        items = [_relocated(value, map_location, memo) for value in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
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
