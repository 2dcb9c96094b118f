"""Where bytes live: local disks, fsspec filesystems and object stores behind one :class:`Storage` interface.

Every decision that depends on where a checkpoint lives is made here and nowhere else: formats and strategies call
:func:`resolve` and the methods of the :class:`Location` it returns.
"""

from __future__ import annotations

from fabric_ckpt.storage.base import Location, Storage
from fabric_ckpt.storage.options import StorageOptions
from fabric_ckpt.storage.registry import PathLike, register_storage, resolve

__all__ = ["Location", "PathLike", "Storage", "StorageOptions", "register_storage", "resolve"]
