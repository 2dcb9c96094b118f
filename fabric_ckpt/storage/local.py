"""Local disks (and anything mounted as one: NFS, SMB, FUSE): plain ``os`` calls, renames, fsync, memory maps.

The single-file commit writes a hidden sibling temporary, fsyncs it, ``os.replace``-s it over the target and fsyncs
the folder, so a crash at any moment leaves the old file or the new one. A plain rename is all it needs, which every
POSIX filesystem (NFS, SMB/CIFS and FUSE mounts included) makes atomic.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, BinaryIO

from typing_extensions import Buffer

from fabric_ckpt.core.telemetry import record_stage, stage
from fabric_ckpt.storage.base import Storage
from fabric_ckpt.storage.positional import open_positional
from fabric_ckpt.storage.temporaries import (
    delete_in_background,
    remove_tree_or_file,
    sweep_temporaries,
    temporary_name,
)
from fabric_ckpt.storage.writeback import WritebackFile

__all__ = ["LocalStorage", "fsync_folder"]

_WRITE_BUFFER = 1 << 20
# Below this size the rename frees the old file's blocks in microseconds, so it is not worth a hidden link that
# lingers in the folder until the background thread gets to it.
_KEEP_ASIDE_FROM = 64 << 20


class LocalStorage(Storage):
    """Files on this machine's filesystems.

    Example:
        >>> resolve("checkpoints/last.ckpt").storage
        LocalStorage()
    """

    reads_in_place = True

    # ------------------------------------------------------------------ names
    def join(self, folder: str, name: str) -> str:
        return os.path.join(folder, *name.split("/"))

    def parent(self, path: str) -> str:
        return os.path.dirname(path)

    def name(self, path: str) -> str:
        return os.path.basename(path)

    def url(self, path: str) -> str:
        return path

    # ------------------------------------------------------------------ questions
    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def listdir(self, path: str) -> list[str]:
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def walk(self, path: str, depth: int) -> Iterator[str]:
        yield from _walk(path, depth, "")

    # ------------------------------------------------------------------ reading
    @contextmanager
    def open(self, path: str) -> Iterator[BinaryIO]:
        with _open_regular(path) as stream:
            yield stream

    @contextmanager
    def view(self, path: str) -> Iterator[Buffer]:
        with _open_regular(path) as stream:
            if os.fstat(stream.fileno()).st_size == 0:
                yield b""
                return
            with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                yield mapped

    def checksums(
        self, path: str, ranges: Sequence[tuple[int, int]], progress: Callable[[int], object] | None = None
    ) -> tuple[list[int], int]:
        with open_positional(path) as file:
            items, whole = file.crc32_ranges(ranges, progress=progress)
        assert whole is not None
        return items, whole

    @contextmanager
    def local_file(self, path: str) -> Iterator[str]:
        yield path

    # ------------------------------------------------------------------ writing
    def makedirs(self, path: str) -> None:
        if path:
            os.makedirs(path, exist_ok=True)

    @contextmanager
    def atomic_write(self, path: str) -> Iterator[Any]:
        if os.path.isdir(path):
            raise IsADirectoryError(
                errno.EISDIR, "a folder is in the way of the checkpoint file; remove it or pick another path", path
            )
        folder = os.path.dirname(path)
        self.makedirs(folder)
        self.sweep_temporaries(path)
        temporary = os.path.join(folder, temporary_name(os.path.basename(path)))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        sink = os.fdopen(os.open(temporary, flags, 0o666), "wb", buffering=0)
        try:
            yield WritebackFile(sink)
            with stage("fsync"):
                os.fsync(sink.fileno())
            sink.close()
            commit_started = time.perf_counter()
            previous = _keep_aside(path)
            try:
                os.replace(temporary, path)
            except BaseException:
                if previous is not None:
                    remove_tree_or_file(previous)  # the old file still has its own name
                raise
            if previous is not None:
                delete_in_background(previous)
        except BaseException:
            sink.close()
            with suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        fsync_folder(folder)
        record_stage("commit", time.perf_counter() - commit_started)

    @contextmanager
    def open_write(self, path: str) -> Iterator[Any]:
        raw = open(path, "wb", buffering=0)  # noqa: SIM115 - closed through the durable writer below
        with _DurableWriter(WritebackFile(raw), buffer_size=_WRITE_BUFFER) as stream:
            yield stream

    def rename(self, path: str, new_path: str) -> None:
        os.replace(path, new_path)

    def remove(self, path: str) -> None:
        remove_tree_or_file(path)

    def idle_seconds(self, path: str) -> float:
        try:
            latest = os.lstat(path).st_mtime
            with os.scandir(path) as entries:
                for entry in entries:
                    latest = max(latest, entry.stat(follow_symlinks=False).st_mtime)
        except NotADirectoryError:
            pass
        except FileNotFoundError:
            return 0.0
        return max(0.0, time.time() - latest)

    def sync_folder(self, path: str) -> None:
        fsync_folder(path)

    def sweep_temporaries(self, path: str) -> list[str]:
        return sweep_temporaries(os.path.dirname(path) or ".", os.path.basename(path))

    def symlink(self, target: str, path: str) -> bool:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        self.sweep_temporaries(path)  # a temporary link left by a killed earlier save
        temporary = os.path.join(folder, temporary_name(os.path.basename(path)))
        try:
            os.symlink(target, temporary)
        except (OSError, NotImplementedError):  # e.g. Windows without the symlink privilege
            return False
        try:
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        fsync_folder(folder)
        return True

    def readlink(self, path: str) -> str | None:
        return os.readlink(path) if os.path.islink(path) else None

    def confinement_problem(self, path: str, folder: str) -> str | None:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return None
        real, root = os.path.realpath(path), os.path.realpath(folder)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            return "lies outside the checkpoint folder (a symbolic link out of it)"
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return "is not a regular file (a FIFO, a device or a socket)"
        return None

    def __repr__(self) -> str:
        return "LocalStorage()"


class _DurableWriter(io.BufferedWriter):
    """A buffered file whose ``close`` (by whoever calls it first) makes its bytes durable before closing."""

    def close(self) -> None:
        if not self.closed:
            self.flush()
            with stage("fsync"):
                os.fsync(self.fileno())
        super().close()


def _open_regular(path: str) -> BinaryIO:
    """Open a regular file for reading; anything else (a FIFO, a device) is refused without blocking on it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a socket): refused", path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def fsync_folder(folder: str) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_aside(path: str) -> str | None:
    """Hard-link an existing checkpoint to a hidden name, so the rename over it does not free its blocks.

    Freeing gigabytes of blocks can take a second (e.g. with the ``discard`` mount option); done by the rename, it
    would stall the save. The hidden link is removed in the background (or, after a crash, by the next save).
    Small files are left to the rename.
    """
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size < _KEEP_ASIDE_FROM:
            return None
        aside = os.path.join(os.path.dirname(path), temporary_name(os.path.basename(path)))
        os.link(path, aside)
        return aside
    except OSError:
        return None


def _walk(root: str, depth: int, prefix: str) -> Iterator[str]:
    try:
        entries = list(os.scandir(os.path.join(root, prefix)))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_symlink():  # `latest`, or a link we did not write: never a checkpoint of its own
            continue
        yield prefix + entry.name
        if depth > 1 and entry.is_dir(follow_symlinks=False):
            yield from _walk(root, depth - 1, f"{prefix}{entry.name}/")
