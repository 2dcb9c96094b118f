"""Where checkpoints are written, and control of the page cache in front of it.

Extension point: object-store rows (S3 through a local moto server) are a new :class:`Storage` that hands out
``s3://`` URLs and has no page cache to drop; scenarios name their storage by key in :data:`STORAGES`.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from typing import ClassVar

__all__ = ["STORAGES", "LocalDisk", "Storage", "drop_page_cache"]

_DROP_CACHES = "/proc/sys/vm/drop_caches"
_READ_BLOCK = 16 << 20


def drop_page_cache() -> bool:
    """Write back dirty pages and drop the page cache; ``False`` where the kernel does not allow it."""
    os.sync()
    try:
        with open(_DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


class Storage(ABC):
    """A place checkpoints live: paths for them, and how to make their reads cold or warm."""

    key: ClassVar[str]

    def __init__(self, root: str) -> None:
        self.root = root

    @abstractmethod
    def path(self, name: str) -> str:
        """Where the checkpoint called ``name`` goes."""

    @abstractmethod
    def remove(self, path: str) -> None:
        """Delete a checkpoint (file or folder) if it exists."""

    @abstractmethod
    def make_cold(self) -> bool:
        """Evict cached data so the next read comes from the medium; ``False`` if that is impossible."""

    @abstractmethod
    def make_warm(self, path: str) -> None:
        """Bring the checkpoint at ``path`` into the cache so the next read is served from memory."""

    def settle(self) -> None:
        """Flush earlier writes so they are not charged to the next measured operation."""
        os.sync()


class LocalDisk(Storage):
    """Files under a local folder, in front of the kernel's page cache."""

    key = "local"

    def path(self, name: str) -> str:
        os.makedirs(self.root, exist_ok=True)
        return os.path.join(self.root, name)

    def remove(self, path: str) -> None:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    def make_cold(self) -> bool:
        return drop_page_cache()

    def make_warm(self, path: str) -> None:
        files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
        buffer = bytearray(_READ_BLOCK)
        for name in files:
            with open(name, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


STORAGES: dict[str, type[Storage]] = {LocalDisk.key: LocalDisk}
