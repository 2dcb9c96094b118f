"""The storage seam: one :class:`Storage` interface for every place checkpoints live, and :class:`Location`.

Formats and strategies never ask whether a path is local: they call a storage's methods, and each backend (local disk,
generic fsspec, object stores) keeps its own way of doing each. A :class:`Location` is a path on a storage, with the
storage's methods bound to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from typing_extensions import Buffer

from fabric_ckpt.core.checksum import crc32
from fabric_ckpt.storage.options import StorageOptions

__all__ = ["Location", "Storage"]

T = TypeVar("T")


class Storage(ABC):
    """One kind of place where checkpoints live: how to name, read, write, list and remove its files.

    Paths are the backend's own (absolute paths on a local disk, bucket-relative keys on an object store);
    :meth:`url` turns one back into what a user would pass. Subclasses register the URL protocols they serve with
    :func:`fabric_ckpt.storage.register_storage`.

    Example:
        >>> location = resolve("s3://bucket/run/last.ckpt")
        >>> location.storage.exists(location.path)
        True
    """

    # Whether :meth:`local_file` is the file itself on this machine's disk, so readers can read it where it is (by
    # position, straight into their targets) rather than stream it (a remote backend would download it first).
    reads_in_place = False

    def __init__(self, options: StorageOptions) -> None:
        self.options = options

    # ------------------------------------------------------------------ names
    @abstractmethod
    def join(self, folder: str, name: str) -> str:
        """The path of ``name`` (which may contain ``/``) inside ``folder``."""

    @abstractmethod
    def parent(self, path: str) -> str:
        """The folder holding ``path`` (``""`` at the top of a bucket)."""

    @abstractmethod
    def name(self, path: str) -> str:
        """The last component of ``path``."""

    @abstractmethod
    def url(self, path: str) -> str:
        """What a user would pass to reach ``path`` (a plain path for local files, a URL otherwise)."""

    # ------------------------------------------------------------------ questions
    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether anything is at ``path`` (on a local disk: a dangling symlink too)."""

    @abstractmethod
    def isdir(self, path: str) -> bool:
        """Whether ``path`` is a folder."""

    @abstractmethod
    def isfile(self, path: str) -> bool:
        """Whether ``path`` is a file (or object)."""

    @abstractmethod
    def size(self, path: str) -> int:
        """The size of the file at ``path`` in bytes."""

    @abstractmethod
    def listdir(self, path: str) -> list[str]:
        """The names inside folder ``path`` (empty when it does not exist)."""

    @abstractmethod
    def walk(self, path: str, depth: int) -> Iterator[str]:
        """Names of files and folders under ``path``, ``/``-joined and relative to it, down to ``depth`` levels.

        Symlinks are not listed (on a local disk, ``latest`` links are never checkpoints of their own).
        """

    # ------------------------------------------------------------------ reading
    @abstractmethod
    def open(self, path: str) -> AbstractContextManager[BinaryIO]:
        """A seekable binary stream of the file at ``path``."""

    def read_whole(self, path: str) -> AbstractContextManager[None]:
        """For the block, every read of the file at ``path`` (:meth:`head`, :meth:`open`, :meth:`view`,
        :meth:`local_file`) is served from one local copy: what a load that sniffs, then reads the whole file, wants.

        A local disk reads the file itself; remote backends download it once, on entering. Where no regular file
        is at ``path`` (nothing, or a folder), nothing is kept.
        """
        return nullcontext()

    def head(self, path: str, nbytes: int) -> bytes:
        """The first ``nbytes`` bytes of the file at ``path`` (fewer if it is shorter): what format sniffing reads."""
        with self.open(path) as stream:
            return stream.read(nbytes)

    @abstractmethod
    def view(self, path: str) -> AbstractContextManager[Buffer]:
        """All bytes of the file at ``path``: a read-only memory map where the backend has one."""

    def checksums(
        self, path: str, ranges: Sequence[tuple[int, int]], progress: Callable[[int], object] | None = None
    ) -> tuple[list[int], int]:
        """The CRC-32 of each ``(offset, length)`` range of the file at ``path``, and of the whole file;
        ``progress(nbytes)`` is called as the bytes are checked.

        A local disk reads the file once, by position, so a file shortened meanwhile is an error, not a crash.

        Raises:
            FileShortenedError: (local disk) the file ends before a range does, or before the size it had when
                opened.

        Example:
            >>> items, whole = location.storage.checksums(location.path, [(0, 4096), (4096, 512)])
        """
        with self.view(path) as data:
            view = memoryview(data)
            try:
                found = [crc32(view[offset : offset + length]) for offset, length in ranges], crc32(view)
                if progress is not None:
                    progress(view.nbytes)
            finally:
                view.release()
        return found

    @abstractmethod
    def local_file(self, path: str) -> AbstractContextManager[str]:
        """A local path holding the file's bytes: the file itself on a local disk, else a (cached) download."""

    # ------------------------------------------------------------------ writing
    @abstractmethod
    def makedirs(self, path: str) -> None:
        """Create folder ``path`` and its parents (a no-op where folders are implicit)."""

    @abstractmethod
    def atomic_write(self, path: str) -> AbstractContextManager[Any]:
        """A binary writable whose bytes appear under ``path`` complete on a clean exit, or not at all.

        The single-file commit: a failure or kill at any moment leaves what was at ``path`` before.
        """

    @abstractmethod
    def open_write(self, path: str) -> AbstractContextManager[Any]:
        """A binary writable for a new file inside a folder nobody reads yet; its bytes are durable once closed."""

    @abstractmethod
    def rename(self, path: str, new_path: str) -> None:
        """Move a file of a folder nobody reads yet (not atomic on object stores, which copy then delete)."""

    @abstractmethod
    def remove(self, path: str) -> None:
        """Remove the file or folder tree at ``path``; one that is already gone is fine."""

    @abstractmethod
    def idle_seconds(self, path: str) -> float:
        """Seconds since ``path`` or a file directly inside it last changed (``0`` when the backend cannot tell)."""

    def sync_folder(self, path: str) -> None:
        """Make the entries created in folder ``path`` durable (nothing to do where writes are durable at close)."""

    def sweep_temporaries(self, path: str) -> list[str]:
        """Remove what crashed atomic writes of ``path`` left beside it; returns the removed paths."""
        return []

    def symlink(self, target: str, path: str) -> bool:
        """Atomically make ``path`` a symlink to ``target`` (relative); ``False`` where the backend has none."""
        return False

    def readlink(self, path: str) -> str | None:
        """The target of the symlink at ``path``, or ``None`` when it is not one."""
        return None

    def confinement_problem(self, path: str, folder: str) -> str | None:
        """Why the file (or folder) at ``path`` must not be read as part of ``folder``: it really lies outside it (a
        symbolic link out), or it is not a regular file (a FIFO or a device, which would block or never end).
        ``None`` when it is fine, or missing (callers report missing files themselves).
        """
        return None

    # ------------------------------------------------------------------ policy
    def retrying(self, operation: Callable[[], T], description: str) -> T:
        """Run ``operation``, retried on transient errors where the backend has them (remote stores)."""
        return operation()


@dataclass(frozen=True)
class Location:
    """A path on a :class:`Storage`: ``path`` in the backend's syntax, ``original`` as the user wrote it.

    Example:
        >>> location = resolve("checkpoints/last.ckpt")
        >>> location.child("extra").name
        'extra'
    """

    storage: Storage
    path: str
    original: str

    def __str__(self) -> str:
        return self.original

    def __fspath__(self) -> str:
        return self.original

    @property
    def url(self) -> str:
        """The URL (or local path) of this location, as :func:`fabric_ckpt.storage.resolve` accepts it."""
        return self.storage.url(self.path)

    @property
    def name(self) -> str:
        """The last component of the path."""
        return self.storage.name(self.path)

    @property
    def parent(self) -> Location:
        """The folder holding this location."""
        parent = self.storage.parent(self.path)
        return Location(self.storage, parent, self.storage.url(parent))

    def child(self, name: str) -> Location:
        """The location of ``name`` (``/`` allowed) inside this folder, shown as the user's path plus ``name``."""
        return Location(self.storage, self.storage.join(self.path, name), self.storage.join(self.original, name))

    def sibling(self, name: str) -> Location:
        """The location of ``name`` in the same folder."""
        return self.parent.child(name)

    def exists(self) -> bool:
        return self.storage.exists(self.path)

    def isdir(self) -> bool:
        return self.storage.isdir(self.path)

    def isfile(self) -> bool:
        return self.storage.isfile(self.path)

    def size(self) -> int:
        return self.storage.size(self.path)

    def listdir(self) -> list[str]:
        return self.storage.listdir(self.path)

    def open(self) -> AbstractContextManager[BinaryIO]:
        return self.storage.open(self.path)

    def view(self) -> AbstractContextManager[Buffer]:
        return self.storage.view(self.path)

    def head(self, nbytes: int) -> bytes:
        return self.storage.head(self.path, nbytes)

    def checksums(
        self, ranges: Sequence[tuple[int, int]], progress: Callable[[int], object] | None = None
    ) -> tuple[list[int], int]:
        return self.storage.checksums(self.path, ranges, progress)

    def local_file(self) -> AbstractContextManager[str]:
        return self.storage.local_file(self.path)

    def makedirs(self) -> None:
        self.storage.makedirs(self.path)

    def makedirs_parent(self) -> None:
        parent = self.storage.parent(self.path)
        if parent:
            self.storage.makedirs(parent)

    def atomic_write(self) -> AbstractContextManager[Any]:
        return self.storage.atomic_write(self.path)

    def open_write(self) -> AbstractContextManager[Any]:
        return self.storage.open_write(self.path)

    def remove(self) -> None:
        self.storage.remove(self.path)
