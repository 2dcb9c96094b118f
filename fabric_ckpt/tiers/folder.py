"""One tier of checkpoints: a folder whose checkpoints a name pattern recognises, with its ``latest`` pointer.

The remote tier of a two-tier :class:`~fabric_ckpt.CheckpointManager` is one. It keeps the manager's rules for its
own folder: the same ``latest`` (a relative symlink where the storage has them, else a small pointer object in the
same format), the same listing (newest first by the timestamp variables in the names) and the same retention.
"""

from __future__ import annotations

import os
import posixpath
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from fabric_ckpt.core.naming import NamePattern, escapes_folder
from fabric_ckpt.core.timestamp import TIMESTAMP_FIELDS
from fabric_ckpt.formats import sharded
from fabric_ckpt.storage import Location
from fabric_ckpt.storage.pointers import MAX_POINTER_BYTES, pointer_bytes, pointer_target
from fabric_ckpt.storage.temporaries import is_temporary_name

__all__ = ["CheckpointFolder", "Key", "timestamp_key"]

# How far in training a checkpoint is: the timestamp variables in TIMESTAMP_FIELDS order, -1 where not known.
Key = tuple[int, ...]


def timestamp_key(values: Mapping[str, Any], fields: Iterable[str]) -> Key:
    """The :data:`Key` of ``values`` counting only ``fields`` (the timestamp variables two names share)."""
    known = set(fields)
    return tuple(int(values[field]) if field in known and field in values else -1 for field in TIMESTAMP_FIELDS)


class CheckpointFolder:
    """The checkpoints ``checkpoint`` names inside ``root``, and the ``latest`` pointer of that folder.

    Names are ``/``-separated and relative to ``root``; ``run_values`` are the run's fixed format variables.
    """

    def __init__(self, root: Location, checkpoint: NamePattern, run_values: Mapping[str, Any]) -> None:
        self.root = root
        self.checkpoint = checkpoint
        self.run_values = dict(run_values)

    # ------------------------------------------------------------------ names
    def format(self, pattern: NamePattern, values: Mapping[str, Any]) -> str:
        """``pattern`` formatted with ``values``; a name that would leave the folder is a ``ValueError``."""
        name = pattern.format(values)
        if escapes_folder(name):
            raise ValueError(
                f"{pattern.option}={pattern.text!r} gives {name!r}, which is not a name inside the folder "
                f"{self.root.original!r}: names must be relative and must not contain '..'"
            )
        return name

    def url(self, name: str) -> str:
        return self.root.child(name).original

    def key(self, name: str, fields: Iterable[str] | None = None) -> Key | None:
        """How far in training checkpoint ``name`` is, from its name (``None`` if the pattern did not write it)."""
        values = self.checkpoint.parse(name, self.run_values)
        if values is None:
            return None
        return timestamp_key(values, self.checkpoint.fields if fields is None else fields)

    def exists(self, name: str) -> bool:
        """Whether a committed checkpoint is at ``name``: a file, or a sharded folder with its commit record."""
        location = self.root.child(name)
        return location.exists() and (not location.isdir() or sharded.is_sharded(location))

    def names(self, latest: str) -> list[str]:
        """The checkpoints in the folder, newest first (``latest`` and temporary names are never listed)."""
        found = []
        for name in self.root.storage.walk(self.root.path, self.checkpoint.text.count("/") + 1):
            if name == latest or any(is_temporary_name(part) for part in name.split("/")):
                continue
            key = self.key(name)
            location = self.root.child(name)
            if key is not None and (not location.isdir() or sharded.is_sharded(location)):
                found.append((key, name))
        return [name for _, name in sorted(found, reverse=True)]

    # ------------------------------------------------------------------ latest
    def latest_target(self, latest: str) -> tuple[str | None, str]:
        """The name ``latest`` points at, or ``None`` and what is wrong with it."""
        location = self.root.child(latest)
        link = location.storage.readlink(location.path)
        if link is not None:
            if os.path.isabs(link):
                target = os.path.relpath(os.path.normpath(link), self.root.path).replace(os.sep, "/")
            else:
                target = posixpath.normpath(posixpath.join(posixpath.dirname(latest), link.replace(os.sep, "/")))
            if escapes_folder(target):
                return None, f"is a symlink to {link!r}, outside the folder"
            return target, ""
        if not location.exists():
            return None, "does not exist"
        try:
            with location.open() as source:
                named = pointer_target(source.read(MAX_POINTER_BYTES))
        except OSError:
            named = None
        if named is None:
            return None, "is neither a symlink nor a pointer written by CheckpointManager"
        target = posixpath.normpath(posixpath.join(posixpath.dirname(latest), named))
        if escapes_folder(target):
            return None, f"points outside the folder ({named!r})"
        return target, ""

    def point_latest(self, latest: str, name: str) -> None:
        """Atomically make ``latest`` point at checkpoint ``name`` (which must be complete)."""
        target = posixpath.relpath(name, posixpath.dirname(latest) or ".")
        location = self.root.child(latest)
        if location.storage.symlink(target, location.path):
            return
        with location.atomic_write() as sink:
            sink.write(pointer_bytes(target))

    # ------------------------------------------------------------------ retention
    def delete(self, name: str) -> None:
        """Remove checkpoint ``name``; a failure is a warning (the newer checkpoints are safe)."""
        location = self.root.child(name)
        try:
            if location.isdir():
                sharded.remove_checkpoint(location)  # a user's own files in a checkpoint folder stay
            else:
                location.remove()
        except Exception as err:  # object-store clients raise their own connection errors, not only OSError
            message = f"CheckpointManager could not delete the old checkpoint {location.original}: {err}"
            warnings.warn(message, stacklevel=2)

    def prune(self, keep: int, latest: str, protected: Iterable[str | None]) -> None:
        """Keep the newest ``keep`` checkpoints, ``latest``'s target and ``protected``; delete the others."""
        if keep == -1:
            return
        try:
            spared: set[str | None] = {*protected, self.latest_target(latest)[0]}
            older = self.names(latest)[keep:]
        except Exception as err:  # the new checkpoint and `latest` are complete: retention can wait
            warnings.warn(f"CheckpointManager could not list {self.root.original} to prune it: {err}", stacklevel=2)
            return
        for name in older:
            if name not in spared:
                self.delete(name)
