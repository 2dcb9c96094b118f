"""Where checkpoints are written, and control of the page cache in front of it.

Scenarios name their storage by key: ``"local"`` (:class:`LocalDisk`, a folder on the disk under test) or ``"s3"``
(:class:`S3Bucket`, a bucket on moto's S3 API server on 127.0.0.1, which :func:`object_store` starts; reached
through s3fs as users reach S3).
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, ClassVar

__all__ = ["LocalDisk", "S3Bucket", "Storage", "drop_page_cache", "object_store"]

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


def _s3() -> Any:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


class S3Bucket(Storage):
    """Objects under ``root`` (``s3://bucket``) on the S3 server :func:`object_store` started.

    The server keeps objects in its memory and s3fs caches no data, so there is no cache to make cold or warm: every
    load downloads.
    """

    key = "s3"

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def remove(self, path: str) -> None:
        with suppress(FileNotFoundError):
            _s3().rm(path, recursive=True)

    def make_cold(self) -> bool:
        return True

    def make_warm(self, path: str) -> None:
        pass

    def settle(self) -> None:
        pass


@contextmanager
def object_store() -> Iterator[str]:
    """Start moto's S3 server (the one the tests use), point this process's environment at it, make a bucket.

    Yields the bucket's URL. Call it before the first worker starts: workers inherit the environment from the
    forkserver, which copies this process's when it starts.
    """
    from tests.s3 import new_bucket, s3_environment, s3_server

    with s3_server() as endpoint, s3_environment(endpoint):
        yield f"s3://{new_bucket()}"
