"""Pointer files: where a store has no symbolic links (object stores), ``latest`` is a small JSON object naming the
checkpoint it points at, relative to its own folder. Loads follow it as a file system follows a symlink."""

from __future__ import annotations

import json
import posixpath
from typing import Any

from fabric_ckpt.core.naming import escapes_folder
from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.storage.base import Location

__all__ = ["MAX_POINTER_BYTES", "POINTER_FORMAT", "follow_pointer", "pointer_bytes", "pointer_target"]

POINTER_FORMAT = "fabric_ckpt.latest/1"
MAX_POINTER_BYTES = 1 << 16
_MAX_HOPS = 8  # a pointer may name another pointer; a loop stops here


def pointer_bytes(target: str) -> bytes:
    """The content of a pointer to ``target`` (a name relative to the pointer's folder).

    Example:
        >>> pointer_bytes("ep1-ba4-rank0.pt")
        b'{"format": "fabric_ckpt.latest/1", "checkpoint": "ep1-ba4-rank0.pt"}'
    """
    return json.dumps({"format": POINTER_FORMAT, "checkpoint": target}).encode()


def pointer_target(content: bytes) -> str | None:
    """The target a pointer's ``content`` names, or ``None`` if ``content`` is not a pointer.

    Example:
        >>> pointer_target(pointer_bytes("ep1.pt"))
        'ep1.pt'
    """
    if not content.lstrip().startswith(b"{"):
        return None
    try:
        pointer: Any = json.loads(content)
    except ValueError:  # bad JSON and bad UTF-8
        return None
    if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
        return None
    target = pointer.get("checkpoint")
    return target if isinstance(target, str) else None


def follow_pointer(location: Location) -> Location:
    """The checkpoint ``location`` points at if it is a pointer file (followed through pointers to pointers), else
    ``location`` itself. Only a small file is read, so following costs nothing for a real checkpoint.

    Raises:
        CheckpointError: a pointer names a place outside its folder, or pointers form a loop.

    Example:
        >>> follow_pointer(resolve("s3://bucket/run/latest-rank0.pt")).original
        's3://bucket/run/ep1-ba4-rank0.pt'
    """
    current = location
    for _ in range(_MAX_HOPS):
        if not current.isfile() or current.size() > MAX_POINTER_BYTES:  # a folder, a FIFO or device, a checkpoint
            return current
        with current.open() as source:
            target = pointer_target(source.read(MAX_POINTER_BYTES + 1))
        if target is None:
            return current
        if escapes_folder(target):
            raise CheckpointError(f"'{current.original}' is a pointer to {target!r}, outside its folder; not followed")
        storage = current.storage
        current = Location(
            storage,
            storage.join(storage.parent(current.path), target),
            posixpath.join(posixpath.dirname(current.original), target),
        )
    raise CheckpointError(f"'{location.original}' starts a loop of pointers (more than {_MAX_HOPS}); not followed")
